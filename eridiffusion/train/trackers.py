"""Where a run's scalars and preview grids go besides loss.csv: TensorBoard and Weights & Biases.

`Trackers.open(out, cfg, log)` gives one object with TensorBoard's `add_scalar` / `add_image`
that forwards to each enabled tracker, or None when none is. Both libraries are optional and
imported here only: a missing `tensorboard` is a log line (it is on by default), a missing
`wandb` with `log.wandb = true` a one-line ConfigError (`require_wandb`, checked before the
model loads). `WANDB_MODE=offline` keeps wandb off the network (files in `out/wandb`).
"""

from __future__ import annotations

from pathlib import Path

from eridiffusion.config import TrainConfig
from eridiffusion.errors import ConfigError


def require_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.wandb = true needs wandb: pip install 'eridiffusion[log]', or set log.wandb=false") from None
    return wandb


class Trackers:
    def __init__(self, tensorboard=None, wandb_run=None):
        self.tensorboard, self.wandb_run = tensorboard, wandb_run

    @classmethod
    def open(cls, out: Path, cfg: TrainConfig, log) -> Trackers | None:
        tb = run = None
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                log("log: tensorboard is not installed, skipping event files (pip install tensorboard)")
        if cfg.log.wandb:
            wandb = require_wandb()
            run = wandb.init(project=cfg.log.wandb_project, name=cfg.save.name, dir=str(out), config=cfg.to_dict())
        return cls(tb, run) if tb is not None or run is not None else None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: value}, step=step)

    def add_image(self, tag: str, image, step: int, dataformats: str = "HWC") -> None:
        """`image`: a (H, W, 3) uint8 array (TensorBoard's HWC)."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, image, step, dataformats=dataformats)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
