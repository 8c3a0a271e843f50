"""train.fp8_matmul on the GPU (compute capability ≥ 8.9): 200 LoRA steps on a fixed problem train
as in bf16 (mean loss of the last 50 steps within 2%, the learned LoRA's outputs close), and the
compiled + CUDA-graphed fp8 step computes the eager fp8 step's losses."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eridiffusion import diffusion, networks
from eridiffusion.fp8_matmul import disable_fp8_matmul, enable_fp8_matmul
from eridiffusion.models.unet import UNet, UNetConfig, sdxl_vector
from eridiffusion.speed import optimize_for_training

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from steps import training_step  # noqa: E402  (bench-only: the whole step in one CUDA graph)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                       reason="needs CUDA compute capability 8.9 (float8 GEMMs)"),
]

# A tiny-ish SDXL-layout UNet (channels 64/128/256, 2 transformer blocks a level): GEMMs of a few
# hundred tokens by 64-256 channels, every one of them in float8 with fp8_matmul.
CFG = UNetConfig(**{**UNetConfig.tiny().__dict__, "model_channels": 64, "transformer_depth": (0, 2, 2)})
LAST = 50  # steps averaged at the end
LOSS_RTOL = 0.02  # the issue's bar: mean of the last 50 losses within 2% of bf16's
# the trained LoRA's output change, fp8 run vs bf16 run, both judged in bf16 (`lora_change`). Measured
# on an H200 (2026-11-29, torch 2.11) with the first version (one scale per tensor, e5m2 gradients):
# loss_rel 0.0008, cosine 0.9964, relative 0.085; limits with margin. The rowwise version with bf16 input
# gradients (2026-11-30) passed them; its figures were not printed
LORA_COSINE, LORA_REL = 0.98, 0.2


def fixed_problem(device, n: int = 8, size: int = 32, seed: int = 0):
    """n fixed latents with a fixed context each: the LoRA learns to denoise them."""
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn(n, 4, size, size, device=device, generator=g).bfloat16()
    ctx = torch.randn(n, 77, CFG.context_dim, device=device, generator=g).bfloat16()
    pooled = torch.randn(n, CFG.adm_in_channels - 6 * CFG.addition_time_embed_dim, device=device, generator=g)
    time_ids = torch.tensor([[size * 8.0, size * 8, 0, 0, size * 8, size * 8]], device=device).repeat(n, 1)
    y = sdxl_vector(pooled, time_ids, CFG.addition_time_embed_dim).bfloat16()
    return x0, ctx, y


def build(device, fp8: bool, compile: bool = False):
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet(CFG)
    unet.to(torch.bfloat16).requires_grad_(False)
    net = networks.inject(unet, "unet", rank=8, alpha=8)  # attention q/k/v/out and proj_in/out, ff
    optimize_for_training(unet, compile=compile, fused_qkv=True)
    if fp8:
        enable_fp8_matmul(unet)
    return unet, net


def train(device, fp8: bool, steps: int, batch: int = 4, compile: bool = False, graph: bool = False):
    """`steps` AdamW steps (LR 1e-3) of epsilon loss; returns (losses, unet, net)."""
    unet, net = build(device, fp8, compile)
    x0s, ctxs, ys = fixed_problem(device)
    ac = diffusion.alphas_cumprod(diffusion.scaled_linear_betas()).to(device)
    params = net.adapter_params()
    opt = torch.optim.AdamW(params, lr=1e-3, fused=device == "cuda", capturable=graph)

    def body(x0, t, noise, ctx, y):
        xt = diffusion.add_noise(x0.float(), noise.float(), t, ac).bfloat16()
        loss = F.mse_loss(unet(xt, t, ctx, y).float(), noise.float())
        loss.backward()
        opt.step()
        return loss

    step = training_step(body, params, opt, graph=graph)
    g = torch.Generator(device=device).manual_seed(1)  # the same batches, timesteps and noise in every run
    losses = []
    for _ in range(steps):
        i = torch.randint(0, len(x0s), (batch,), device=device, generator=g)
        t = torch.randint(0, 1000, (batch,), device=device, generator=g)
        noise = torch.randn(batch, *x0s.shape[1:], device=device, generator=g).bfloat16()
        losses.append(float(step(x0s[i], t, noise, ctxs[i], ys[i]).detach()))
    return torch.tensor(losses), unet, net


@torch.no_grad()
def lora_change(unet, net, device) -> torch.Tensor:
    """What the trained LoRA adds to the UNet's output on the fixed latents at t = 500, computed in
    bf16 (fp8 off) so both runs' LoRAs are judged by the same forward."""
    disable_fp8_matmul(unet)
    x0s, ctxs, ys = fixed_problem(device)
    t = torch.full((len(x0s),), 500, device=device)
    with_lora = unet(x0s, t, ctxs, ys).float()
    net.set_multiplier(0.0)
    base = unet(x0s, t, ctxs, ys).float()
    net.set_multiplier(1.0)
    return with_lora - base


def compare(device, steps: int = 200) -> dict:
    ref_losses, ref_unet, ref_net = train(device, fp8=False, steps=steps)
    losses, unet, net = train(device, fp8=True, steps=steps)
    ref_d, d = lora_change(ref_unet, ref_net, device), lora_change(unet, net, device)
    return {
        "first_loss": (ref_losses[:LAST].mean().item(), losses[:LAST].mean().item()),
        "last_loss": (ref_losses[-LAST:].mean().item(), losses[-LAST:].mean().item()),
        "loss_rel": abs(losses[-LAST:].mean() / ref_losses[-LAST:].mean() - 1).item(),
        "lora_cosine": F.cosine_similarity(d.flatten(), ref_d.flatten(), dim=0).item(),
        "lora_rel": ((d - ref_d).norm() / ref_d.norm()).item(),
    }


def test_fp8_lora_training_tracks_bf16_over_200_steps():
    r = compare("cuda")
    print("fp8_matmul vs bf16, 200 steps:", r)
    assert r["last_loss"][0] < 0.98 * r["first_loss"][0]  # the problem is being learned at all
    assert r["loss_rel"] < LOSS_RTOL
    assert r["lora_cosine"] > LORA_COSINE and r["lora_rel"] < LORA_REL


def test_compiled_graphed_fp8_step_matches_eager_fp8_step():
    ref_losses, _, _ = train("cuda", fp8=True, steps=6)
    losses, _, _ = train("cuda", fp8=True, steps=6, compile=True, graph=True)
    print("fp8 compiled+graph vs eager: losses", losses.tolist(), ref_losses.tolist())
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=2e-3)


if __name__ == "__main__":  # the same comparison on the CPU (torch._scaled_mm runs there): the figures above
    torch.set_num_threads(2)
    print(compare("cpu", int(sys.argv[1]) if len(sys.argv) > 1 else 200))
