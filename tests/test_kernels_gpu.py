"""kernels.geglu's Triton kernels on the GPU: forward and input gradient against fp32 autograd
(within bf16 rounding, as close as inductor's plain-op kernels), eager and compiled with dynamic
token counts, and replayed in a CUDA graph; a compiled block recomputes the Triton op's output in
backward when asked (the partitioner keeps it otherwise)."""
from __future__ import annotations

import pytest
import torch

from eridiffusion import kernels
from test_ops import plain_geglu  # the spec: x · gelu(gate) in plain ops
from test_speed import check_recompute_keeps_less

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def errors(fn, y, dout):
    """Largest |error| of fn's output and input gradient against fp32 autograd on the same values."""
    y32 = y.detach().float().requires_grad_()
    ref = plain_geglu(y32)
    (ref_grad,) = torch.autograd.grad(ref, y32, dout.float())
    y = y.detach().requires_grad_()
    out = fn(y)
    (grad,) = torch.autograd.grad(out, y, dout)
    return (out.float() - ref).abs().max().item(), (grad.float() - ref_grad).abs().max().item()


@pytest.mark.parametrize("shape", [(2, 300, 2 * 640), (1, 77, 2 * 1000), (4, 1024, 2 * 5120)])
def test_triton_geglu_is_as_close_to_fp32_as_inductors_plain_ops(shape):
    assert kernels.available(torch.empty(0, device="cuda"))
    g = torch.Generator("cuda").manual_seed(0)
    y = 2 * torch.randn(shape, device="cuda", generator=g).bfloat16()
    dout = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda", generator=g).bfloat16()
    torch._dynamo.reset()
    ours = errors(kernels.geglu, y, dout)
    inductor = errors(torch.compile(plain_geglu, dynamic=False), y, dout)
    for e, limit in zip(ours, inductor):  # both round fp32 maths to bf16 once: a wrong formula is off by O(1)
        assert e <= 2 * limit + 1e-3, (ours, inductor)


def test_triton_geglu_compiles_with_dynamic_tokens_and_replays_in_a_cuda_graph():
    torch._dynamo.reset()
    lin = torch.nn.Linear(64, 2 * 96, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(lambda x: kernels.geglu(lin(x)).square().sum(), dynamic=True)
    for tokens in (40, 56):
        x = torch.randn(2, tokens, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ref_x = x.detach().clone().requires_grad_()
        fn(x).backward()
        plain_geglu(lin(ref_x)).square().sum().backward()
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=0.02, atol=0.02)

    x = torch.randn(2, 40, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs asks
        x.grad = None
        fn(x).backward()
    eager_grad = x.grad.clone()
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        fn(x).backward()
    x.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(x.grad, eager_grad, rtol=0, atol=0)


def test_a_compiled_block_recomputes_the_triton_geglu_output_in_backward():
    check_recompute_keeps_less("cuda", dim=128, tokens=256)
