"""A small captioned dataset drawn procedurally: coloured shapes on coloured backgrounds.

Used by `eri demo` and the training tests, so they need no downloads. Each image gets a
same-stem `.txt` caption such as "a red circle on a blue background"; images come in two
aspect ratios (square and 3:2 landscape) so aspect bucketing is exercised.
"""

from __future__ import annotations

import os
import random

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_dataset(folder: str | os.PathLike, n: int = 12, size: int = 128, seed: int = 0) -> list[str]:
    """Write `n` images (half `size`², half 1.5·`size` × `size`) with captions; return the captions."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    names = list(COLOURS)
    captions = []
    for i in range(n):
        width = size if i % 2 == 0 else size * 3 // 2
        shape = SHAPES[i % len(SHAPES)]
        fg, bg = rng.sample(names, 2)
        img = Image.new("RGB", (width, size), COLOURS[bg])
        side = rng.randint(size // 3, size * 2 // 3)
        x0 = rng.randint(0, width - side)
        y0 = rng.randint(0, size - side)
        _draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), COLOURS[fg])
        caption = f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background"
        stem = os.path.join(folder, f"shape_{i:03d}")
        img.save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(caption + "\n")
        captions.append(caption)
    return captions
