"""The optimised training step computes the plain step's losses (CUDA only)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eridiffusion import networks
from eridiffusion.models.unet import UNet, UNetConfig
from eridiffusion.speed import optimize_for_training

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from steps import training_batch, training_step  # noqa: E402  (bench-only: the whole step in one CUDA graph)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run(cfg: UNetConfig, steps: int, compile: bool, graph: bool, batch: int = 2, size: int = 32,
        ckpt: bool = False):
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet(cfg)
    unet.to(torch.bfloat16)
    net = networks.inject(unet, "unet", rank=8, alpha=8)
    torch.manual_seed(1)
    for p in net.lora_parameters():  # non-zero up weights, so the LoRA path matters from step 0
        torch.nn.init.normal_(p, std=0.02)
    unet.gradient_checkpointing = ckpt
    optimize_for_training(unet, compile=compile, fused_qkv=True)
    params = net.lora_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=graph)

    def body(x, t, ctx, y, target):
        loss = F.mse_loss(unet(x, t, ctx, y).float(), target.float())
        loss.backward()
        opt.step()
        return loss

    step = training_step(body, params, opt, graph=graph)
    g = torch.Generator(device="cuda").manual_seed(2)
    losses = []
    for _ in range(steps):
        losses.append(step(*training_batch(cfg, batch, size, g)).item())
    return torch.tensor(losses), torch.cat([p.detach().flatten() for p in params])


def test_cuda_graph_step_equals_eager_step():
    ref_losses, ref_params = run(UNetConfig.tiny(), 6, compile=False, graph=False)
    losses, params = run(UNetConfig.tiny(), 6, compile=False, graph=True)
    print("graph vs eager: max loss diff", (losses - ref_losses).abs().max().item())
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-6)
    torch.testing.assert_close(params, ref_params, rtol=0, atol=1e-6)


def test_compiled_graphed_step_matches_eager_to_bf16_tolerance():
    ref_losses, _ = run(UNetConfig.tiny(), 6, compile=False, graph=False)
    losses, _ = run(UNetConfig.tiny(), 6, compile=True, graph=True)
    print("compiled+graph vs eager: losses", losses.tolist(), ref_losses.tolist())
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=2e-3)


def test_checkpointed_compiled_graphed_step_matches_eager_to_bf16_tolerance():
    """Checkpointing inside the compiled blocks (inductor recomputes in the compiled backward)."""
    ref_losses, _ = run(UNetConfig.tiny(), 6, compile=False, graph=False)
    losses, _ = run(UNetConfig.tiny(), 6, compile=True, graph=True, ckpt=True)
    print("checkpointed compiled+graph vs eager: losses", losses.tolist(), ref_losses.tolist())
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=2e-3)


def test_graphed_forward_equals_eager_forward():
    from eridiffusion.speed import GraphedForward

    torch.manual_seed(0)
    cfg = UNetConfig.tiny()
    with torch.device("cuda"):
        unet = UNet(cfg).eval()
    graphed = GraphedForward(unet)
    g = torch.Generator(device="cuda").manual_seed(3)
    for _ in range(3):  # new values each call, same buffers underneath
        x = torch.randn(2, 4, 32, 32, device="cuda", generator=g)
        t = torch.rand(2, device="cuda", generator=g) * 999
        ctx = torch.randn(2, 77, cfg.context_dim, device="cuda", generator=g)
        y = torch.randn(2, cfg.adm_in_channels, device="cuda", generator=g)
        with torch.no_grad():
            ref = unet(x, t, ctx, y=y)
        torch.testing.assert_close(graphed(x, t, ctx, y=y), ref, rtol=0, atol=0)


def test_checkpointing_a_compiled_block_keeps_only_what_the_eager_checkpoint_keeps(kept_bytes):
    """Inductor must not turn gradient checkpointing into partial saving: the checkpoint stays
    outside the compiled body, so the bytes kept for backward equal the eager checkpoint's."""
    from eridiffusion.speed import compile_regions

    def kept_mib(compiled: bool) -> float:
        torch.manual_seed(0)
        torch._dynamo.reset()
        with torch.device("cuda"):
            unet = UNet(UNetConfig.tiny())
        unet.to(torch.bfloat16).requires_grad_(False)
        networks.inject(unet, "unet", rank=8, alpha=8)
        unet.train()
        unet.gradient_checkpointing = True
        if compiled:
            compile_regions(unet)
        args = (torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.bfloat16), torch.tensor([5, 900], device="cuda"),
                torch.randn(2, 77, 96, device="cuda", dtype=torch.bfloat16),
                torch.randn(2, 256, device="cuda", dtype=torch.bfloat16))
        unet(*args)  # compiles
        return kept_bytes(unet, *args, exclude=list(unet.parameters()))[1] / 2**20

    eager, compiled = kept_mib(False), kept_mib(True)
    print(f"kept for backward with checkpointing: eager {eager:.2f} MiB, compiled {compiled:.2f} MiB")
    assert compiled <= eager * 1.05
