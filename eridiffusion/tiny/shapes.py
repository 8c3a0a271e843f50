"""Coloured shapes on coloured backgrounds, rasterised in torch: the tiny model's training data.

One renderer serves the GPU training of the shipped model (`tools/train_tiny.py`, batches drawn
on the device), the demo's concept images and the detector's templates (`tiny/detect.py`), so
all three agree on what "a star" looks like. A shape fills a square box of side `side` at
(`left`, `top`); edges are anti-aliased by 4×4 supersampling. Captions read
"a red circle on a blue background".

The base model is trained on `BASE_SHAPES`; "star", "heart", "ring" (a disc with a hole) and
"bar" (a horizontal band, three times as wide as high) are held out: the model never saw them or
their words, so the demo can teach one.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from eridiffusion.tiny.dataset import COLOURS

COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle", "diamond", "star", "heart", "ring", "bar")
BASE_SHAPES = SHAPES[:4]  # what the shipped model was trained on
PALETTE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32) / 255  # (8, 3)


@dataclass(frozen=True)
class Spec:
    """One image: `shape` in `fg` on `bg`, its box `side` pixels wide at (`left`, `top`)."""

    shape: str
    fg: str
    bg: str
    left: int
    top: int
    side: int

    @property
    def caption(self) -> str:
        return caption(self.shape, self.fg, self.bg)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shape: str, fg: str, bg: str) -> str:
    return f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background"


def random_specs(n: int, rng: random.Random, shapes=BASE_SHAPES, colours=COLOUR_NAMES, size: int = 128) -> list[Spec]:
    """`n` specs: uniform shape, two distinct colours, side in [size/3, 2·size/3], box inside the image."""
    specs = []
    for _ in range(n):
        fg, bg = rng.sample(list(colours), 2)
        side = rng.randint(size // 3, size * 2 // 3)
        specs.append(Spec(rng.choice(list(shapes)), fg, bg, rng.randint(0, size - side), rng.randint(0, size - side), side))
    return specs


# -- inside tests in the unit box [0, 1]² (u right, v down) ---------------------------------
def _star_vertices() -> Tensor:
    """A five-pointed star, point up, inner radius 0.4 of the outer, stretched to fill [0, 1]²."""
    angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    pts = torch.tensor([[math.cos(a) * (1 if k % 2 == 0 else 0.4), math.sin(a) * (1 if k % 2 == 0 else 0.4)]
                        for k, a in enumerate(angles)], dtype=torch.float64)  # fmt: skip
    lo, hi = pts.min(0).values, pts.max(0).values
    return ((pts - lo) / (hi - lo)).float()  # (10, 2)


POLYGONS = {
    "triangle": torch.tensor([[0.5, 0.0], [1.0, 1.0], [0.0, 1.0]]),
    "diamond": torch.tensor([[0.5, 0.0], [1.0, 0.5], [0.5, 1.0], [0.0, 0.5]]),
    "star": _star_vertices(),
}
RING_HOLE = 0.6  # a ring's hole: radius 0.6 of the outer (a ring covers 64% of its disc)
_HEART_X, _HEART_Y = 1.139, (-1.0, 1.236)  # extent of (x² + y² − 1)³ ≤ x² y³ (numerical)


def _in_polygon(u: Tensor, v: Tensor, poly: Tensor) -> Tensor:
    """Even-odd crossing test of points (u, v) against the polygon's vertices (K, 2)."""
    inside = torch.zeros_like(u, dtype=torch.bool)
    poly = poly.to(u.device)
    for k in range(poly.shape[0]):
        (x0, y0), (x1, y1) = poly[k - 1].tolist(), poly[k].tolist()
        if y0 == y1:
            continue
        crosses = ((y0 > v) != (y1 > v)) & (u < (x1 - x0) * (v - y0) / (y1 - y0) + x0)
        inside ^= crosses
    return inside


def inside(shape: str, u: Tensor, v: Tensor) -> Tensor:
    """Whether unit-box points (u, v) lie in `shape` (bool, u's shape)."""
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "ring":
        r2 = (u - 0.5) ** 2 + (v - 0.5) ** 2
        return (r2 <= 0.25) & (r2 > 0.25 * RING_HOLE**2)
    if shape == "square":
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "bar":  # a horizontal band, a third of its box high: the one shape not filling a square
        return (u >= 0) & (u <= 1) & (v >= 1 / 3) & (v <= 2 / 3)
    if shape == "heart":
        x = (u * 2 - 1) * _HEART_X
        y = _HEART_Y[1] - v * (_HEART_Y[1] - _HEART_Y[0])  # y up
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if shape in POLYGONS:
        return _in_polygon(u, v, POLYGONS[shape])
    raise ValueError(f"shape {shape!r} is unknown: use one of {', '.join(SHAPES)}")


# -- rendering ------------------------------------------------------------------------------
def render(specs: list[Spec], size: int = 128, device: torch.device | str = "cpu", ss: int = 4) -> Tensor:
    """Images (B, 3, size, size) in [0, 1] for `specs`, anti-aliased by ss×ss supersampling."""
    n, hs = len(specs), size * ss
    grid = (torch.arange(hs, device=device, dtype=torch.float32) + 0.5) / ss  # pixel units
    box = torch.tensor([[s.left, s.top, s.side] for s in specs], device=device, dtype=torch.float32)  # (B, 3)
    u = (grid.view(1, 1, hs) - box[:, 0, None, None]) / box[:, 2, None, None]  # (B, 1, hs)
    v = (grid.view(1, hs, 1) - box[:, 1, None, None]) / box[:, 2, None, None]  # (B, hs, 1)
    u, v = u.expand(n, hs, hs), v.expand(n, hs, hs)
    mask = torch.zeros(n, hs, hs, device=device)
    for shape in set(s.shape for s in specs):
        rows = torch.tensor([s.shape == shape for s in specs], device=device)
        idx = rows.nonzero().squeeze(1)
        box_in = (u[idx] >= 0) & (u[idx] <= 1) & (v[idx] >= 0) & (v[idx] <= 1)
        mask[idx] = (inside(shape, u[idx], v[idx]) & box_in).float()
    alpha = F.avg_pool2d(mask[:, None], ss)  # (B, 1, size, size)
    palette = PALETTE.to(device)
    fg = palette[[COLOUR_NAMES.index(s.fg) for s in specs]][:, :, None, None]  # (B, 3, 1, 1)
    bg = palette[[COLOUR_NAMES.index(s.bg) for s in specs]][:, :, None, None]
    return alpha * fg + (1 - alpha) * bg


def to_pil(images: Tensor) -> list[Image.Image]:
    pixels = images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p, "RGB") for p in pixels]


@cache
def template(shape: str, n: int = 32) -> Tensor:
    """The shape filling an n×n box: coverage (n, n) in [0, 1], the detector's reference."""
    return render([Spec(shape, "white", "black", 0, 0, n)], size=n, ss=8)[0, 0]


def write_images(folder: str | os.PathLike, specs: list[Spec], size: int = 128) -> list[str]:
    """Write `shape_NNN.png` + same-stem `.txt` caption per spec into `folder`; return the captions."""
    os.makedirs(folder, exist_ok=True)
    for i, (spec, image) in enumerate(zip(specs, to_pil(render(specs, size)))):
        stem = os.path.join(folder, f"shape_{i:03d}")
        image.save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(spec.caption + "\n")
    return [s.caption for s in specs]
