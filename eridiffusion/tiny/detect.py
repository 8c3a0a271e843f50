"""Which shape and which colours an image of `tiny.shapes` shows: the demo's concept score.

Deterministic, no learning, no human:
1. background = the palette colour nearest to the median of the 2-pixel border;
2. foreground colour = the palette colour (not the background) nearest to the median of the
   pixels far from the background (> `FAR` in RGB 0–255);
3. coverage of each pixel = its projection on the background → foreground line; the shape is the
   largest 8-connected region of coverage > 0.5;
4. shape = the `shapes.template` (the renderer's own shape filling its box) with the highest
   soft IoU against the region's coverage cropped to its bounding box and resized to 32×32;
   below `MIN_IOU`, or a region under `MIN_AREA` of the image, the shape is None. A region at
   least `BAR_ASPECT` times wider than high is a bar when it fills `MIN_IOU` of its bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eridiffusion.tiny.shapes import COLOUR_NAMES, PALETTE, SHAPES, template

FAR = 60.0  # RGB distance from the background above which a pixel counts as foreground
MIN_AREA = 0.01  # smallest shape, as a fraction of the image
MIN_IOU = 0.6  # weakest template match still called a shape
N = 32  # template side
BAR_ASPECT = 2.0  # a region this much wider than high is a bar (every other shape fills a square box)


@dataclass(frozen=True)
class Detection:
    shape: str | None
    fg: str | None
    bg: str
    iou: float = 0.0  # soft IoU of the best template


def _nearest(rgb: torch.Tensor, exclude: int | None = None) -> int:
    d = ((PALETTE * 255 - rgb) ** 2).sum(1)  # (8,)
    if exclude is not None:
        d[exclude] = float("inf")
    return int(d.argmin())


def _largest_region(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected component of a bool mask (H, W), by max-label propagation."""
    h, w = mask.shape
    labels = torch.where(mask, torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w), torch.zeros(()))
    while True:
        grown = F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    ids, counts = labels[mask].unique(return_counts=True)
    return labels == ids[counts.argmax()] if len(ids) else mask


def detect(image: Image.Image | np.ndarray) -> Detection:
    """Shape, foreground and background colour names of one RGB image."""
    x = torch.from_numpy(np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).copy()).float()
    border = torch.cat([x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3), x[:, -2:].reshape(-1, 3)])
    bg_i = _nearest(border.median(0).values)
    bg = PALETTE[bg_i] * 255
    far = (x - bg).norm(dim=-1) > FAR  # (H, W)
    if far.sum() < MIN_AREA * far.numel():
        return Detection(None, None, COLOUR_NAMES[bg_i])
    fg_i = _nearest(x[far].median(0).values, exclude=bg_i)
    fg = PALETTE[fg_i] * 255
    line = fg - bg
    cover = (((x - bg) @ line) / (line @ line)).clamp(0, 1)  # (H, W), 0 background … 1 foreground
    region = _largest_region(cover > 0.5)
    if region.sum() < MIN_AREA * region.numel():
        return Detection(None, COLOUR_NAMES[fg_i], COLOUR_NAMES[bg_i])
    rows, cols = region.any(1).nonzero().squeeze(1), region.any(0).nonzero().squeeze(1)
    crop = (cover * region)[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if crop.shape[1] >= BAR_ASPECT * crop.shape[0]:  # much wider than high: only a bar is (its IoU: the fill)
        fill = float(crop.mean())
        return Detection("bar" if fill >= MIN_IOU else None, COLOUR_NAMES[fg_i], COLOUR_NAMES[bg_i], fill)
    crop = F.interpolate(crop[None, None], size=(N, N), mode="area")[0, 0]  # (32, 32)
    ious = {s: float(torch.minimum(crop, template(s, N)).sum() / torch.maximum(crop, template(s, N)).sum())
            for s in SHAPES if s != "bar"}  # fmt: skip
    best = max(ious, key=ious.get)
    shape = best if ious[best] >= MIN_IOU else None
    return Detection(shape, COLOUR_NAMES[fg_i], COLOUR_NAMES[bg_i], ious[best])
