"""Device and dtype names as users write them (`train.device`, `--device`, `model.dtype`)."""

from __future__ import annotations

import torch

from eridiffusion.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, setting: str = "train.device", prefer_mps: bool = False) -> torch.device:
    """`name` ("auto", "cpu", "cuda", "cuda:N", "mps") as a torch device; under torchrun `cuda`
    is cuda:LOCAL_RANK. "auto" takes CUDA if present, then (with `prefer_mps`) Apple's MPS, else
    the CPU. A device this machine lacks is a one-line error naming `setting`."""
    from eridiffusion import distributed

    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        else:
            name = "mps" if prefer_mps and torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{setting} = {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} = {name!r} but no CUDA device is available: use {_fix(setting)}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{setting} = {name!r} but this machine has no Apple MPS device: use {_fix(setting)}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{setting} = {name!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    return distributed.local_device(device)


def _fix(setting: str) -> str:
    return f"{setting} cpu" if setting.startswith("--") else f"{setting}=cpu"


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without stopping the host: on CUDA through pinned memory and an
    asynchronous copy (a copy from pageable memory waits for all the work queued on the device
    first, so the device idles while the host prepares the next batch). Elsewhere `t.to(device)`."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
