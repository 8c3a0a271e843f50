"""What runs between optimizer steps besides the step: validation loss, log, saves, previews.

    after step N:  validation loss (log.validation_every_n_steps, else per epoch; every rank)
                   ─► loss.csv / trackers flush (log.every) ─► intermediate save
                   (save.every_n_steps / every_n_epochs; save.keep_last prunes) ─► preview grid
                   (sample.*; rank 0, the progress bar says "rendering previews")
    before step 1: the step-0 grid (sample.at_start)

`build_evaluators` makes the preview renderer and the validation loss while the VAE and text
encoders are still loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from eridiffusion.config import TrainConfig
from eridiffusion.train.previews import Previews, wanted
from eridiffusion.train.validation import ValidationLoss


def prune_step_files(out: Path, trainable, keep: int) -> list[Path]:
    """Delete all but the newest `keep` intermediate files (`trainable.step_name(N)`); returns
    them. The final file and files of other names are never touched."""
    if keep <= 0:
        return []
    mark = 987654321  # a step no run reaches: where the number sits in the name
    head, _, tail = trainable.step_name(mark).partition(str(mark))
    pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    found = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := pattern.fullmatch(p.name)))
    old = [p for _, p in found[:-keep]]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def build_evaluators(cfg: TrainConfig, s, val_data, main: bool, fsdp: bool, prediction: str,
                     log) -> tuple[Previews | None, ValidationLoss | None]:  # fmt: skip
    """The preview renderer (rank 0, not under FSDP) and the validation loss (every rank), built
    before the trainer frees the VAE / text encoders."""
    c, previews, val = s.components, None, None
    encode_now = not cfg.trains_text_encoders
    if wanted(cfg.sample) and fsdp:
        log("sample: previews are off under FSDP (every rank would have to sample the sharded UNet)")
    elif wanted(cfg.sample) and main:
        previews = Previews(c, cfg.sample, cfg.save.output_dir, encode_now, prediction=prediction,
                            zero_terminal_snr=cfg.train.zero_terminal_snr, max_tokens=cfg.data.max_tokens)  # fmt: skip
    if val_data is not None:
        encode = s.family.text_encoder(c, cfg.data.max_tokens) if encode_now else None
        val = ValidationLoss.build(s, val_data, cfg.train.seed, encode)
    return previews, val


class Periodic:
    """Everything due after an optimizer step (`__call__(step)` returns the path of an
    intermediate save, else None), and the step-0 grid (`start()`)."""

    def __init__(self, cfg: TrainConfig, total: int, per_epoch: int, runlog, save, trainable, opt,
                 previews: Previews | None, validate, bar, stop, log):  # fmt: skip
        self.__dict__.update(cfg=cfg, total=total, per_epoch=per_epoch, runlog=runlog, save=save, trainable=trainable,
                             opt=opt, previews=previews, validate=validate, bar=bar, stop=stop, log=log)  # fmt: skip

    def _every(self, step: int, n_steps: int, n_epochs: int) -> bool:
        epochs = n_epochs and step % self.per_epoch == 0 and (step // self.per_epoch) % n_epochs == 0
        return bool(n_steps and step % n_steps == 0) or bool(epochs)

    def _preview(self, step: int) -> None:
        self.runlog.flush()  # trackers take steps in order (wandb drops a step below the last)
        with self.trainable.eval_weights():
            self.previews.during_training(step, self.opt, self.runlog.writer, self.bar, lambda: bool(self.stop.signum),
                                          self.log)  # fmt: skip

    def start(self, step: int) -> None:
        if self.previews is not None and step == 0 and self.cfg.sample.at_start:
            self._preview(0)

    def __call__(self, step: int) -> Path | None:
        c, last = self.cfg, step == self.total
        if self.validate is not None and (last or self._every(step, c.log.validation_every_n_steps, 0 if
                                                              c.log.validation_every_n_steps else 1)):  # fmt: skip
            with self.opt.eval_mode(), self.trainable.eval_weights():
                self.runlog.add_val(step, self.validate())
        if step % c.log.every == 0 or last:
            self.runlog.flush()
        saved = None
        if not last and self._every(step, c.save.every_n_steps, c.save.every_n_epochs):
            saved = self.save(step, final=False)
            if saved is not None:
                for old in prune_step_files(saved.parent, self.trainable, c.save.keep_last):
                    self.log(f"save.keep_last = {c.save.keep_last}: deleted {old}")
        if self.previews is not None and self.previews.due(step, self.total, self.per_epoch):
            self._preview(step)
        return saved
