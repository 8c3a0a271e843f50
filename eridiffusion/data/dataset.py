"""Image-folder datasets: scan, captions, robust image decoding and per-item loading.

Folder layout follows kohya sd-scripts (`library/train_util.py`, DreamBooth style): images
anywhere below the folder, a subfolder named `N_name` repeats its images N times per epoch
(the nearest such folder wins). Captions come from a same-stem `.txt` file, else from a
`metadata.jsonl` in the image's folder (Hugging Face imagefolder: one
`{"file_name": ..., "text": ...}` per line, names relative to that folder), else the
configured default caption, else the file stem.

Scanning reads image headers (size, EXIF orientation) plus, with `verify=True`, a cheap
integrity pass (JPEG decoded at 1/8 scale in DCT space, PNG chunk CRCs checked, other
formats decoded) so that truncated files are reported before training instead of hours in.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from eridiffusion.data.buckets import (
    CROP_MODES,
    Bucket,
    BucketBatchSampler,
    BucketConfig,
    assign_bucket,
    bucket_transform,
    make_buckets,
)
from eridiffusion.data.cache import file_digest
from eridiffusion.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Pixel limit against decompression bombs: 178,956,970 = 2 × PIL's Image.MAX_IMAGE_PIXELS
# default, the size at which PIL itself raises DecompressionBombError (e.g. 13,377 × 13,377).
# Checked on the header size, so a bomb is never decoded. We check it ourselves rather than
# change PIL's process-wide setting.
MAX_IMAGE_PIXELS = 178_956_970

SKIP_EMPTY = "empty file"
SKIP_NOT_IMAGE = "not an image"
SKIP_CORRUPT = "truncated or corrupt"
SKIP_BOMB = "over the pixel limit"
SKIP_TOO_SMALL = "smaller than the smallest bucket"
SKIP_ZERO_REPEATS = "in a 0_ folder (0 repeats)"

_REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")
_EXIF_ORIENTATION = 0x0112
_BOM = b"\xef\xbb\xbf"


class ImageLoadError(DatasetError):
    """An image that passed the scan but cannot be decoded now (changed on disk, or verify=False)."""


class _Skip(Exception):
    def __init__(self, reason: str):
        self.reason = reason


@dataclass(frozen=True)
class CaptionConfig:
    """Caption augmentation: dropout to "" and shuffling of comma-separated tags."""

    dropout: float = 0.0  # probability of training on the empty caption (for CFG)
    shuffle_tags: bool = False  # shuffle the tags after the first `keep_tags`
    keep_tags: int = 0  # leading tags kept in place (e.g. the trigger word)
    separator: str = ","

    @classmethod
    def plain(cls) -> CaptionConfig:
        return cls()

    @classmethod
    def tags(cls, keep_tags: int = 1, dropout: float = 0.0) -> CaptionConfig:
        return cls(dropout=dropout, shuffle_tags=True, keep_tags=keep_tags)


def process_caption(caption: str, cfg: CaptionConfig, generator: torch.Generator | None) -> str:
    """Apply dropout, then tag shuffle keeping the first `cfg.keep_tags` tags; draws from `generator`."""
    if cfg.dropout > 0 and float(torch.rand((), generator=generator)) < cfg.dropout:
        return ""
    if not cfg.shuffle_tags:
        return caption
    tags = [t.strip() for t in caption.split(cfg.separator)]
    tags = [t for t in tags if t]
    head, tail = tags[: cfg.keep_tags], tags[cfg.keep_tags :]
    order = torch.randperm(len(tail), generator=generator).tolist()
    return f"{cfg.separator} ".join(head + [tail[j] for j in order])


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str
    repeats: int
    bucket: Bucket  # (height, width)
    size: tuple[int, int]  # (height, width) after EXIF orientation


@dataclass
class ScanReport:
    """What a folder scan found; `str()` gives a short summary for the console."""

    folder: Path
    used: int = 0
    samples: int = 0  # images × repeats: samples per epoch
    skipped: dict[str, list[Path]] = field(default_factory=dict)
    captions_defaulted: int = 0
    default_source: str = "file stem"  # or "default_caption"
    warnings: list[str] = field(default_factory=list)
    bucket_counts: dict[Bucket, int] = field(default_factory=dict)

    @property
    def skipped_counts(self) -> dict[str, int]:
        return {reason: len(paths) for reason, paths in sorted(self.skipped.items())}

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(path)

    def __str__(self) -> str:
        n_skipped = sum(self.skipped_counts.values())
        lines = [f"{self.folder}: {self.used} images used ({self.samples} samples per epoch), {n_skipped} skipped"]
        if n_skipped:
            lines.append("  skipped: " + ", ".join(f"{n} {r}" for r, n in self.skipped_counts.items()))
        if self.captions_defaulted:
            lines.append(f"  captions: {self.captions_defaulted} missing or empty, used the {self.default_source}")
        if self.bucket_counts:
            lines.append(
                "  buckets (h×w): " + ", ".join(f"{h}×{w}: {n}" for (h, w), n in sorted(self.bucket_counts.items()))
            )
        if self.warnings:
            lines.append(f"  warnings: {len(self.warnings)}, first: {self.warnings[0]}")
        return "\n".join(lines)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB; alpha (or palette / colour-key transparency) composited on white.

    High bit-depth modes are scaled, not clipped: I;16 by 255/65535; I likewise when its values
    exceed 255; F is taken as [0, 1] when its maximum is ≤ 1, else as [0, 255].
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
            values = values * (255.0 / 65535.0)
        elif mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        image = Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), mode="L")
        mode = "L"
    if "A" in mode or "a" in mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return image if mode == "RGB" else image.convert("RGB")


def open_rgb(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `path` fully: EXIF orientation applied (`ImageOps.exif_transpose`), then RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:
                    raise _Skip(SKIP_BOMB)
                im.load()
                image = ImageOps.exif_transpose(im)
        return to_rgb(image)
    except _Skip:
        raise ImageLoadError(
            f"{path}: image is over the {max_pixels:,}-pixel limit; downscale it or remove it"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: cannot decode image ({e}); re-save or remove the file") from e


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1–8) from the header; a PNG's EXIF is read only if it precedes the pixels."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1  # PIL would decode the whole image to look for a trailing eXIf chunk
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return 1


def _probe(path: Path, max_pixels: int, verify: bool) -> tuple[int, int]:
    """(height, width) after EXIF orientation, from the header; raises _Skip with a reason."""
    try:
        if path.stat().st_size == 0:
            raise _Skip(SKIP_EMPTY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise _Skip(SKIP_BOMB)
                if _orientation(im) in (5, 6, 7, 8):  # transposed or rotated by 90°
                    w, h = h, w
                if verify:
                    if im.format == "JPEG":
                        im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                        im.load()
                    elif im.format == "PNG":
                        im.verify()
                    else:
                        im.load()
    except UnidentifiedImageError:
        raise _Skip(SKIP_NOT_IMAGE) from None
    except Image.DecompressionBombError:
        raise _Skip(SKIP_BOMB) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise _Skip(SKIP_CORRUPT) from None
    return h, w


def read_caption_file(path: Path) -> tuple[str, str | None]:
    """UTF-8 text of a caption file, BOM stripped and whitespace trimmed, plus a warning or None."""
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        return data.decode("utf-8").strip(), None
    except UnicodeDecodeError as e:
        text = data.decode("utf-8", errors="replace").strip()
        return text, f"{path}: not UTF-8 (byte {e.start}), undecodable bytes replaced; re-save it as UTF-8"


def read_metadata(path: Path) -> tuple[dict[str, str], list[str]]:
    """Captions of a metadata.jsonl keyed by normalised `file_name`, plus warnings for bad lines."""
    captions: dict[str, str] = {}
    problems: list[str] = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[os.path.normpath(row["file_name"])] = str(row["text"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError):
                problems.append(f'{path}:{n}: not a {{"file_name": ..., "text": ...}} object, line ignored')
    return captions, problems


def _repeats(relative_dir: Path, default: int = 1) -> int:
    """Repeats from the nearest `N_name` folder below the dataset root, else `default`."""
    for part in reversed(relative_dir.parts):
        match = _REPEATS_DIR.match(part)
        if match:
            return int(match.group(1))
    return default


def _metadata_caption(path: Path, root: Path, metadata: dict[Path, dict[str, str]]) -> str:
    """Caption from the nearest metadata.jsonl above `path` that lists it, else ""."""
    for folder in (path.parent, *path.parent.parents):
        if folder in metadata:
            caption = metadata[folder].get(os.path.normpath(path.relative_to(folder)))
            if caption is not None:
                return caption
        if folder == root:
            break
    return ""


def scan_folder(
    folder: str | os.PathLike,
    bucket_cfg: BucketConfig,
    default_caption: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    verify: bool = True,
    default_repeats: int = 1,
) -> tuple[list[Item], ScanReport]:
    """Find usable images below `folder` (hidden files and folders ignored), in sorted order.
    Images outside any kohya `N_name` folder are repeated `default_repeats` times per epoch.

    An image is too small when its shorter side is below `bucket_cfg.min_side`, the shortest
    side of any bucket. Raises DatasetError when nothing is usable.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found; set the data folder to a directory of images")
    buckets = make_buckets(bucket_cfg)
    report = ScanReport(folder=root, default_source="file stem" if default_caption is None else "default_caption")
    items: list[Item] = []
    metadata: dict[Path, dict[str, str]] = {}  # folder → its metadata.jsonl captions
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if "metadata.jsonl" in filenames:
            metadata[here], problems = read_metadata(here / "metadata.jsonl")
            report.warnings.extend(problems)
        repeats = _repeats(here.relative_to(root), default_repeats)
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if repeats == 0:
                report.skip(path, SKIP_ZERO_REPEATS)
                continue
            try:
                h, w = _probe(path, max_pixels, verify)
            except _Skip as s:
                report.skip(path, s.reason)
                continue
            if min(h, w) < bucket_cfg.min_side:
                report.skip(path, SKIP_TOO_SMALL)
                continue
            caption = ""
            txt = path.with_suffix(".txt")
            if txt.is_file():
                caption, problem = read_caption_file(txt)
                if problem:
                    report.warnings.append(problem)
            else:
                caption = _metadata_caption(path, root, metadata)
            if not caption:
                caption = path.stem if default_caption is None else default_caption
                report.captions_defaulted += 1
            bucket = assign_bucket(h, w, buckets)
            items.append(Item(path=path, caption=caption, repeats=repeats, bucket=bucket, size=(h, w)))
    report.used = len(items)
    report.samples = sum(it.repeats for it in items)
    report.bucket_counts = dict(Counter(it.bucket for it in items))
    if not items:
        skipped = ", ".join(f"{n} {r}" for r, n in report.skipped_counts.items()) or "no image files"
        raise DatasetError(
            f"{root}: no usable images ({skipped}); add {'/'.join(IMAGE_EXTENSIONS)} images of at least "
            f"{bucket_cfg.min_side} px on the short side"
        )
    return items, report


class ImageDataset:
    """Scanned items plus the per-item transform; `load_item(i, generator)` gives training data."""

    def __init__(
        self,
        items: list[Item],
        report: ScanReport,
        crop: str = "center",
        flip: bool = False,
        captions: CaptionConfig = CaptionConfig(),
        max_pixels: int = MAX_IMAGE_PIXELS,
    ):
        if crop not in CROP_MODES:
            raise ValueError(f"crop={crop!r} is not one of {CROP_MODES}; use 'center' or 'random'")
        self.items = items
        self.report = report
        self.crop = crop
        self.flip = flip
        self.captions = captions
        self.max_pixels = max_pixels
        self._digests: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    @property
    def buckets(self) -> list[Bucket]:
        return [it.bucket for it in self.items]

    @property
    def repeats(self) -> list[int]:
        return [it.repeats for it in self.items]

    def sampler(self, batch_size: int, seed: int, **kwargs) -> BucketBatchSampler:
        """A BucketBatchSampler over these items, honouring their repeats."""
        return BucketBatchSampler(self.buckets, batch_size, seed, repeats=self.repeats, **kwargs)

    def content_key(self, i: int) -> str:
        """sha256 of item i's file bytes (memoised): the content part of its cache keys."""
        if i not in self._digests:
            self._digests[i] = file_digest(self.items[i].path)
        return self._digests[i]

    def load_item(self, i: int, generator: torch.Generator | None = None, flip: bool | None = None) -> dict:
        """Decode, bucket-crop and augment item i.

        Random draws, in order, from `generator`: flip (if enabled and `flip` is None), crop
        offsets (random crop), caption dropout, tag order. `flip` forces the flip (used to
        cache both flips). Returns pixels (3, H, W) float32 in [-1, 1], caption, time_ids (6,),
        bucket (H, W), key (content sha256), flipped.
        """
        item = self.items[i]
        image = open_rgb(item.path, self.max_pixels)
        if flip is None:
            flip = self.flip and float(torch.rand((), generator=generator)) < 0.5
        pixels, time_ids, _ = bucket_transform(image, item.bucket, self.crop, flip, generator)
        return {
            "pixels": pixels,
            "caption": process_caption(item.caption, self.captions, generator),
            "time_ids": time_ids,
            "bucket": item.bucket,
            "key": self.content_key(i),
            "flipped": flip,
        }


def build_dataset(
    folder: str | os.PathLike,
    buckets: BucketConfig,
    *,
    default_caption: str | None = None,
    captions: CaptionConfig = CaptionConfig(),
    crop: str = "center",
    flip: bool = False,
    max_pixels: int = MAX_IMAGE_PIXELS,
    verify: bool = True,
    default_repeats: int = 1,
) -> ImageDataset:
    """Scan `folder` and return the dataset the trainer iterates; `dataset.report` says what was found."""
    items, report = scan_folder(folder, buckets, default_caption, max_pixels, verify, default_repeats)
    return ImageDataset(items, report, crop=crop, flip=flip, captions=captions, max_pixels=max_pixels)
