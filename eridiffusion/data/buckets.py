"""Aspect-ratio buckets, the per-image crop / flip transform and the bucket batch sampler.

Buckets follow NovelAI's aspect-ratio bucketing as implemented in kohya sd-scripts
(`library/model_util.py: make_bucket_resolutions`): for every width on a `step` grid the
tallest height that keeps width·height ≤ target area, mirrored, plus the square. An image
goes to the bucket whose aspect ratio is closest (in log space, so 2:1 and 1:2 are equally
far from 1:1), is resized to cover it and cropped to it.

SDXL micro-conditioning (Podell et al. 2023, §2.2; sgm `ConcatTimestepEmbedderND` inputs
`original_size_as_tuple`, `crop_coords_top_left`, `target_size_as_tuple`):
`time_ids = [orig_h, orig_w, crop_top, crop_left, target_h, target_w]` with the original size
after EXIF transpose and the crop's top-left corner in the *resized* image. When the image
is flipped the reported `crop_left` is the crop's position in the flipped image
(`resized_w - crop_left - target_w`), as diffusers' SDXL script (flip, then crop) and kohya's
flip handling of `crop_ltrb` both intend.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

Bucket = tuple[int, int]  # (height, width)

CROP_MODES = ("center", "random")


@dataclass(frozen=True)
class BucketConfig:
    """Bucket grid: sides are multiples of `step` in [min_side, max_side], area ≤ resolution²."""

    resolution: int  # target area is resolution²
    step: int = 64
    min_side: int = 256
    max_side: int = 2048

    @classmethod
    def sdxl(cls) -> BucketConfig:
        return cls(resolution=1024, step=64, min_side=512, max_side=2048)

    @classmethod
    def sd15(cls) -> BucketConfig:
        return cls(resolution=512, step=64, min_side=256, max_side=1024)

    @classmethod
    def tiny(cls) -> BucketConfig:
        return cls(resolution=128, step=64, min_side=64, max_side=256)

    def __post_init__(self):
        if self.step <= 0 or self.min_side % self.step or self.max_side % self.step:
            raise ValueError(
                f"bucket min_side={self.min_side} and max_side={self.max_side} must be multiples "
                f"of step={self.step}; pick sides on the step grid"
            )
        if not self.min_side <= self.resolution <= self.max_side:
            raise ValueError(
                f"bucket resolution={self.resolution} must lie in [min_side={self.min_side}, "
                f"max_side={self.max_side}]; widen the side limits"
            )


def make_buckets(cfg: BucketConfig) -> list[Bucket]:
    """All (height, width) buckets of `cfg`, sorted; each side a multiple of `cfg.step`."""
    area = cfg.resolution * cfg.resolution
    square = cfg.resolution // cfg.step * cfg.step
    buckets = {(square, square)}
    for w in range(cfg.min_side, cfg.max_side + 1, cfg.step):
        h = min(cfg.max_side, area // w // cfg.step * cfg.step)
        if h >= cfg.min_side:
            buckets.add((h, w))
            buckets.add((w, h))
    return sorted(buckets)


def assign_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """Bucket of closest aspect ratio, |log(h/w) − log(bh/bw)|; ties go to the larger area."""
    log_ar = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ar), -b[0] * b[1]))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → (3, H, W) float32 in [-1, 1]."""
    # In numpy: its strided uint8 → float32 copy is ~10× faster than torch's on CPU.
    pixels = np.asarray(image).transpose(2, 0, 1).astype(np.float32, order="C")  # (3, H, W)
    pixels /= 127.5
    pixels -= 1.0
    return torch.from_numpy(pixels)


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """(width, height) of an image scaled (up or down) to just cover `bucket`, aspect kept."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    return max(bw, round(width * scale)), max(bh, round(height * scale))


def resize_crop_flip(image: Image.Image, bucket: Bucket, top: int, left: int, flip: bool) -> Image.Image:
    """Resize `image` to `cover_size`, cut the bucket at (top, left) of the resized image, maybe
    mirror it. The one geometry of `bucket_transform`, applied alike to pixels and masks."""
    bh, bw = bucket
    rw, rh = cover_size(*image.size, bucket)
    if (rw, rh) != image.size:
        # reducing_gap: box-reduce by an integer factor first, then Lanczos (fast on big photos)
        image = image.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    image = image.crop((left, top, left + bw, top + bh))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def bucket_transform(
    image: Image.Image,
    bucket: Bucket,
    crop: str = "center",
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Resize `image` (RGB, already EXIF-transposed) to cover `bucket`, crop and maybe flip it.

    `crop` is "center" or "random" (offset drawn from `generator`: top, then left); `flip`
    mirrors left-right. Returns pixels (3, bh, bw) in [-1, 1], `time_ids` (6,) float32
    [orig_h, orig_w, crop_top, crop_left, target_h, target_w] and the crop (top, left) in the
    resized, unflipped image (give it to `resize_crop_flip` to cut a mask the same way).
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop={crop!r} is not one of {CROP_MODES}; use 'center' or 'random'")
    bh, bw = bucket
    w, h = image.size
    rw, rh = cover_size(w, h, bucket)
    if crop == "random":
        top = int(torch.randint(0, rh - bh + 1, (1,), generator=generator))
        left = int(torch.randint(0, rw - bw + 1, (1,), generator=generator))
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    image = resize_crop_flip(image, bucket, top, left, flip)
    shown_left = rw - left - bw if flip else left
    time_ids = torch.tensor([h, w, top, shown_left, bh, bw], dtype=torch.float32)
    return to_pixels(image), time_ids, (top, left)


class BucketBatchSampler:
    """Batches that never mix buckets; deterministic per (seed, epoch); rank-split; resumable.

    Item `i` appears `repeats[i]` times per epoch (1 if `repeats` is None). Per epoch: shuffle
    each bucket's samples, cut them into batches (a bucket's last batch is shorter, or dropped
    with `drop_last`), shuffle the batch order, then rank `r` takes batches `r, r+W, r+2W, …`:
    whole batches, every sample on exactly one rank. When the batch count is not a multiple of
    W the first ranks get one batch more; `drop_last=True` also trims the batch list to a
    multiple of W so that all ranks take the same number of steps (needed by DDP).

    Iterating advances `position`; finishing the epoch moves to the next one. `state_dict()`
    counts batches *handed out*: a DataLoader with workers prefetches, so a trainer that saves
    mid-epoch should store its own count of consumed batches as `position`.
    """

    def __init__(
        self,
        bucket_of_each_item: Sequence[Hashable],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        repeats: Sequence[int] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if repeats is not None and len(repeats) != len(bucket_of_each_item):
            raise ValueError(
                f"repeats has {len(repeats)} entries for {len(bucket_of_each_item)} items; give one per item"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        groups: dict[Hashable, list[int]] = {}
        for i, bucket in enumerate(bucket_of_each_item):
            groups.setdefault(bucket, []).extend([i] * (1 if repeats is None else int(repeats[i])))
        # Sorted by first item so the order does not depend on bucket hashing.
        self._groups = sorted((g for g in groups.values() if g), key=lambda g: g[0])

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, a pure function of (seed, epoch, rank)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
        batches: list[list[int]] = []
        for samples in self._groups:
            if self.shuffle:
                samples = [samples[j] for j in torch.randperm(len(samples), generator=g).tolist()]
            for start in range(0, len(samples), self.batch_size):
                batch = samples[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        if self.drop_last:
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches[self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch."""
        return len(self._epoch_batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Go to `epoch`; the position is kept only if it is the current epoch (resume)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(
                f"sampler state was saved with seed={state['seed']} but this run uses seed={self.seed}; "
                "resume with the same seed"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
