"""What a run writes besides its state: loss.csv (appended at each log interval; columns
step, loss, lr, time, val_loss), loss.png, the trackers' scalars (train/trackers.py) and the
progress bar's figures."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from eridiffusion.io import atomic_write, write_text

Log = Callable[[str], None]


class RunLog:
    """The loss history ([step, loss, lr, seconds] rows, + val_loss where one was measured) of
    rank 0 and where it goes.

    `add` keeps a step's loss on the device (`add_val` its validation loss); `flush` syncs them
    once per log interval, appends them to loss.csv (a crash loses at most a line), the
    trackers (`writer`: TensorBoard / wandb, steps in order) and the progress bar."""

    def __init__(self, out: Path, history: list[list[float]], enabled: bool, writer, bar, device: torch.device):
        self.out, self.history, self.enabled, self.bar, self.device = out, history, enabled, bar, device
        self.pending: list[tuple[int, torch.Tensor, float, float]] = []
        self.val: dict[int, float] = {}  # step → validation loss, until its row is flushed
        self.ema = history[-1][1] if history else None
        self.writer = writer if enabled else None
        if enabled:
            write_loss_csv(out / "loss.csv", history)  # the header (and, when resuming, the rows so far)
        self.n_written = len(history)

    def add(self, step: int, loss: torch.Tensor, lr: float, seconds: float) -> None:
        self.pending.append((step, loss, lr, seconds))

    def add_val(self, step: int, loss: float) -> None:
        """The validation loss of `step` (added before that step's row is flushed)."""
        self.val[step] = loss

    def flush(self) -> None:
        if not self.pending or not self.enabled:  # other ranks keep no history and write nothing
            self.pending.clear()
            return
        values = torch.stack([p[1] for p in self.pending]).tolist()  # one device sync per log interval
        for (st, _, lr, t), v in zip(self.pending, values):
            self.history.append([st, v, lr, t] + ([self.val.pop(st)] if st in self.val else []))
            self.ema = v if self.ema is None else 0.95 * self.ema + 0.05 * v
            if self.writer is not None:
                self.writer.add_scalar("loss", v, st)
                self.writer.add_scalar("lr", lr, st)
                if len(self.history[-1]) > 4:
                    self.writer.add_scalar("val_loss", self.history[-1][4], st)
        self.pending.clear()
        with open(self.out / "loss.csv", "a", encoding="utf-8") as f:
            f.writelines(_csv_row(h) for h in self.history[self.n_written:])
        self.n_written = len(self.history)
        post = {"loss": f"{self.ema:.4f}", "lr": f"{self.history[-1][2]:.2e}"}
        val = [h[4] for h in self.history if len(h) > 4]
        if val:
            post["val"] = f"{val[-1]:.4f}"
        if self.device.type == "cuda":
            post["mem"] = f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}G"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _csv_row(h: list[float]) -> str:
    step, loss, lr, t = h[:4]
    val = f"{h[4]:.6g}" if len(h) > 4 else ""
    return f"{int(step)},{loss:.6g},{lr:.6g},{t:.3f},{val}\n"


def write_loss_csv(path: Path, history: list[list[float]]) -> None:
    write_text(path, "step,loss,lr,time,val_loss\n" + "".join(_csv_row(h) for h in history))


def plot_loss(path: Path, history: list[list[float]], title: str = "training loss") -> None:
    """Draw the loss curve (raw in light blue, EMA-smoothed in dark blue) and the validation
    loss (orange, where measured) with PIL (no matplotlib)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 720, 400, 64, 16, 28, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 8), title, fill="black", font=font)
    steps = [h[0] for h in history]
    val = [(h[0], h[4]) for h in history if len(h) > 4 and math.isfinite(h[4])]
    losses = [h[1] for h in history if math.isfinite(h[1])] + [v for _, v in val]
    if len(history) >= 2 and losses:
        beta = 1.0 - min(0.5, 30.0 / len(history))  # smooth over about 1/30 of the run
        smooth, ema = [], None
        for h in history:
            ema = h[1] if ema is None else beta * ema + (1.0 - beta) * h[1]
            smooth.append(ema)
        ordered = sorted(losses)
        lo, hi = ordered[0], ordered[min(len(ordered) - 1, int(0.98 * len(ordered)))]  # clip rare spikes
        hi = hi if hi > lo else lo + 1e-6
        x0, x1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

        def xy(step: float, loss: float) -> tuple[float, float]:
            fx = (step - x0) / (x1 - x0)
            fy = (min(max(loss, lo), hi) - lo) / (hi - lo)
            return left + fx * (width - left - right), height - bottom - fy * (height - top - bottom)

        for i in range(5):  # horizontal grid lines with loss labels
            v = lo + (hi - lo) * i / 4
            _, y = xy(x0, v)
            draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
            draw.text((4, y - 6), f"{v:.4g}", fill="black", font=font)
        for i in range(5):
            s = x0 + (x1 - x0) * i / 4
            x, _ = xy(s, lo)
            draw.text((x - 10, height - bottom + 6), f"{int(round(s))}", fill="black", font=font)
        draw.line([xy(s, h[1]) for s, h in zip(steps, history)], fill=(150, 190, 235), width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
        if val:
            orange = (230, 120, 20)
            draw.line([xy(s, v) for s, v in val], fill=orange, width=2)
            for s, v in val:
                x, y = xy(s, v)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=orange)
            draw.text((width - right - 110, 8), "validation loss", fill=orange, font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((width // 2 - 12, height - 16), "step", fill="black", font=font)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


