"""Errors a user can cause, each one line: what file / key / value, and what to do.

Every such error subclasses `UserError`; `cli.main` catches it once, for every sub-command,
prints `eri COMMAND: MESSAGE` and exits with the error's `exit_code` (2 for bad input, 1 for
a fault at run time). Anything else that escapes is a bug and keeps its traceback.

The specific errors live beside the code that raises them and subclass one of these bases:
`weights.WeightNotFound` / `ShapeMismatch` / `NotACheckpoint` / `PickleRefused` / `ReadFailed`
and `checkpoint.NotAModel` / `FamilyMismatch` / `KeyMismatch` (WeightError);
`faults.DiskFull` / `NonFiniteLoss` / `OutOfMemory` (FaultError); `data.dataset.ImageLoadError`
(DatasetError).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; `str()` is one line naming it and the fix."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config file, an override or a command-line value that cannot be used."""


class WeightError(UserError):
    """A weight file that cannot be read as asked (missing key, shape, not a checkpoint, ...)."""


class LoRAError(UserError, ValueError):
    """A LoRA / adapter file or request that cannot be used."""


class DatasetError(UserError, ValueError):
    """A dataset folder or image that cannot be used."""


class PipelineError(UserError, ValueError):
    """A sampling request that cannot be served (size, strength, output path, ...)."""


class FaultError(UserError):
    """A failure at run time (disk full, out of memory, NaN losses); the state is saved."""

    exit_code = 1
