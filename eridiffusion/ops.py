"""Fused linear ops shared by the models and the LoRA adapters.

- `lora_linear`: y = x Wᵀ + b + (x Aᵀ) Bᵀ with the low-rank update added by the GEMM epilogue
  (`addmm_`, beta = 1) rather than as a separate (…, out) tensor and an add pass; backward
  adds the LoRA path's input gradient onto the base one the same way.
- `project`: several projections of one input (self-attention q, k, v) as one GEMM over the
  concatenated weights; LoRA updates ride along as one rank-Σr down projection and a
  block-diagonal up projection. Layers say what they hold through `linear_parts(dtype)`; a
  float8 weight (`fp8_matmul.Quantized`, `train.fp8_matmul`) brings its own GEMM, and q, k, v in
  float8 concatenate into one float8 GEMM the same way.
- `geglu` and `Conv2d`: the same maths as autograd's, keeping fewer tensors for backward
  (eager training; compiled regions use the plain ops and let the partitioner choose, except
  where `recomputed` says). On CUDA, `geglu` is `kernels.geglu` (Triton, forward and backward),
  eager and compiled.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import kernels


class _LoRALinear(torch.autograd.Function):
    """W and b are frozen (no gradient for them). W may come in row blocks (q, k, v): they are
    concatenated in forward and again in backward, so the concatenation is never saved.
    Saves x and h = x Aᵀ, as autograd would; without `down` / `up` it is a plain linear."""

    @staticmethod
    def forward(ctx, x, bias, down, up, *weights):
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)  # (out, in)
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        h = None if down is None else x2 @ down.t()  # (M, rank)
        shape = (*x.shape[:-1], weight.shape[0])
        ctx.save_for_backward(x2, h, down, up, *weights)
        if torch.compiler.is_compiling():  # adds that inductor fuses into the next kernel (see _plain)
            return _plain((x2 @ weight.t()).view(shape), bias, None if h is None else (h @ up.t()).view(shape))
        out = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (M, out)
        if h is not None:
            out.addmm_(h, up.t())
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad):
        x2, h, down, up, *weights = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (M, out)
        gh = None if down is None else g @ up  # (M, rank)
        grad_x = grad_down = grad_up = None
        if ctx.needs_input_grad[0]:
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)
            shape = (*grad.shape[:-1], x2.shape[-1])
            if torch.compiler.is_compiling():
                grad_x = _plain((g @ weight).view(shape), None, None if gh is None else (gh @ down).view(shape))
            else:
                grad_x = g @ weight if gh is None else (g @ weight).addmm_(gh, down)
                grad_x = grad_x.view(shape)
        if ctx.needs_input_grad[2]:
            grad_down = gh.t() @ x2  # (rank, in)
        if ctx.needs_input_grad[3]:
            grad_up = g.t() @ h  # (out, rank)
        return (grad_x, None, grad_down, grad_up) + (None,) * len(weights)


def _plain(out: torch.Tensor, bias: torch.Tensor | None, update: torch.Tensor | None) -> torch.Tensor:
    """out + bias + update for compiled graphs, `out` and `update` GEMM results already viewed to
    the output's shape. `addmm(c, a, b)` with a full-size c (and the functionalised `addmm_`)
    copies c into a fresh output before the GEMM adds to it: one device copy per layer
    (bench/kernels.py found 981 per SDXL batch-4 step). Inductor rewrites `mm + c` into that
    addmm unless every use of the sum is pointwise (torch/_inductor/fx_passes/post_grad.py,
    `addmm`); an add of views is no `mm + c`, so the adds stay pointwise and join the next kernel
    (residual add, GEGLU, norm). A 1-D bias alone is left to cuBLASLt's bias epilogue."""
    if bias is not None:
        out = out + bias
    return out if update is None else out + update


# How `lora_linear` runs inside torch.compile'd regions: "plain" matmuls and adds, which dynamo
# traces as ops and whose saved tensors the partitioner chooses, or "function": the eager
# `_LoRALinear`, which dynamo traces forward and backward. After AOTAutograd both are the same
# graphs (SDXL on an H200, docs/benchmarks.md); "plain" needs no custom-Function support in
# AOTAutograd's cache. The benchmark's `lora` field switches it (bench/train_step.py).
COMPILED = "plain"


def lora_linear(x: torch.Tensor, weight: torch.Tensor | Sequence[torch.Tensor], bias: torch.Tensor | None,
                down: torch.Tensor | None, up: torch.Tensor | None, recompute: bool = False) -> torch.Tensor:
    """x (…, in) → x Wᵀ + b + (x downᵀ) upᵀ; `up` carries the scale; all in x's dtype. `weight`
    may be a sequence of row blocks of W (frozen), concatenated on the fly and never saved
    (compiled: with `recompute`; else the partitioner may keep the concatenation)."""
    weights = (weight,) if torch.is_tensor(weight) or _float8(weight) else tuple(weight)
    if _float8(weights[0]):  # its own GEMM and autograd; the LoRA branch as plain ops
        update = None if down is None else F.linear(F.linear(x, down), up)
        return _plain(type(weights[0]).cat(weights).linear(x, bias), None, update)
    if COMPILED == "plain" and torch.compiler.is_compiling():
        return _traced_lora_linear(x, weights, bias, down, up, recompute)
    return _LoRALinear.apply(x, bias, down, up, *weights)


def _float8(weight) -> bool:
    """A frozen weight held in float8 (`fp8_matmul.Quantized`: `cat` and `linear` of its own)."""
    return hasattr(weight, "linear") and hasattr(weight, "cat")


def _traced_lora_linear(x, weights, bias, down, up, recompute: bool = False) -> torch.Tensor:
    """`lora_linear` as plain ops for a compiled graph. The LoRA branch reshapes x on its own, so
    in backward the two halves of x's gradient are added as views (`_plain`), not as `mm + c`.
    `recompute`: row blocks of W are concatenated again in backward rather than kept (the
    partitioner keeps the (Σ out, in) copy: 9.4 MiB per SDXL self-attention, 0.64 GiB in all)."""
    if len(weights) == 1:
        weight = weights[0]
    else:
        weight = recomputed(_cat, *weights) if recompute else _cat(*weights)
    x2, shape = x.reshape(-1, x.shape[-1]), (*x.shape[:-1], weight.shape[0])
    update = None if down is None else F.linear(F.linear(x, down), up)
    return _plain((x2 @ weight.t()).view(shape), bias, update)


def linear_parts(layer: nn.Module, dtype: torch.dtype):
    """(weight, bias, down, up) of a frozen layer in `dtype` (down / up None without LoRA), or
    None when it cannot join a fused projection (trainable base, LoRA dropout, another type)."""
    parts = getattr(layer, "linear_parts", None)
    if parts is not None:
        return parts(dtype)
    if type(layer) is nn.Linear and not layer.weight.requires_grad:
        return layer.weight, layer.bias, None, None
    return None


def project(layers: Sequence[nn.Module], x: torch.Tensor, recompute: bool = False) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]` computed by one GEMM when every layer allows it
    (`recompute`: see `lora_linear`)."""
    parts = [linear_parts(layer, x.dtype) for layer in layers]
    if (any(p is None for p in parts) or len({_float8(p[0]) for p in parts}) > 1  # all bf16 or all float8
            or any(not _float8(p[0]) and p[0].dtype != x.dtype for p in parts)):
        return [layer(x) for layer in layers]
    sizes = [p[0].shape[0] for p in parts]
    weights = [p[0] for p in parts]  # row blocks of the (Σ out, in) weight (bf16, or float8 with row scales)
    bias = None
    if any(p[1] is not None for p in parts):
        bias = torch.cat([p[1] if p[1] is not None else x.new_zeros(size) for p, size in zip(parts, sizes)])
    down = up = None
    if any(p[2] is not None for p in parts):
        down = torch.cat([p[2] if p[2] is not None else x.new_zeros(0, x.shape[-1]) for p in parts])  # (Σ r, in)
        up = torch.block_diag(*[p[3] if p[3] is not None else x.new_zeros(size, 0) for p, size in zip(parts, sizes)])
    out = lora_linear(x, weights, bias, down, up, recompute)  # up: (Σ out, Σ r), block-diagonal
    return list(out.split(sizes, dim=-1))


class _GEGLU(torch.autograd.Function):
    """Saves y alone; gelu(gate) is recomputed in backward. The gradients are autograd's
    (`gelu_backward` of grad · x, and grad · gelu(gate)), bit for bit."""

    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return kernels.geglu_plain(y)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return kernels.geglu_plain_backward(grad, y)


# GEGLU on CUDA runs eridiffusion.kernels' Triton op (eager and compiled): inductor's own backward
# for it was 11.6 ms of SDXL's batch-4 step on an H200. False: plain ops (the benchmark's A/B).
TRITON_GEGLU = True


def _cat(*weights: torch.Tensor) -> torch.Tensor:
    return torch.cat(weights)


def recomputed(fn, *args):
    """`fn(*args)`; inside a compiled region with grad, its output recomputed in backward rather
    than kept: a checkpoint around one cheap op, which the partitioner honours whatever its own
    rules (it keeps a Triton op's output, and anything a matmul reads in backward,
    `speed.partitioner`). Elsewhere (eager, or previews of a compiled training UNet) plain."""
    if not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def geglu(y: torch.Tensor, recompute: bool = False) -> torch.Tensor:
    """y = [x, gate] (…, 2n) → x · gelu(gate) (…, n). Autograd would keep gelu(gate) beside y
    (n more values per token: 3.1 GiB at SDXL batch 4, 1024²); this keeps y alone. `recompute`:
    in a compiled region, the output is not kept for the next layer's backward (its LoRA weight
    gradient) but computed again from y there (`models.unet.GEGLU.recompute`)."""
    if TRITON_GEGLU and kernels.available(y):
        fn = kernels.geglu
    elif torch.compiler.is_compiling() or not (torch.is_grad_enabled() and y.requires_grad):
        fn = kernels.geglu_plain
    else:
        return _GEGLU.apply(y)  # eager training
    return recomputed(fn, y) if recompute else fn(y)


class _FrozenConv2d(torch.autograd.Function):
    """Convolution by a frozen weight: backward needs the weight alone for the input gradient,
    so the input is not kept (autograd's convolution keeps it whether or not it is needed)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters and names) that keeps no input for backward while its
    weight and bias are frozen, as in LoRA training; otherwise exactly `nn.Conv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trainable = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if (trainable or self.padding_mode != "zeros" or torch.compiler.is_compiling()
                or not (torch.is_grad_enabled() and x.requires_grad)):
            return super().forward(x)
        return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
