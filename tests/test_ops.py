"""ops.geglu (and kernels.geglu's op on its CPU path) and ops.Conv2d: autograd's numbers, fewer
tensors kept for backward."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from eridiffusion import kernels, ops


def plain_geglu(y):
    x, gate = y.chunk(2, dim=-1)
    return x * F.gelu(gate)


@pytest.mark.parametrize("geglu", [ops.geglu, kernels.geglu], ids=["ops", "kernels-op-cpu-path"])
def test_geglu_gives_autograds_gradient_bit_for_bit_and_keeps_y_alone(kept_bytes, geglu):
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        y = torch.randn(3, 5, 16, generator=g).to(dtype)
        grad = torch.randn(3, 5, 8, generator=g).to(dtype)
        y1, y2 = y.clone().requires_grad_(), y.clone().requires_grad_()
        out1, kept1 = kept_bytes(geglu, y1)
        out2, kept2 = kept_bytes(plain_geglu, y2)
        out1.backward(grad)
        out2.backward(grad)
        assert torch.equal(out1, out2) and torch.equal(y1.grad, y2.grad)
        assert kept1 == y.numel() * y.element_size()  # y alone
        assert kept2 == kept1 * 3 // 2  # autograd also keeps gelu(gate)
    with torch.no_grad():  # no autograd: the plain formula
        assert torch.equal(geglu(y), plain_geglu(y))


def test_conv2d_with_a_frozen_weight_keeps_no_input_and_gives_the_input_gradient(kept_bytes):
    torch.manual_seed(0)
    conv = ops.Conv2d(6, 4, 3, stride=2, padding=1)
    ref = torch.nn.Conv2d(6, 4, 3, stride=2, padding=1)
    ref.load_state_dict(conv.state_dict())
    assert list(conv.state_dict()) == ["weight", "bias"]
    conv.requires_grad_(False)
    ref.requires_grad_(False)
    x = torch.randn(2, 6, 9, 7)
    grad = torch.randn(2, 4, 5, 4)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, kept1 = kept_bytes(conv, x1)
    out2, kept2 = kept_bytes(ref, x2)
    out1.backward(grad)
    out2.backward(grad)
    assert torch.equal(out1, out2)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    weight = conv.weight.numel() * 4
    assert kept1 == weight and kept2 == weight + x.numel() * 4  # autograd's conv keeps x as well


def test_conv2d_with_a_trainable_weight_is_plain_conv2d():
    torch.manual_seed(0)
    conv = ops.Conv2d(3, 2, 3, padding=1)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    out = conv(x)
    assert out.grad_fn.name() == "ConvolutionBackward0"
    out.sum().backward()
    assert conv.weight.grad is not None and x.grad is not None


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="CPU inductor needs a C++ compiler (g++)")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("compiled", ["plain", "function"])
def test_compiled_lora_linear_adds_without_addmm(tmp_path, monkeypatch, bias, compiled):
    """Inside inductor graphs the LoRA update (and the bias) are plain adds: inductor turns
    `mm + c` with a full-size c into addmm, which first copies c into the output (one device copy
    per layer and step, bench/kernels.py), unless the adds see views. Same numbers as eager,
    whether the graph holds plain ops or the autograd.Function (`ops.COMPILED`)."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # compiled here, not loaded from a cache
    monkeypatch.setattr(ops, "COMPILED", compiled)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 32, generator=g)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g) if bias else None
    down, up = torch.randn(4, 32, generator=g), torch.randn(48, 4, generator=g)

    def step(x, down, up):
        out = ops.lora_linear(x, w, b, down, up)
        out.square().sum().backward()
        return out

    leaves = [t.clone().requires_grad_() for t in (x, down, up)]
    torch._dynamo.reset()
    out, codes = run_and_get_code(torch.compile(step, backend="inductor"), *leaves)
    torch._dynamo.reset()
    eager = [t.clone().requires_grad_() for t in (x, down, up)]
    ref = step(*eager)
    assert len(codes) == 2  # forward and backward graphs
    assert not [c for c in codes if "addmm" in c]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, e in zip(leaves, eager):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-4)
