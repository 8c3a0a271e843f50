"""FP8 matmuls for the frozen base of a LoRA run (`train.fp8_matmul`, CUDA compute capability ≥ 8.9).

Each frozen Linear of the UNet's spatial transformers (proj_in / proj_out, attention q / k / v /
out, GEGLU proj, feed-forward out; LoRA-wrapped or not) computes its base GEMM with
`torch._scaled_mm` on float8 operands:

    forward   y  = x Wᵀ + b :  x → e4m3 (scaled per step), W → e4m3 (scaled once)
    backward  dx = dy W     :  dy → e5m2 (scaled per step), W from a transposed e4m3 copy

W gets no gradient (frozen), so the weight-gradient GEMM (the one that would need x in fp8 too)
does not exist, and forward keeps nothing of x for backward. A LoRA's own branch stays as it
was (bf16 matmuls over fp32 factors) and is added to the base output.

Scaling is tensorwise: one fp32 scale per tensor, s = fp8_max / amax(|t|), computed on the device
(no host sync, CUDA-graph safe). Rowwise scales (per token / per output channel) measured only a
little more faithful on the CPU (docs/benchmarks.md), while `_scaled_mm` takes rowwise scales only with
bf16 output, e4m3 operands on some builds, and a slower kernel than cuBLAS's tensorwise one.
torchao's float8 training uses the same recipe (tensorwise dynamic, e5m2 gradients,
fast accumulation in forward only).

`_scaled_mm` wants mat2 column-major: the forward's Wᵀ is a view of W (out, in) kept row-major,
the backward's W a view of a contiguous Wᵀ copy (in, out); so two float8 copies per weight
(2 bytes per weight beside the bf16 parameter, which stays what `state_dict()` and the LoRA
files see). Weights are quantised once, by `enable_fp8_matmul`: enable it after the model is on
its device and call it again after changing the base weights (a merged LoRA layer falls back to
the bf16 weight). With `model.dtype = "fp8"` the copies are made from the float8-stored values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from eridiffusion.errors import ConfigError
from eridiffusion.networks.lora import LoRALinear

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first with float8 tensor cores


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x → (x8, inverse scale) with x ≈ x8 · inverse scale: one fp32 scale, amax(|x|) mapped to the
    format's largest value (448 for e4m3, 57344 for e5m2), computed on x's device."""
    fmax = torch.finfo(dtype).max
    amax = x.abs().amax().float().clamp(min=1e-12)  # a zero tensor stays zero
    scale = fmax / amax
    x8 = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return x8, scale.reciprocal()


class Quantized(NamedTuple):
    """A frozen weight W (out, in) in e4m3: `w8` row-major, `w8t` = W8ᵀ contiguous (in, out),
    `inv_scale` (fp32, 0-dim) with W ≈ w8 · inv_scale."""

    w8: torch.Tensor
    w8t: torch.Tensor
    inv_scale: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor) -> Quantized:
        w = weight.detach()
        with torch.no_grad():
            w8, inv = quantize(w.float(), E4M3)  # .float(): a float8-stored weight reads as its values
        return cls(w8, w8.t().contiguous(), inv)


class _FP8Linear(torch.autograd.Function):
    """y = x Wᵀ + b with float8 operands; only x gets a gradient (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, w8, w8t, w_inv, bias):
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        x8, x_inv = quantize(x2, E4M3)
        in_gemm = bias is not None and x.dtype != torch.float32  # _scaled_mm's bias: bf16 / fp16 only
        out = torch._scaled_mm(x8.contiguous(), w8.t(), scale_a=x_inv, scale_b=w_inv,
                               bias=bias.to(x.dtype) if in_gemm else None, out_dtype=x.dtype,
                               use_fast_accum=True)  # (M, out)
        if bias is not None and not in_gemm:
            out = out + bias
        ctx.save_for_backward(w8t, w_inv)
        return out.view(*x.shape[:-1], w8.shape[0])

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        w8t, w_inv = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (M, out)
        g8, g_inv = quantize(g2, E5M2)
        dx = torch._scaled_mm(g8.contiguous(), w8t.t(), scale_a=g_inv, scale_b=w_inv, out_dtype=grad.dtype)  # (M, in)
        return dx.view(*grad.shape[:-1], w8t.shape[0]), None, None, None, None


def fp8_linear(x: torch.Tensor, q: Quantized, bias: torch.Tensor | None) -> torch.Tensor:
    """x (…, in) → x Wᵀ + b in x's dtype, computed from float8 operands (`Quantized` W)."""
    return _FP8Linear.apply(x, q.w8, q.w8t, q.inv_scale, bias)


class FP8Linear(nn.Linear):
    """A frozen `nn.Linear` whose GEMM runs in float8 (same parameters and names)."""

    fp8: Quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.fp8, self.bias)

    def linear_parts(self, dtype: torch.dtype):
        return None  # not part of a fused bf16 projection (`ops.project` calls each layer)


class FP8LoRALinear(LoRALinear):
    """`LoRALinear` whose frozen base runs in float8; the LoRA branch is unchanged."""

    fp8: Quantized

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # W holds the update now: the float8 copy is stale
            return F.linear(x, self.weight, self.bias)
        return fp8_linear(x, self.fp8, self.bias)

    def linear_parts(self, dtype: torch.dtype):
        return None  # forward = base_forward(x) + update(x) (Adapter.forward)


SWAPS = {nn.Linear: FP8Linear, LoRALinear: FP8LoRALinear}  # exact types: DoRA, LoHa, … stay bf16


def _eligible(m: nn.Module) -> bool:
    if type(m) not in SWAPS:
        return False
    w = m.weight
    frozen = not (w.requires_grad or (m.bias is not None and m.bias.requires_grad))
    return frozen and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0  # _scaled_mm: dims ÷ 16


def enable_fp8_matmul(unet: nn.Module) -> int:
    """Swap the frozen Linears of `unet`'s spatial transformers (LoRA-wrapped or not) to float8
    GEMMs, in place; parameters, names and `state_dict()` unchanged. Returns how many layers now
    run in float8 (a layer already swapped is quantised again)."""
    from eridiffusion.models.unet import SpatialTransformer

    n = 0
    for st in (m for m in unet.modules() if isinstance(m, SpatialTransformer)):
        for m in st.modules():
            if type(m) in SWAPS.values() or _eligible(m):
                m.__class__ = SWAPS.get(type(m), type(m))
                m.fp8 = Quantized.of(m.weight)  # a plain attribute: not a buffer, not in state_dict
                n += 1
    return n


def disable_fp8_matmul(unet: nn.Module) -> int:
    """Undo `enable_fp8_matmul` (the float8 copies are freed); returns how many layers went back."""
    back = {v: k for k, v in SWAPS.items()}
    n = 0
    for m in unet.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
            del m.fp8
            n += 1
    return n


def check_device(device: torch.device) -> None:
    """float8 tensor cores: CUDA compute capability 8.9 or newer (L40, RTX 4090, H100, H200)."""
    if device.type != "cuda":
        raise ConfigError(f"train.fp8_matmul = true needs a CUDA GPU of compute capability 8.9 or newer (H100, H200), "
                          f"and this run is on {device}: set train.fp8_matmul=false")  # fmt: skip
    cc = torch.cuda.get_device_capability(device)
    if cc < MIN_CAPABILITY:
        raise ConfigError(f"train.fp8_matmul = true needs compute capability 8.9 or newer (H100, H200), and "
                          f"{torch.cuda.get_device_name(device)} is {cc[0]}.{cc[1]}: set train.fp8_matmul=false")  # fmt: skip
