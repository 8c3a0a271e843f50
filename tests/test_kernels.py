"""kernels.geglu's custom ops on the CPU (their plain-torch path): shapes under torch.compile with
dynamic dims, inductor's numbers, the device switch. Autograd's numbers and y alone kept: tests/test_ops.py;
the Triton kernels themselves: tests/test_kernels_gpu.py."""
from __future__ import annotations

import pytest
import torch

from eridiffusion import kernels
from test_ops import plain_geglu  # the spec: x · gelu(gate) in plain ops


def test_geglu_op_compiles_with_dynamic_token_counts():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(lambda y: kernels.geglu(y) * 2.0, backend="aot_eager", dynamic=True)
    for tokens in (5, 9, 3):
        y = torch.randn(2, tokens, 16, dtype=torch.float64, requires_grad=True)
        ref = y.detach().clone().requires_grad_()
        out = compiled(y)
        assert out.shape == (2, tokens, 8)
        out.backward(torch.ones_like(out))
        (plain_geglu(ref) * 2.0).backward(torch.ones_like(out))
        torch.testing.assert_close(out, plain_geglu(ref) * 2.0)
        torch.testing.assert_close(y.grad, ref.grad)
    # the custom op's fake kernel traced with symbolic tokens: one graph served all three counts
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_geglu_op_in_inductor_on_the_cpu_matches_eager():
    torch._dynamo.reset()
    y = torch.randn(3, 10, 32, requires_grad=True)
    ref = y.detach().clone().requires_grad_()
    out = torch.compile(kernels.geglu)(y)
    out.sum().backward()
    plain_geglu(ref).sum().backward()
    torch.testing.assert_close(out, plain_geglu(ref))
    torch.testing.assert_close(y.grad, ref.grad)


def test_geglu_refuses_an_odd_last_dim():
    with pytest.raises(ValueError, match="must be even"):
        kernels.geglu(torch.zeros(2, 5))


def test_launches_switch_to_the_tensors_device_only_when_it_is_not_the_current_one(monkeypatch):
    """Triton launches on the current device: a single process training on cuda:1 must switch."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: ("switch to", d))
    assert kernels._on(torch.device("cuda", 1)) == ("switch to", torch.device("cuda", 1))
    assert not isinstance(kernels._on(torch.device("cuda", 0)), tuple)
    assert not isinstance(kernels._on(torch.device("cuda")), tuple)
