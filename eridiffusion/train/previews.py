"""Preview grids during training, as kohya's `sample_images_common` renders them.

    sample.prompts + sample.prompt_file ─► PromptSpec per row (kohya options: prompts.py)
    row = one prompt × (its --d seed, or every sample.seeds) ─► Pipeline.generate
    rows ─► labelled grid (prompt above the row, seed under each image) ─► samples/step{N:06d}.png

When: `sample.at_start` (step 0), every `sample.every_n_steps`, at the end of every
`sample.every_n_epochs`-th epoch, and at the last step. The sampler's callback checks the stop
flag at each sampler step, so Ctrl-C (SIGINT / SIGTERM) ends a preview at once; the run then
saves and exits as after any step. Uses its own CPU generators only: the training RNG streams
are untouched.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from eridiffusion import checkpoint
from eridiffusion.config import SampleConfig
from eridiffusion.errors import PipelineError
from eridiffusion.io import atomic_write
from eridiffusion.pipeline import Pipeline
from eridiffusion.prompts import PromptSpec, parse_prompt, read_prompt_file


class PreviewStopped(Exception):
    """Raised from the sampler's callback when a stop signal arrives mid-preview."""


@dataclass(frozen=True)
class Row:
    """One grid row: a prompt with every setting resolved against `[sample]`."""

    prompt: str
    negative: str
    size: tuple[int, int]  # width, height
    steps: int
    cfg: float
    sampler: str
    seeds: tuple[int, ...]

    @classmethod
    def of(cls, spec: PromptSpec, c: SampleConfig) -> Row:
        seeds = (spec.seed,) if spec.seed is not None else tuple(c.seeds) or (0,)
        size = (spec.width or c.size[0], spec.height or c.size[1])
        return cls(spec.prompt, c.negative if spec.negative is None else spec.negative, size,
                   spec.steps or c.steps, c.cfg if spec.cfg is None else spec.cfg, spec.sampler or c.sampler, seeds)  # fmt: skip


def load_prompts(c: SampleConfig) -> list[PromptSpec]:
    """`sample.prompts` then the prompts of `sample.prompt_file`."""
    specs = [parse_prompt(p, f"sample.prompts[{j}]") for j, p in enumerate(c.prompts)]
    return specs + (read_prompt_file(c.prompt_file) if c.prompt_file else [])


def wanted(c: SampleConfig) -> bool:
    """Does `[sample]` ask for any preview?"""
    return bool((c.prompts or c.prompt_file) and (c.every_n_steps or c.every_n_epochs or c.at_start))


def label_grid(rows: list[tuple[str, list[tuple[Image.Image, str]]]]) -> Image.Image:
    """Rows of (label, [(image, caption)]) → one image: each row's label (wrapped, at most three
    lines) above it, each image's caption under it, in PIL's default font on white."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 4
    char_w = max(1.0, probe.textlength("abcdefghij", font=font) / 10)
    width = max(sum(im.width for im, _ in cells) for _, cells in rows)
    per_line = max(8, int((width - 8) / char_w))
    layout, height = [], 0
    for label, cells in rows:
        lines = textwrap.wrap(label, per_line) or [""]
        if len(lines) > 3:
            lines = lines[:2] + [textwrap.shorten(" ".join(lines[2:]), per_line, placeholder=" …")]
        row_h = len(lines) * line_h + 4 + max(im.height for im, _ in cells) + line_h
        layout.append((lines, cells, height))
        height += row_h
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for lines, cells, top in layout:
        for k, line in enumerate(lines):
            draw.text((4, top + 2 + k * line_h), line, fill="black", font=font)
        y, x = top + len(lines) * line_h + 4, 0
        for im, caption in cells:
            grid.paste(im, (x, y))
            draw.text((x + 4, y + im.height + 2), caption, fill="black", font=font)
            x += im.width
    return grid


class Previews:
    """Labelled preview grids: every prompt a row, to `out_dir/samples/step{N:06d}.png`.

    Build it before the trainer frees the VAE / text encoders: it keeps the VAE, and with
    `encode_now=True` (text encoders not trained) encodes the prompts once and drops the text
    encoders, so they can be freed; otherwise it re-encodes each call (their LoRA changes).
    """

    def __init__(self, components: checkpoint.Components, cfg: SampleConfig, out_dir: str | os.PathLike,
                 encode_now: bool = False, **options):  # fmt: skip
        """`options`: Pipeline's (`prediction`, `zero_terminal_snr`, `max_tokens`)."""
        self.cfg = cfg
        self.rows = [Row.of(spec, cfg) for spec in load_prompts(cfg)]
        self.pipe = Pipeline(components, **options)
        for row in self.rows:  # at start-up, not at the first preview mid-run
            try:
                self.pipe.check_size(row.size)
            except PipelineError as e:
                raise PipelineError(f"sample: {row.prompt!r}: {e}") from None
        self.folder = Path(out_dir) / "samples"
        self.text: list[tuple[dict[str, Tensor], dict[str, Tensor]]] | None = None
        if encode_now:
            self.text = [self.pipe.encode([r.prompt], r.negative) for r in self.rows]
            self.pipe.drop_text_encoders()

    def due(self, step: int, total: int, per_epoch: int) -> bool:
        """Is a grid due after optimizer step `step` (0: before training)?"""
        c = self.cfg
        if step == 0:
            return c.at_start
        epoch_end = step % per_epoch == 0 and c.every_n_epochs and (step // per_epoch) % c.every_n_epochs == 0
        return step == total or bool(c.every_n_steps and step % c.every_n_steps == 0) or bool(epoch_end)

    def _text(self, i: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if self.text is not None:
            return self.text[i]
        modes = [(m, m.training) for m in self.pipe.text_modules]
        try:
            for m, _ in modes:
                m.eval()
            return self.pipe.encode([self.rows[i].prompt], self.rows[i].negative)
        finally:
            for m, mode in modes:
                m.train(mode)

    def render(self, stop: Callable[[], bool] | None = None) -> Image.Image:
        """The grid; raises PreviewStopped at the next sampler step after `stop()` turns true."""

        def check(_):
            if stop is not None and stop():
                raise PreviewStopped

        rows = []
        for i, r in enumerate(self.rows):  # one prompt at a time: little memory next to training
            cond, uncond = self._text(i)
            n = len(r.seeds)
            cond = {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}
            uncond = {k: v.expand(n, *v.shape[1:]) for k, v in uncond.items()}
            images = self.pipe.generate(cond, uncond, r.seeds, r.steps, r.cfg, r.sampler, False, r.size, callback=check)
            rows.append((r.prompt, [(im, f"seed {s}") for im, s in zip(images, r.seeds)]))
        return label_grid(rows)

    def __call__(self, step: int, writer=None, stop: Callable[[], bool] | None = None) -> Path:
        """Render, write `samples/step{step:06d}.png` atomically (every row's settings in its
        `eridiffusion` PNG text), and add it to `writer` (TensorBoard / wandb) when given."""
        grid = self.render(stop)
        info = PngInfo()
        rows = [{"prompt": r.prompt, "negative": r.negative, "seeds": list(r.seeds), "sampler": r.sampler,
                 "steps": r.steps, "cfg": r.cfg, "size": list(r.size)} for r in self.rows]  # fmt: skip
        info.add_text("eridiffusion", json.dumps({"step": step, "rows": rows}, ensure_ascii=False))
        path = self.folder / f"step{step:06d}.png"
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG", pnginfo=info))
        if writer is not None:
            import numpy as np

            writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        return path

    def during_training(self, step: int, opt, writer, bar, stop_flag: Callable[[], bool], log) -> None:
        """A grid with the optimizer's evaluation weights, the progress bar saying so; a stop
        signal ends it at once (no file) and the loop then stops as after any step."""
        bar.set_description("rendering previews")
        try:
            with opt.eval_mode():
                self(step, writer, stop_flag)
        except PreviewStopped:
            log(f"preview at step {step} stopped")
        finally:
            bar.set_description("train")
