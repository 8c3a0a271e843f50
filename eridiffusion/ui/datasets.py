"""The Dataset page: the trainer's own scan of a folder, captions edited in place, statistics.

Buckets and skipped files come from `data.dataset.build_dataset` with the bucket settings
of the Train form, so the page shows exactly what a run would use. A caption is the image's
same-stem `.txt`, written atomically (`io.write_text`).
"""

from __future__ import annotations

import functools
import io
import os
from collections import Counter
from pathlib import Path

from PIL import Image

from eridiffusion.data.buckets import BucketConfig
from eridiffusion.data.dataset import IMAGE_EXTENSIONS, build_dataset
from eridiffusion.errors import DatasetError
from eridiffusion.io import write_text
from eridiffusion.ui.paths import BadPath, Root

CLIP_TOKENS = 75  # ids between BOS and EOS; longer captions are cut by the text encoders
STOP_WORDS = frozenset("a an and at by for from in of on the to with".split())


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from eridiffusion.models.tokenizer import CLIPTokenizer

    return CLIPTokenizer()


def image_folders(root: Root, max_depth: int = 4) -> list[dict]:
    """Folders under the root holding images (hidden folders skipped), with their image count."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root.path):
        here = Path(dirpath)
        depth = len(here.relative_to(root.path).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < max_depth)
        n = sum(1 for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
        if n:
            out.append({"dir": root.relative(here), "images": n})
    return out


def scan(root: Root, folder: str, bucket: BucketConfig) -> dict:
    """What a run would train on in `folder`: items with caption, bucket and tokens; skipped files; stats."""
    path = root.resolve(folder, must_exist=True)
    try:
        dataset = build_dataset(path, bucket)
    except DatasetError as e:  # nothing usable: still list what is there
        return {"dir": root.relative(path), "items": [], "skipped": [], "error": str(e), "stats": caption_stats([])}
    tok = _tokenizer()
    items = []
    for it in dataset.items:
        tokens = len(tok.encode(it.caption))
        items.append({
            "path": root.relative(it.path), "caption": it.caption, "has_caption": it.path.with_suffix(".txt").is_file(),
            "bucket": list(it.bucket), "size": list(it.size), "repeats": it.repeats, "tokens": tokens,
        })  # fmt: skip
    skipped = [{"path": root.relative(p), "reason": reason} for reason, paths in dataset.report.skipped.items()
               for p in paths]  # fmt: skip
    return {
        "dir": root.relative(path),
        "items": items,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "buckets": {f"{h}x{w}": n for (h, w), n in sorted(dataset.report.bucket_counts.items())},
        "report": str(dataset.report),
        "stats": caption_stats([(it["caption"], it["tokens"]) for it in items]),
    }


def caption_stats(captions: list[tuple[str, int]], top: int = 20) -> dict:
    """Token counts (CLIP, without BOS/EOS) and the most common comma-separated tags and words."""
    tokens = [n for _, n in captions]
    tags = Counter(t.strip().lower() for c, _ in captions for t in c.split(",") if t.strip())
    words = Counter(w.strip(".,;:!?()\"'").lower() for c, _ in captions for w in c.split())
    for w in ("", *STOP_WORDS):
        words.pop(w, None)
    return {
        "captions": len(captions),
        "tokens_min": min(tokens, default=0),
        "tokens_mean": round(sum(tokens) / len(tokens), 1) if tokens else 0,
        "tokens_max": max(tokens, default=0),
        "over_limit": sum(n > CLIP_TOKENS for n in tokens),
        "limit": CLIP_TOKENS,
        "tags": tags.most_common(top),
        "words": words.most_common(top),
    }


def save_caption(root: Root, image: str, caption: str) -> dict:
    """Write `caption` to the image's `.txt` (atomic); returns its path and token count."""
    path = root.resolve(image, must_exist=True)
    if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise BadPath(f"{image}: not an image ({', '.join(IMAGE_EXTENSIONS)})")
    txt = path.with_suffix(".txt")
    root.resolve(txt)  # a .txt symlinked out of the root is not written through
    write_text(txt, caption.strip() + "\n")
    return {"path": root.relative(txt), "caption": caption.strip(), "tokens": len(_tokenizer().encode(caption))}


def thumbnail(path: Path, size: int = 256) -> bytes:
    """A JPEG no larger than `size` on its long side."""
    with Image.open(path) as im:
        im.thumbnail((size, size))
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
