"""Frozen weights stored in float8 and computed in bf16 (`model.dtype = "fp8"`).

kohya's `--fp8_base` (sd-scripts `train_network.py`, "Experimental Feature: Put base model into
fp8 to save vram") moves the whole frozen UNet and text encoders to `torch.float8_e4m3fn` and
relies on autocast to cast each weight to bf16 for its op. We do the same without autocast:
every Linear / Conv2d weight becomes a `Float8Weight`, a tensor whose storage is float8 and that
any op sees as its bf16 copy (made for that op, then freed). Norms and biases stay bf16, the
adapters fp32. The copy made for an op that autograd saves lives until its backward: with
`train.gradient_checkpointing` only one block's copies are alive at a time.

Half the bytes of bf16 for the weights; the numbers are those of the weights rounded to
float8 (e4m3: 3 mantissa bits, range ±448; e5m2: 2 bits, ±57344).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

from eridiffusion.devices import DTYPES
from eridiffusion.errors import ConfigError

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
COMPUTE = torch.bfloat16

# read without making the bf16 copy (dtype answers bf16: the weight takes part as bf16 everywhere)
_PLAIN = {torch.Tensor.shape.__get__, torch.Tensor.device.__get__, torch.Tensor.requires_grad.__get__,
          torch.Tensor.is_floating_point, torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel,
          torch.Tensor.ndim.__get__, torch.Tensor.is_leaf.__get__, torch.Tensor.grad.__get__,
          torch.Tensor.requires_grad_, torch.Tensor.data_ptr, torch.Tensor.is_cuda.__get__,
          torch.Tensor.layout.__get__, torch.Tensor.__len__}  # fmt: skip


class Float8Weight(torch.Tensor):
    """A frozen weight stored as float8; every op sees it as bf16 (see the module docstring)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_subclass(cls, data, False)

    def float8(self) -> torch.Tensor:
        """The stored float8 tensor."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.dtype.__get__:
            return COMPUTE
        with torch._C.DisableTorchFunctionSubclass():
            if func in _PLAIN:
                return func(*args, **kwargs)
            if func in (torch.Tensor.detach, torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu) and _same_dtype(args, kwargs):
                out = func(*args, **kwargs)  # a device move or detach keeps float8 storage
                return cls(out) if out.dtype in FP8.values() else out
            if func is torch.Tensor.__repr__:
                return f"Float8Weight({tuple(args[0].shape)}, {args[0].dtype}, device={args[0].device})"
            args, kwargs = tree_map(_widen, (args, kwargs))
            return func(*args, **kwargs)


def _widen(x):
    return x.as_subclass(torch.Tensor).to(COMPUTE) if isinstance(x, Float8Weight) else x


def _same_dtype(args, kwargs) -> bool:
    """A `.to(...)` / `.cuda()` / `.detach()` call that asks for no other dtype."""
    asked = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
    asked = asked or next((a.dtype for a in args[1:] if torch.is_tensor(a)), None)
    return asked is None or asked in FP8.values()


def compute_dtype(name: str) -> torch.dtype:
    """The dtype the frozen model computes in for `model.dtype = name`."""
    return COMPUTE if name in FP8 else DTYPES[name]


def check_device(name: str, device: torch.device) -> None:
    """float8 storage needs a device that can cast it: CUDA and the CPU can, Apple's MPS has no float8."""
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"model.dtype = {name!r} needs float8 tensors, which {device.type} lacks: use model.dtype=bf16 "
                          "or train.device=cuda")  # fmt: skip


def store_float8(module: nn.Module, dtype: torch.dtype = torch.float8_e4m3fn) -> int:
    """Swap every frozen Linear / Conv2d weight of `module` to float8 storage; returns how many bytes
    that saved (relative to the dtype they had)."""
    saved = 0
    for m in module.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or isinstance(m.weight, Float8Weight) or m.weight.requires_grad:
            continue
        w = m.weight.detach()
        saved += w.numel() * (w.element_size() - 1)
        m.weight = nn.Parameter(Float8Weight(w.to(dtype)), requires_grad=False)
    return saved
