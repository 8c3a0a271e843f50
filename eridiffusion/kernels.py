"""Hand-written Triton kernels for what inductor lowers badly, as torch custom ops.

`geglu(y)`: y = [x, gate] (…, 2n) → x · gelu(gate) (…, n), exact (erf) GELU, with its own
backward. Inductor writes GEGLU's backward, the gradient of `y.chunk(2)`, as one "pointwise
cat" over the 2n outputs in which every element evaluates both halves' formulas (erf, exp)
and keeps one: on an H200 at SDXL batch 4 that kernel took 11.6 ms of the 162 ms step,
compute-bound at a third of HBM bandwidth (docs/benchmarks.md, fourth pass). The kernel here
computes erf and exp once per (x, gate) pair and writes both halves of the gradient: it reads
y and the output gradient and writes y's gradient, 5 n values a token, the least there is.

The ops are `torch.library.triton_op`s: inside `torch.compile` inductor inlines the Triton
kernels into its own code (cached with their source, captured in CUDA graphs); eagerly they
are launched directly. On tensors that are not on a CUDA device they run the same maths as
plain torch ops, so their plumbing (fake shapes, autograd, compile) is tested on the CPU, where
Triton may be absent.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

BLOCK = 1024  # columns per program: 8 bf16 values (16 bytes) per thread with 4 warps

try:
    import triton
    import triton.language as tl
except (ImportError, RuntimeError):  # CPU-only installs (or a Triton without its driver): the plain-torch path
    triton = None


def available(t: torch.Tensor) -> bool:
    """Whether the Triton path suits `t`: a CUDA tensor in fp32 or lower (the kernels compute
    in fp32), Triton importable."""
    return t.is_cuda and t.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton is not None


if triton is not None:  # Φ(g) = ½(1 + erf(g/√2)), φ(g) = exp(−g²/2)/√(2π); literals: Triton reads no globals

    @triton.jit
    def _geglu_forward_kernel(y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(y_ptr + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(y_ptr + row * 2 * n + n + cols, mask=mask, other=0.0).to(tl.float32)
        gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        tl.store(out_ptr + row * n + cols, (x * gelu).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_backward_kernel(y_ptr, grad_ptr, dy_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(y_ptr + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(y_ptr + row * 2 * n + n + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        kind = dy_ptr.dtype.element_ty
        tl.store(dy_ptr + row * 2 * n + cols, (grad * gate * cdf).to(kind), mask=mask)
        tl.store(dy_ptr + row * 2 * n + n + cols, (grad * x * (cdf + gate * pdf)).to(kind), mask=mask)


def geglu_plain(y: torch.Tensor) -> torch.Tensor:
    """GEGLU in plain torch ops (what the kernels compute; autograd's formula)."""
    x, gate = y.chunk(2, dim=-1)
    return x * F.gelu(gate)


def geglu_plain_backward(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y's gradient in plain torch ops: autograd's (`gelu_backward` of grad · x, grad · gelu(gate))."""
    x, gate = y.chunk(2, dim=-1)
    return torch.cat([grad * F.gelu(gate), torch.ops.aten.gelu_backward(grad * x, gate)], dim=-1)


def _on(device: torch.device):
    """Triton launches on the current CUDA device: switch to the tensors' one if it differs
    (a single process on cuda:1; torchrun ranks and compiled code already run on theirs)."""
    same = device.index is None or device.index == torch.cuda.current_device()
    return contextlib.nullcontext() if same else torch.cuda.device(device)


@contextlib.contextmanager
def _quiet_without_triton():
    """torch warns on stderr, when it defines a triton_op, that it finds no Triton: expected on
    CPU-only installs, and a line the CLI must not print."""
    log = logging.getLogger("torch._library.triton")
    level = log.level
    if triton is None:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _geglu_forward_impl(y: torch.Tensor) -> torch.Tensor:
    if not y.is_cuda:
        return geglu_plain(y)
    y = y.contiguous()
    n = y.shape[-1] // 2
    out = y.new_empty(*y.shape[:-1], n)
    grid = (y.numel() // (2 * n), triton.cdiv(n, BLOCK))
    with _on(y.device):
        wrap_triton(_geglu_forward_kernel)[grid](y, out, n, BLOCK=BLOCK, num_warps=4)
    return out


def _geglu_backward_impl(grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not y.is_cuda:
        return geglu_plain_backward(grad, y)
    y, grad = y.contiguous(), grad.contiguous()
    n = y.shape[-1] // 2
    dy = torch.empty_like(y)
    grid = (y.numel() // (2 * n), triton.cdiv(n, BLOCK))
    with _on(y.device):
        wrap_triton(_geglu_backward_kernel)[grid](y, grad, dy, n, BLOCK=BLOCK, num_warps=4)
    return dy


with _quiet_without_triton():
    _geglu = triton_op("eridiffusion::geglu", mutates_args=())(_geglu_forward_impl)
    _geglu_backward = triton_op("eridiffusion::geglu_backward", mutates_args=())(_geglu_backward_impl)


def _save_y(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return _geglu_backward(grad, y)


_geglu.register_autograd(_backward, setup_context=_save_y)


def geglu(y: torch.Tensor) -> torch.Tensor:
    """x · gelu(gate) for y = [x, gate] (…, 2n), keeping y alone for backward (as `ops.geglu`)."""
    if y.shape[-1] % 2:
        raise ValueError(f"geglu: the last dim ({y.shape[-1]}) must be even")
    return _geglu(y)
