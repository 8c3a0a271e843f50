"""FP8 matmuls for the frozen base of a LoRA run (`train.fp8_matmul`, CUDA compute capability ≥ 8.9).

Each frozen Linear of the UNet's spatial transformers (proj_in / proj_out, attention q / k / v /
out, GEGLU proj, feed-forward out; LoRA-wrapped or not) computes its base GEMM with
`torch._scaled_mm` on e4m3 operands, scaled rowwise:

    forward   y  = x Wᵀ + b  :  x → e4m3 per token (row), W → e4m3 per output channel (once)
    backward  dx = dy W      :  bf16, with the bf16 weight (`BACKWARD = "bf16"`, the default), or
                                dy · s_W → e4m3 per token and the same e4m3 W (`"fp8"`)

W ≈ w8 · s_W (one fp32 scale per output channel). In backward dy W = (dy · s_W) w8, so W's
scales fold into dy before it is quantised and the input-gradient GEMM reads the same float8
values (a transposed copy, `w8t`, because `_scaled_mm` wants its second operand column-major).
The bf16 backward is the default because quantising every output gradient (a pass of its own
over each: they come from cuDNN's attention, the GEGLU kernel, residual adds) cost more than
the float8 GEMM saved (docs/benchmarks.md). W gets no gradient (frozen), so the weight-gradient
GEMM does not exist and forward keeps nothing of x. A LoRA's own branch stays as it was (bf16)
and is added to the base output.

Why rowwise: a token's scale needs only that token's values, so inside `torch.compile` inductor
computes it and the float8 copy in the kernel that produces the activation (the LayerNorm before
q / k / v, for one): `bench/kernels.py --only fp8gemm` measured a compiled LayerNorm with its
rowwise copy as fast as the LayerNorm alone, where a tensorwise scale (one amax over the whole
tensor) needs a pass of its own before a second pass can cast. And per-output-channel weight
scales concatenate, so a fused q / k / v projection stays one float8 GEMM (`ops.project`,
`Quantized.cat`). Scales are computed on the device (no host sync; compiles and captures).
Float8 gradients are e4m3 too: with a scale per token their range fits (torchao's rowwise recipe).

One float8 copy per weight (two with the float8 backward), beside the bf16 parameter, which stays
what `state_dict()` and the LoRA files see. Weights are quantised once, by `enable_fp8_matmul`: enable
it after the model is on its device and call it again after changing the base weights (a merged
LoRA layer falls back to the bf16 weight). With `model.dtype = "fp8"` the copies are made from
the float8-stored values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from eridiffusion.errors import ConfigError
from eridiffusion.networks.lora import LoRALinear

E4M3 = torch.float8_e4m3fn
MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first with float8 tensor cores


def quantize(x: torch.Tensor, dtype: torch.dtype, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x → (x8, inverse scale) with x ≈ x8 · inverse scale: amax(|x|) over `dim` (kept as a size-1
    dim; None: the whole tensor, one 0-dim scale) mapped to the format's largest value (448 for
    e4m3, 57344 for e5m2), in fp32 on x's device."""
    fmax = torch.finfo(dtype).max
    amax = x.abs().amax() if dim is None else x.abs().amax(dim, keepdim=True)
    scale = fmax / amax.float().clamp(min=1e-12)  # a zero row stays zero
    x8 = (x.float() * scale).clamp(-fmax, fmax).to(dtype)
    return x8, scale.reciprocal()


# The input-gradient GEMM dx = dy W: "bf16" (the bf16 weight, no float8 copy of Wᵀ) or "fp8" (dy · s_W
# quantised per token, the transposed float8 copy). Read by `Quantized.of`, so by `enable_fp8_matmul`.
BACKWARD = "bf16"


class Quantized(NamedTuple):
    """A frozen weight W (out, in) in e4m3 with one fp32 scale per output channel: W ≈ w8 ·
    scale[:, None]. The input gradient uses `weights` (W itself, or its row blocks once
    concatenated) with `BACKWARD = "bf16"`, else `w8t` = w8ᵀ contiguous (in, out)."""

    w8: torch.Tensor
    scale: torch.Tensor
    weights: tuple[torch.Tensor, ...]
    w8t: torch.Tensor | None

    @classmethod
    def of(cls, weight: torch.Tensor) -> Quantized:
        with torch.no_grad():
            w8, inv = quantize(weight.detach().float(), E4M3, dim=1)  # .float(): a float8-stored weight reads as its values
        return cls(w8, inv.flatten(), (weight,), w8.t().contiguous() if BACKWARD == "fp8" else None)

    @classmethod
    def cat(cls, parts: Sequence[Quantized]) -> Quantized:
        """The row blocks of several layers' weights (q, k, v) as one: per-row scales concatenate."""
        if len(parts) == 1:
            return parts[0]
        w8t = None if parts[0].w8t is None else torch.cat([p.w8t for p in parts], dim=1)
        return cls(torch.cat([p.w8 for p in parts]), torch.cat([p.scale for p in parts]),
                   sum((p.weights for p in parts), ()), w8t)  # fmt: skip

    @property
    def shape(self) -> torch.Size:
        return self.w8.shape

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (…, in) → x Wᵀ + b in x's dtype, computed from float8 operands (b in the GEMM's epilogue)."""
        bias = None if bias is None else bias.to(torch.bfloat16)
        return _FP8Linear.apply(x, self.w8, self.scale, bias, self.w8t, *self.weights)


def _scaled_mm(a8: torch.Tensor, b8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
               bias: torch.Tensor | None, fast_accum: bool) -> torch.Tensor:  # fmt: skip
    """a8 (M, K) @ b8 (K, N) column-major, scales (M, 1) and (1, N), bias and out in bf16 (what
    rowwise scaling supports). a8 is made row-major: a cast keeps its input's strides, and a
    gradient or a split's view (q of q / k / v) comes in others."""
    return torch._scaled_mm(a8.contiguous(), b8, scale_a=scale_a, scale_b=scale_b, bias=bias,
                            out_dtype=torch.bfloat16, use_fast_accum=fast_accum)  # fmt: skip


class _FP8Linear(torch.autograd.Function):
    """y = x Wᵀ + b with float8 operands; only x gets a gradient (W and b are frozen). W's row
    blocks (`weights`) are concatenated in backward only, so no copy is kept."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias, w8t, *weights):
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        x8, x_inv = quantize(x2, E4M3, dim=-1)  # (M, in), (M, 1)
        out = _scaled_mm(x8, w8.t(), x_inv, scale.view(1, -1), bias, fast_accum=True)  # (M, out)
        ctx.fp8, ctx.blocks = w8t is not None, len(weights)
        if ctx.fp8:
            ctx.save_for_backward(w8t, scale)
        else:
            ctx.save_for_backward(*weights)
        return out.to(x.dtype).view(*x.shape[:-1], w8.shape[0])

    @staticmethod
    def backward(ctx, grad):
        g2 = grad.reshape(-1, grad.shape[-1])  # (M, out)
        if not ctx.needs_input_grad[0]:
            dx = None
        elif ctx.fp8:
            w8t, scale = ctx.saved_tensors
            g8, g_inv = quantize(g2.float() * scale, E4M3, dim=-1)  # W's scales folded in: dy W = (dy · s) w8
            ones = scale.new_ones(1, w8t.shape[0])
            dx = _scaled_mm(g8, w8t.t(), g_inv, ones, None, fast_accum=False).to(grad.dtype)  # (M, in)
        else:
            weights = ctx.saved_tensors
            dx = g2 @ (weights[0] if len(weights) == 1 else torch.cat(weights)).to(g2.dtype)  # (M, in)
        dx = None if dx is None else dx.view(*grad.shape[:-1], dx.shape[-1])
        return (dx, None, None, None, None) + (None,) * ctx.blocks


def fp8_linear(x: torch.Tensor, q: Quantized, bias: torch.Tensor | None) -> torch.Tensor:
    """x (…, in) → x Wᵀ + b in x's dtype, computed from float8 operands (`Quantized` W)."""
    return q.linear(x, bias)


class FP8Linear(nn.Linear):
    """A frozen `nn.Linear` whose GEMM runs in float8 (same parameters and names)."""

    fp8: Quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.fp8, self.bias)

    def linear_parts(self, dtype: torch.dtype):
        """(float8 weight, bias, None, None): joins a fused projection (`ops.project`) as one."""
        return self.fp8, self.bias, None, None


class FP8LoRALinear(LoRALinear):
    """`LoRALinear` whose frozen base runs in float8; the LoRA branch is unchanged."""

    fp8: Quantized

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # W holds the update now: the float8 copy is stale
            return F.linear(x, self.weight, self.bias)
        return fp8_linear(x, self.fp8, self.bias)

    def linear_parts(self, dtype: torch.dtype):
        """`LoRALinear.linear_parts` with the float8 weight; None once merged (the copy is stale)."""
        parts = super().linear_parts(dtype)
        return None if parts is None or self.merged else (self.fp8, *parts[1:])


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
