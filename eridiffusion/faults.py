"""What training does when something goes wrong at run time (docs/reliability.md).

- `StopSignals`: SIGINT / SIGTERM ask the loop to stop after the current step; the trainer
  then saves a resumable state and the LoRA, and `eri train` exits 128 + signal (130 / 143,
  the shell convention). A second signal abandons the step at once (KeyboardInterrupt).
- `NonFiniteGuard`: a step whose loss or gradient norm is NaN / inf is skipped (no optimizer
  update) and counted; `max_in_row` such steps in a row stop the run with a saved state.
- `out_of_memory`: the one-line advice for `torch.OutOfMemoryError`.
- `FaultError` and subclasses: one-line messages `eri train` prints without a traceback.
"""

from __future__ import annotations

import errno
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from eridiffusion.errors import FaultError

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class DiskFull(FaultError):
    """`then`: what to do (the default is a training run's advice)."""

    def __init__(self, path: str | Path, then: str = "free some space or set save.output_dir to another disk, "
                 "then resume with train.resume=true"):  # fmt: skip
        self.path = Path(path)
        try:
            free = f"{shutil.disk_usage(self.path.parent).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        super().__init__(f"{self.path}: disk full while saving ({free}); the previous file is kept: {then}")


class NonFiniteLoss(FaultError):
    pass


class OutOfMemory(FaultError):
    pass


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def out_of_memory(step: int, batch_size: int, resolution: int, checkpointing: bool, cached: bool) -> OutOfMemory:
    """The error to raise for a `torch.OutOfMemoryError` in training step `step` (1-based)."""
    tips = [f"lower train.batch_size (now {batch_size}; raise train.grad_accum to keep the effective batch)"]
    if not checkpointing:
        tips.append("set train.gradient_checkpointing=true")
    if not cached:
        tips.append("keep cache.latents=true and cache.text=true (frees the VAE / text encoders)")
    tips.append(f"or lower data.resolution (now {resolution})")
    return OutOfMemory(f"out of GPU memory in step {step}: " + ", ".join(tips) + "; then resume with train.resume=true")


@dataclass
class NonFiniteGuard:
    """Counts non-finite steps; `observe(finite)` says whether to apply the step.

    `max_in_row` = 0 turns the check off (no device sync per step; a NaN then reaches the
    weights as in plain PyTorch).
    """

    max_in_row: int = 5
    in_row: int = 0
    skipped: int = 0

    @property
    def enabled(self) -> bool:
        return self.max_in_row > 0

    @property
    def exhausted(self) -> bool:
        return self.enabled and self.in_row >= self.max_in_row

    def observe(self, finite: bool) -> bool:
        if finite:
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped += 1
        return False

    def error(self, step: int, state_dir: Path) -> NonFiniteLoss:
        """The error after `step` good steps; with none there is no state to resume from."""
        if step:
            saved, then = f"state of step {step} saved in {state_dir}", "resume with train.resume=true"
        else:
            saved, then = "no step completed, nothing saved", "run again"
        return NonFiniteLoss(
            f"loss was NaN/inf in {self.in_row} steps in a row after step {step} ({self.skipped} skipped in all); "
            f"{saved}: lower optim.unet_lr, use model.dtype=bf16 or fp32, or raise train.max_nonfinite, then {then}"
        )


class StopSignals:
    """Context manager: SIGINT / SIGTERM set `signum` instead of killing the process.

    The loop polls `signum` after each step. A second signal raises KeyboardInterrupt at once.
    Installed only in the main thread (Python delivers signals there), and a signal that was
    ignored when we started (`nohup`, a background job of a script) stays ignored.
    """

    def __init__(self, log=print):
        self.log = log
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"\n{SIGNAL_NAMES.get(signum, signum)}: stopping after this step and saving (send again to stop at once)")

    def keyboard_interrupt(self) -> None:
        """Record a KeyboardInterrupt that did not come through `_handle` as SIGINT."""
        self.signum = self.signum or signal.SIGINT

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNAL_NAMES:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_IGN and sig not in self._previous:
                    self._previous[sig] = previous
                    signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back (idempotent)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def all_finite(*tensors) -> bool:
    """One device sync: are all these (scalar) tensors finite? None entries are ignored."""
    return bool(finite_flag(*tensors))


def finite_flag(*tensors):
    """On the device, without a sync: a bool tensor, True when all these (scalar) tensors are
    finite (None entries are ignored; True when none is left)."""
    import torch

    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)

