"""Image-folder datasets: subsets, the scan and its report, regularization balance, per-item loading.

Folder layout follows kohya sd-scripts (`library/train_util.py`, DreamBooth style): images
anywhere below a subset's folder, a subfolder named `N_name` repeats its images N times per
epoch (the nearest such folder wins) and names their class (`captions.find_caption`). A run
reads one or more subsets (`[[data.subsets]]`, `build_datasets`), each with its own options;
items of all subsets are bucketed together by (height, width), so a batch never mixes
buckets but may mix subsets.

Regularization (prior-preservation) subsets are balanced as kohya's `DreamBoothDataset`
does (train_util.py at commit 48d368f, end of `__init__`): with N = the train images' samples
per epoch (images × repeats), reg images are taken in order with their own repeats until N is
reached (later ones unused) or, when all of them fall short, each gets one more repeat in turn
until the reg samples reach N. Reg items carry `data.prior_loss_weight` as their loss weight.

Scanning reads image headers (size, EXIF orientation, alpha) plus, with `verify=True`, a cheap
integrity pass so that truncated files are reported before training instead of hours in.
Every file not used is in `report.skipped` (images) or `report.ignored` (other files), with
its reason; `report.write(path)` lists them all.

Random draws per sample come from one generator, in this order (`ImageDataset.augment`, then
the crop): flip, caption dropout, tag order, tag dropout, then the random-crop offsets. The
trainer that reads cached latents calls `augment` alone and draws the same flip and caption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eridiffusion.data.buckets import (
    CROP_MODES,
    Bucket,
    BucketConfig,
    assign_bucket,
    bucket_transform,
    make_buckets,
    resize_crop_flip,
)
from eridiffusion.data.cache import file_digest
from eridiffusion.runs import holds_run
from eridiffusion.data.captions import (  # noqa: F401  (re-exported: the dataset API)
    FROM_DEFAULT,
    FROM_FILE,
    FROM_FOLDER,
    FROM_METADATA,
    FROM_STEM,
    CaptionConfig,
    find_caption,
    kohya_folder,
    process_caption,
    read_caption_file,
    read_metadata,
)
from eridiffusion.data.images import (  # noqa: F401  (re-exported: the dataset API)
    IMAGE_EXTENSIONS,
    MASK_FOLDER,
    MASK_SUFFIX,
    MAX_IMAGE_PIXELS,
    SKIP_BOMB,
    SKIP_CORRUPT,
    SKIP_EMPTY,
    SKIP_NOT_IMAGE,
    SKIP_UNSUPPORTED,
    ImageLoadError,
    Skip,
    find_mask,
    is_image_name,
    list_masks,
    open_image,
    open_mask,
    open_rgb,
    probe,
    to_rgb,
)
from eridiffusion.errors import DatasetError
from eridiffusion.io import write_text

SKIP_TOO_SMALL = "smaller than the smallest bucket"
SKIP_ZERO_REPEATS = "in a 0_ folder (0 repeats)"
SKIP_BAD_MASK = "its mask file is unreadable"
SKIP_REG_UNUSED = "regularization image not needed (more reg than train samples per epoch)"
IGNORE_NOT_IMAGE = "not an image file type"
IGNORE_ORPHAN = "caption or mask without its image"
IGNORE_HIDDEN = "hidden"
IGNORE_EXCLUDED = "excluded folder (e.g. the run's output folder)"


@dataclass(frozen=True)
class Subset:
    """One folder and how its images are read and augmented (a `[[data.subsets]]` table)."""

    folder: Path
    buckets: BucketConfig | None = None  # None: not scanned here (ImageDataset built by hand)
    repeats: int = 1  # for images outside `N_name` folders
    captions: CaptionConfig = CaptionConfig()
    caption_ext: str = ".txt"
    default_caption: str | None = None
    crop: str = "center"
    flip: bool = False
    is_reg: bool = False
    loss_weight: float = 1.0  # data.prior_loss_weight for reg subsets
    upscale_small: bool = True  # images below the smallest bucket side are upscaled, else skipped
    alpha_mask: bool = False  # an image without a mask file uses its alpha channel as mask

    def __post_init__(self):
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop={self.crop!r} is not one of {CROP_MODES}; use 'center' or 'random'")

    @classmethod
    def from_config(cls, s, bucket_step: int, prior_loss_weight: float = 1.0) -> Subset:
        """From a resolved `config.SubsetConfig` (`DataConfig.resolved_subsets()`)."""
        return cls(
            folder=Path(s.dir),
            buckets=BucketConfig(resolution=s.resolution, step=bucket_step, min_side=s.bucket_min,
                                 max_side=s.bucket_max),  # fmt: skip
            repeats=s.repeats,
            captions=CaptionConfig(dropout=s.caption_dropout, shuffle_tags=s.shuffle_tags, keep_tags=s.keep_tags,
                                   tag_dropout=s.tag_dropout, prefix=s.caption_prefix, suffix=s.caption_suffix),
            caption_ext=s.caption_ext,
            default_caption=s.default_caption or None,
            crop="random" if s.random_crop else "center",
            flip=s.flip,
            is_reg=s.is_reg,
            loss_weight=prior_loss_weight if s.is_reg else 1.0,
            upscale_small=s.upscale_small,
            alpha_mask=s.alpha_mask,
        )


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str  # as found, before prefix / suffix / augmentation
    repeats: int  # samples per epoch (reg items: after balancing)
    bucket: Bucket  # (height, width)
    size: tuple[int, int]  # (height, width) after EXIF orientation
    subset: int = 0  # index into dataset.subsets
    caption_source: str = FROM_FILE
    mask: Path | None = None  # mask file
    alpha_mask: bool = False  # the mask is the image's alpha channel
    is_reg: bool = False
    loss_weight: float = 1.0


@dataclass
class ScanReport:
    """What a scan found; `str()` is a short summary for the console, `write()` the full list."""

    folder: Path  # the first subset's folder
    folders: list[Path] = field(default_factory=list)
    used: int = 0
    samples: int = 0  # images × repeats: samples per epoch
    reg_used: int = 0
    reg_samples: int = 0
    skipped: dict[str, list[Path]] = field(default_factory=dict)  # image files not used
    ignored: dict[str, list[Path]] = field(default_factory=dict)  # other files / folders not read
    upscaled: list[Path] = field(default_factory=list)
    caption_sources: Counter = field(default_factory=Counter)  # FROM_* → images
    captions_defaulted: int = 0  # images captioned by the default caption or their file stem
    default_source: str = FROM_STEM  # or FROM_DEFAULT (of the first subset)
    masks: Counter = field(default_factory=Counter)  # "file" / "alpha" → images
    warnings: list[str] = field(default_factory=list)
    bucket_counts: dict[Bucket, int] = field(default_factory=dict)

    @property
    def skipped_counts(self) -> dict[str, int]:
        return {reason: len(paths) for reason, paths in sorted(self.skipped.items())}

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(path)

    def ignore(self, path: Path, reason: str) -> None:
        self.ignored.setdefault(reason, []).append(path)

    def __str__(self) -> str:
        n_skipped = sum(self.skipped_counts.values())
        where = ", ".join(map(str, self.folders or [self.folder]))
        reg = f": {self.samples - self.reg_samples} train + {self.reg_samples} regularization" if self.reg_used else ""
        lines = [f"{where}: {self.used} images used ({self.samples} samples per epoch{reg}), {n_skipped} skipped"]
        if n_skipped:
            first = [p.name for p in sorted(p for paths in self.skipped.values() for p in paths)[:3]]
            lines.append("  skipped: " + ", ".join(f"{n} {r}" for r, n in self.skipped_counts.items())
                         + f" (first: {', '.join(first)}; all in dataset_report.txt)")  # fmt: skip
        n_ignored = sum(len(p) for p in self.ignored.values())
        if n_ignored:
            first = [p.name for p in sorted(p for paths in self.ignored.values() for p in paths)[:3]]
            lines.append(f"  ignored: {n_ignored} other files or folders (first: {', '.join(first)})")
        if self.upscaled:
            lines.append(f"  upscaled: {len(self.upscaled)} images smaller than the smallest bucket")
        if self.caption_sources:
            counts = ", ".join(f"{n} {src}" for src, n in self.caption_sources.most_common())
            lines.append(f"  captions: {counts}")
        if self.masks:
            lines.append("  masks: " + ", ".join(f"{n} from {how}" for how, n in sorted(self.masks.items())))
        if self.bucket_counts:
            lines.append(
                "  buckets (h×w): " + ", ".join(f"{h}×{w}: {n}" for (h, w), n in sorted(self.bucket_counts.items()))
            )
        if self.warnings:
            lines.append(f"  warnings: {len(self.warnings)}, first: {self.warnings[0]}")
        return "\n".join(lines)

    def write(self, path: str | os.PathLike) -> Path:
        """Write the summary, then every skipped, ignored and upscaled file with its reason
        (one `PATH<TAB>REASON` line each), then every warning, to `path` (atomic)."""
        lines = ["# dataset report: the summary, then each file not used (PATH<TAB>REASON)", str(self), ""]
        for title, groups in (("skipped images", self.skipped), ("ignored files and folders", self.ignored)):
            lines.append(f"## {title}: {sum(len(p) for p in groups.values())}")
            lines += [f"{p}\t{reason}" for reason, paths in sorted(groups.items()) for p in paths]
            lines.append("")
        lines.append(f"## upscaled images: {len(self.upscaled)}")
        lines += [f"{p}\t{SKIP_TOO_SMALL}, upscaled" for p in self.upscaled]
        lines += ["", f"## warnings: {len(self.warnings)}", *self.warnings, ""]
        return write_text(Path(path), "\n".join(lines))


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _under(path: Path, folders: Sequence[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def scan_subset(
    subset: Subset,
    report: ScanReport,
    index: int = 0,
    max_pixels: int = MAX_IMAGE_PIXELS,
    verify: bool = True,
    exclude: Sequence[str | os.PathLike] = (),
) -> list[Item]:
    """Usable images below `subset.folder` in sorted order; records the rest in `report`.

    Hidden files and folders, `masks/` folders, folders in `exclude` (e.g. the cache inside the
    data folder) and any run's output folder (it holds `runs.RECORD`) are not entered. An image
    is small when its shorter side is below `subset.buckets.min_side`; it is upscaled
    (`upscale_small`) or skipped. Raises DatasetError when the subset has no usable image.
    """
    root, bucket_cfg = subset.folder, subset.buckets
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found; set the data folder to a directory of images")
    buckets = make_buckets(bucket_cfg)
    excluded = [Path(e).resolve() for e in exclude]
    items: list[Item] = []
    metadata: dict[Path, dict[str, str]] = {}  # folder → its metadata.jsonl captions
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if d.startswith("."):
                report.ignore(here / d, IGNORE_HIDDEN)
            elif _under((here / d).resolve(), excluded) or holds_run(here / d):
                report.ignore(here / d, IGNORE_EXCLUDED)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != MASK_FOLDER
                             and not _under((here / d).resolve(), excluded) and not holds_run(here / d))  # fmt: skip
        if "metadata.jsonl" in filenames:
            metadata[here], problems = read_metadata(here / "metadata.jsonl")
            report.warnings.extend(problems)
        folder = kohya_folder(here.relative_to(root))
        repeats = subset.repeats if folder is None else folder[0]
        names = set(filenames)
        images = sorted(n for n in filenames if is_image_name(n))
        _ignore_others(here, filenames, {Path(n).stem for n in images}, subset.caption_ext, report)
        mask_names = list_masks(here) if images else {}
        for name in images:
            path = here / name
            if repeats == 0:
                report.skip(path, SKIP_ZERO_REPEATS)
                continue
            try:
                h, w, alpha = probe(path, max_pixels, verify)
                mask = find_mask(path, names, mask_names)
                if mask is not None:
                    _probe_mask(mask, (h, w), max_pixels, verify, report)
            except Skip as s:
                report.skip(path, s.reason)
                continue
            if min(h, w) < bucket_cfg.min_side:
                if not subset.upscale_small:
                    report.skip(path, SKIP_TOO_SMALL)
                    continue
                report.upscaled.append(path)
            caption, source, problem = find_caption(path, root, subset.caption_ext, metadata, subset.default_caption)
            if problem:
                report.warnings.append(problem)
            report.caption_sources[f"{source} ({subset.caption_ext})" if source == FROM_FILE else source] += 1
            report.captions_defaulted += source in (FROM_DEFAULT, FROM_STEM)
            alpha_mask = mask is None and subset.alpha_mask and alpha
            if mask is not None or alpha_mask:
                report.masks["alpha" if alpha_mask else "mask files"] += 1
            items.append(Item(path=path, caption=caption, repeats=repeats, bucket=assign_bucket(h, w, buckets),
                              size=(h, w), subset=index, caption_source=source, mask=mask, alpha_mask=alpha_mask,
                              is_reg=subset.is_reg, loss_weight=subset.loss_weight))  # fmt: skip
    if not items:
        mine = {r: [p for p in paths if root in p.parents] for r, paths in report.skipped.items()}
        skipped = ", ".join(f"{len(p)} {r}" for r, p in sorted(mine.items()) if p) or "no image files"
        raise DatasetError(
            f"{root}: no usable images ({skipped}); add {'/'.join(IMAGE_EXTENSIONS)} images"
            + ("" if subset.upscale_small else f" of at least {bucket_cfg.min_side} px on the short side")
        )
    return items


def _ignore_others(here: Path, filenames: list[str], stems: set[str], caption_ext: str, report: ScanReport) -> None:
    """Record the files of `here` that are neither images nor an image's caption / mask / metadata."""
    for name in sorted(filenames):
        if is_image_name(name) or name == "metadata.jsonl":
            continue
        if name.startswith("."):
            report.ignore(here / name, IGNORE_HIDDEN)
            continue
        for tail in (caption_ext, MASK_SUFFIX):
            if name.lower().endswith(tail.lower()):
                if name[: -len(tail)] not in stems:
                    report.ignore(here / name, IGNORE_ORPHAN)
                break
        else:
            report.ignore(here / name, IGNORE_NOT_IMAGE)


def _probe_mask(mask: Path, size: tuple[int, int], max_pixels: int, verify: bool, report: ScanReport) -> None:
    """Check a mask file's header (raises Skip); warn when its size differs from its image's."""
    try:
        h, w, _ = probe(mask, max_pixels, verify)
    except Skip as s:
        report.warnings.append(f"{mask}: {s.reason}; its image is skipped, fix or remove the mask")
        raise Skip(SKIP_BAD_MASK) from None
    if (h, w) != size:
        report.warnings.append(f"{mask}: {w}×{h} mask for a {size[1]}×{size[0]} image, resized to the image")


def balance_regularization(items: list[Item]) -> tuple[list[Item], list[Item]]:
    """kohya's reg repeats (module doc): (items with reg repeats set, reg items not needed)."""
    n_train = sum(it.repeats for it in items if not it.is_reg)
    reg = [j for j, it in enumerate(items) if it.is_reg]
    repeats: dict[int, int] = {}
    n, first = 0, True
    while reg and n < n_train:
        for j in reg:
            if first:
                repeats[j] = items[j].repeats
                n += items[j].repeats
            else:
                repeats[j] += 1
                n += 1
            if n >= n_train:
                break
        first = False
    used = [dataclasses.replace(it, repeats=repeats[j]) if it.is_reg else it
            for j, it in enumerate(items) if not it.is_reg or j in repeats]  # fmt: skip
    return used, [it for j, it in enumerate(items) if it.is_reg and j not in repeats]


def scan_folder(
    folder: str | os.PathLike,
    bucket_cfg: BucketConfig,
    default_caption: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    verify: bool = True,
    default_repeats: int = 1,
    **subset_options,
) -> tuple[list[Item], ScanReport]:
    """Find usable images below one `folder`; `subset_options` are further `Subset` fields
    (`caption_ext`, `upscale_small`, `alpha_mask`, ...) plus `exclude`. See `scan_subsets`."""
    exclude = subset_options.pop("exclude", ())
    subset = Subset(Path(folder), bucket_cfg, default_repeats, default_caption=default_caption, **subset_options)
    return scan_subsets([subset], max_pixels, verify, exclude)


def scan_subsets(
    subsets: Sequence[Subset],
    max_pixels: int = MAX_IMAGE_PIXELS,
    verify: bool = True,
    exclude: Sequence[str | os.PathLike] = (),
) -> tuple[list[Item], ScanReport]:
    """Scan every subset (`scan_subset`), balance the reg items; one report for all."""
    report = ScanReport(folder=subsets[0].folder, folders=[s.folder for s in subsets],
                        default_source=FROM_STEM if subsets[0].default_caption is None else FROM_DEFAULT)  # fmt: skip
    items = [it for j, s in enumerate(subsets) for it in scan_subset(s, report, j, max_pixels, verify, exclude)]
    if any(it.is_reg for it in items) and all(it.is_reg for it in items):
        raise DatasetError(f"{', '.join(map(str, report.folders))}: only regularization images; "
                           "add a subset with is_reg = false")  # fmt: skip
    items, unused = balance_regularization(items)
    for it in unused:
        report.skip(it.path, SKIP_REG_UNUSED)
    report.used = len(items)
    report.samples = sum(it.repeats for it in items)
    report.reg_used = sum(it.is_reg for it in items)
    report.reg_samples = sum(it.repeats for it in items if it.is_reg)
    report.bucket_counts = dict(Counter(it.bucket for it in items))
    return items, report


def downsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(…, H, W) mask → (…, H/factor, W/factor) by area average (the loss weight per latent pixel)."""
    h, w = mask.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"mask of {h}×{w} is not divisible by factor {factor}")
    lead = mask.shape[:-2]
    return F.avg_pool2d(mask.reshape(-1, 1, h, w), factor).reshape(*lead, h // factor, w // factor)


class ImageDataset:
    """Scanned items of one or more subsets plus the per-item transform; `load_item(i, generator)`
    gives training data and `augment(i, generator)` its random choices alone."""

    def __init__(
        self,
        items: list[Item],
        report: ScanReport,
        crop: str = "center",
        flip: bool = False,
        captions: CaptionConfig = CaptionConfig(),
        max_pixels: int = MAX_IMAGE_PIXELS,
        subsets: Sequence[Subset] | None = None,
    ):
        self.items = items
        self.report = report
        self.subsets = list(subsets or [Subset(report.folder, crop=crop, flip=flip, captions=captions)])
        self.max_pixels = max_pixels
        self._digests: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    def subset_of(self, i: int) -> Subset:
        return self.subsets[self.items[i].subset]

    def _common(self, name: str):
        values = {getattr(s, name) for s in self.subsets}
        if len(values) > 1:
            raise DatasetError(f"the {len(self.subsets)} subsets differ in {name}: use dataset.subset_of(i).{name} "
                               "or dataset.augment(i, generator)")  # fmt: skip
        return values.pop()

    @property
    def crop(self) -> str:
        """The subsets' crop mode (DatasetError when they differ; then see `subset_of(i)`)."""
        return self._common("crop")

    @property
    def flip(self) -> bool:
        """Whether the subsets flip (DatasetError when they differ; then see `subset_of(i)`)."""
        return self._common("flip")

    @property
    def captions(self) -> CaptionConfig:
        """The subsets' caption options (DatasetError when they differ; use `augment`)."""
        return self._common("captions")

    @property
    def random_crop(self) -> bool:
        """Whether any subset crops at random (then its latents cannot be cached)."""
        return any(s.crop == "random" for s in self.subsets)

    @property
    def buckets(self) -> list[Bucket]:
        return [it.bucket for it in self.items]

    @property
    def repeats(self) -> list[int]:
        return [it.repeats for it in self.items]

    @property
    def loss_weights(self) -> list[float]:
        return [it.loss_weight for it in self.items]

    def caption_set(self) -> set[str] | None:
        """Every caption a step can train on (for the text cache), or None when a subset shuffles
        or drops tags (the captions are then made per step)."""
        out: set[str] = set()
        for it in self.items:
            cfg = self.subsets[it.subset].captions
            if cfg.varies:
                return None
            out.add(cfg.fixed(it.caption))
            if cfg.dropout > 0:
                out.add("")
        return out

    def content_key(self, i: int) -> str:
        """sha256 of item i's file bytes (memoised), combined with its mask file's sha256 (or
        "alpha") when it has a mask: the content part of its cache keys."""
        if i not in self._digests:
            item = self.items[i]
            digest = file_digest(item.path)
            if item.mask is not None:
                digest = _text_digest(f"{digest}:mask:{file_digest(item.mask)}")
            elif item.alpha_mask:
                digest = _text_digest(f"{digest}:alpha")
            self._digests[i] = digest
        return self._digests[i]

    def augment(self, i: int, generator: torch.Generator | None = None, flip: bool | None = None) -> tuple[bool, str]:
        """Item i's random choices: (flip, caption). Draws from `generator`, in order: the flip
        (if its subset flips and `flip` is None), then `process_caption`'s draws. `load_item`
        calls this first; the cached-latent path calls it alone and stays in step."""
        subset, item = self.subset_of(i), self.items[i]
        if flip is None:
            flip = subset.flip and float(torch.rand((), generator=generator)) < 0.5
        return flip, process_caption(item.caption, subset.captions, generator)

    def load_item(self, i: int, generator: torch.Generator | None = None, flip: bool | None = None) -> dict:
        """Decode, bucket-crop and augment item i.

        Random draws from `generator`: `augment(i, generator, flip)`, then the crop offsets
        (random crop). `flip` forces the flip (used to cache both flips). Returns pixels
        (3, H, W) float32 in [-1, 1], caption, time_ids (6,), bucket (H, W), key (content_key),
        flipped, mask ((1, H, W) float32 in [0, 1], cut and flipped as the pixels; None without
        a mask), loss_weight, is_reg, subset.
        """
        item, subset = self.items[i], self.subset_of(i)
        flip, caption = self.augment(i, generator, flip)
        image, alpha = open_image(item.path, self.max_pixels, alpha=item.alpha_mask)
        pixels, time_ids, (top, left) = bucket_transform(image, item.bucket, subset.crop, flip, generator)
        mask = open_mask(item.mask, image.size, self.max_pixels) if item.mask is not None else alpha
        if mask is not None:
            mask = resize_crop_flip(mask, item.bucket, top, left, flip)
            mask = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]  # (1, H, W)
        return {
            "pixels": pixels,
            "caption": caption,
            "time_ids": time_ids,
            "bucket": item.bucket,
            "key": self.content_key(i),
            "flipped": flip,
            "mask": mask,
            "loss_weight": item.loss_weight,
            "is_reg": item.is_reg,
            "subset": item.subset,
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
    caption_ext: str = ".txt",
    upscale_small: bool = True,
    alpha_mask: bool = False,
    exclude: Sequence[str | os.PathLike] = (),
) -> ImageDataset:
    """Scan one `folder` and return the dataset the trainer iterates; `dataset.report` says what was found."""
    subset = Subset(Path(folder), buckets, default_repeats, captions, caption_ext, default_caption, crop, flip,
                    upscale_small=upscale_small, alpha_mask=alpha_mask)  # fmt: skip
    return build_subsets([subset], max_pixels, verify, exclude)


def build_subsets(
    subsets: Sequence[Subset],
    max_pixels: int = MAX_IMAGE_PIXELS,
    verify: bool = True,
    exclude: Sequence[str | os.PathLike] = (),
) -> ImageDataset:
    """Scan several subsets into one dataset (items of all subsets, reg repeats balanced)."""
    items, report = scan_subsets(subsets, max_pixels, verify, exclude)
    return ImageDataset(items, report, max_pixels=max_pixels, subsets=subsets)


def build_datasets(
    data_cfg, exclude: Sequence[str | os.PathLike] = (), max_pixels: int = MAX_IMAGE_PIXELS, verify: bool = True
) -> ImageDataset:
    """The dataset of a `config.DataConfig`: `data.dir` (if set) and every `[[data.subsets]]`,
    unset subset fields taken from `[data]`. `exclude`: folders not to scan (the output folder)."""
    subsets = [Subset.from_config(s, data_cfg.bucket_step, data_cfg.prior_loss_weight)
               for s in data_cfg.resolved_subsets()]  # fmt: skip
    if not subsets:
        raise DatasetError("data.dir is empty and there are no [[data.subsets]]: set data.dir=/path/to/images")
    return build_subsets(subsets, max_pixels, verify, exclude)
