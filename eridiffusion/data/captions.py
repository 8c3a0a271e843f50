"""Captions: where an image's caption comes from, and the per-step caption augmentation.

Sources, first found wins (kohya sd-scripts `library/train_util.py` at 48d368f:
`read_caption`, then `class_tokens` from an `N_name` folder in
`config_util.generate_dreambooth_subsets_config_by_subdirs`):
1. the same-stem caption file (`caption_ext`, default `.txt`);
2. a `metadata.jsonl` in the image's folder or above (Hugging Face imagefolder: one
   `{"file_name": ..., "text": ...}` per line, names relative to that folder);
3. the name of the nearest kohya `N_name` folder below the dataset root (`10_sks dog` → "sks dog");
4. the configured default caption;
5. the file stem.

Augmentation (`process_caption`, kohya `BaseDataset.process_caption`): prefix and suffix
joined with a space, caption dropout to "", then, when tags are shuffled or dropped, split
on the separator, keep the first `keep_tags`, shuffle the rest, drop each of the rest with
probability `tag_dropout`, join with ", ".
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# caption sources, as the scan summary names them
FROM_FILE = "caption file"
FROM_METADATA = "metadata.jsonl"
FROM_FOLDER = "N_name folder name"
FROM_DEFAULT = "default_caption"
FROM_STEM = "file stem"

REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")  # kohya's `N_name` folder
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class CaptionConfig:
    """Caption augmentation of one subset."""

    dropout: float = 0.0  # probability of training on the empty caption (for CFG)
    shuffle_tags: bool = False  # shuffle the tags after the first `keep_tags`
    keep_tags: int = 0  # leading tags kept in place (e.g. the trigger word)
    separator: str = ","
    tag_dropout: float = 0.0  # probability of dropping each tag after the first `keep_tags`
    prefix: str = ""  # put before every caption (kohya caption_prefix), joined with a space
    suffix: str = ""  # put after every caption, joined with a space

    @classmethod
    def tags(cls, keep_tags: int = 1, dropout: float = 0.0) -> CaptionConfig:
        return cls(dropout=dropout, shuffle_tags=True, keep_tags=keep_tags)

    @property
    def varies(self) -> bool:
        """True when the caption text changes per step beyond dropout to "" (no text caching)."""
        return self.shuffle_tags or self.tag_dropout > 0

    def fixed(self, caption: str) -> str:
        """The caption with prefix and suffix: what trains when no random choice changes it."""
        return " ".join(part for part in (self.prefix, caption, self.suffix) if part)


def process_caption(caption: str, cfg: CaptionConfig, generator: torch.Generator | None) -> str:
    """Add prefix/suffix, then dropout, tag shuffle, tag dropout, keeping the first `keep_tags`.

    Draws from `generator`, in order: one number if `cfg.dropout` > 0, a permutation if
    `cfg.shuffle_tags`, one number per shuffled tag if `cfg.tag_dropout` > 0.
    """
    caption = cfg.fixed(caption)
    if cfg.dropout > 0 and float(torch.rand((), generator=generator)) < cfg.dropout:
        return ""
    if not cfg.varies:
        return caption
    tags = [t.strip() for t in caption.split(cfg.separator)]
    tags = [t for t in tags if t]
    head, tail = tags[: cfg.keep_tags], tags[cfg.keep_tags :]
    if cfg.shuffle_tags:
        tail = [tail[j] for j in torch.randperm(len(tail), generator=generator).tolist()]
    if cfg.tag_dropout > 0:
        kept = (torch.rand(len(tail), generator=generator) >= cfg.tag_dropout).tolist()
        tail = [t for t, keep in zip(tail, kept) if keep]
    return f"{cfg.separator} ".join(head + tail)


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


def kohya_folder(relative_dir: Path) -> tuple[int, str] | None:
    """(repeats, name) of the nearest `N_name` folder in `relative_dir` (below the root), or None."""
    for part in reversed(relative_dir.parts):
        match = REPEATS_DIR.match(part)
        if match:
            return int(match.group(1)), match.group(2)
    return None


def metadata_caption(path: Path, root: Path, metadata: dict[Path, dict[str, str]]) -> str:
    """Caption from the nearest metadata.jsonl above `path` that lists it, else ""."""
    for folder in (path.parent, *path.parent.parents):
        if folder in metadata:
            caption = metadata[folder].get(os.path.normpath(path.relative_to(folder)))
            if caption is not None:
                return caption
        if folder == root:
            break
    return ""


def find_caption(
    path: Path,
    root: Path,
    caption_ext: str,
    metadata: dict[Path, dict[str, str]],
    default_caption: str | None,
) -> tuple[str, str, str | None]:
    """(caption, source, warning or None) of the image at `path` by the rules in the module doc."""
    caption_file = path.with_name(path.stem + caption_ext)
    if caption_file.is_file():
        caption, problem = read_caption_file(caption_file)
        if caption:
            return caption, FROM_FILE, problem
    caption = metadata_caption(path, root, metadata)
    if caption:
        return caption, FROM_METADATA, None
    folder = kohya_folder(path.parent.relative_to(root))
    if folder is not None and folder[1].strip():
        return folder[1].strip(), FROM_FOLDER, None
    if default_caption is not None:
        return default_caption, FROM_DEFAULT, None
    return path.stem, FROM_STEM, None
