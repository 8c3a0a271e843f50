"""UNet: parity with diffusers through its own ldm converter, checkpoint key layout, checkpointing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

import eridiffusion.models.unet as unet_mod
from eridiffusion.models.unet import (
    BasicTransformerBlock,
    ResBlock,
    UNet,
    UNetConfig,
    sdxl_vector,
    timestep_embedding,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"

# diffusers UNet2DConditionModel configs equal to ours. `attention_head_dim` is the number of
# heads in diffusers (its documented naming quirk), so it takes our per-level `num_heads`.
DIFFUSERS_TINY_SDXL = dict(
    sample_size=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=96,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=256,
)
DIFFUSERS_TINY_SD15 = dict(
    sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    attention_head_dim=4,
    cross_attention_dim=32,
    use_linear_projection=False,
)


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Make every parameter random, norms and biases included, so no layer is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def to_diffusers(ours: UNet, config: dict) -> UNet2DConditionModel:
    ckpt = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


def test_sdxl_tiny_matches_diffusers():
    cfg = UNetConfig.tiny()
    ours = UNet(cfg).eval()
    randomize(ours)
    ref = to_diffusers(ours, DIFFUSERS_TINY_SDXL)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 999])
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768.0, 1344, 16, 32, 832, 1216]])
    with torch.no_grad():
        a = ours(x, t, context, sdxl_vector(pooled, time_ids, cfg.addition_time_embed_dim))
        b = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        # the vector conditioning must matter, else a wrong `y` layout would go unnoticed
        c = ours(x, t, context, sdxl_vector(pooled, time_ids.flip(0), cfg.addition_time_embed_dim))
    diff = (a - b).abs().max().item()
    print(f"tiny SDXL UNet vs diffusers: max abs diff {diff:.3e}, output std {b.std():.3f}")
    assert a.shape == x.shape
    assert b.std() > 0.1 and (c - b).abs().max() > 1e-2
    assert diff <= 1e-5


def test_sd15_tiny_matches_diffusers():
    cfg = UNetConfig.tiny_sd15()
    ours = UNet(cfg).eval()
    randomize(ours, seed=2)
    ref = to_diffusers(ours, DIFFUSERS_TINY_SD15)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 16, generator=g)  # non-square
    t = torch.tensor([0.5, 731.0])
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    with torch.no_grad():
        a = ours(x, t, context)
        b = ref(x, t, context).sample
    diff = (a - b).abs().max().item()
    print(f"tiny SD1.5 UNet vs diffusers: max abs diff {diff:.3e}, output std {b.std():.3f}")
    assert a.shape == x.shape and b.std() > 0.1
    assert diff <= 1e-5


@pytest.mark.parametrize(
    "variant, fixture, count, params",
    [
        ("sdxl", "keys_unet_sdxl.json", 1680, 2_567_463_684),
        ("sd15", "keys_unet_sd15.json", 686, 859_520_964),
    ],
)
def test_full_size_keys_and_shapes_match_checkpoint(variant, fixture, count, params):
    ref = json.loads((FIXTURES / fixture).read_text())
    expected = {k: tuple(s) for k, s in ref["keys"]}
    assert ref["count"] == len(expected) == count and ref["params"] == params  # fixture itself
    with torch.device("meta"):
        model = UNet(getattr(UNetConfig, variant)())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}
    assert sum(p.numel() for p in model.parameters()) == params


def test_gradient_checkpointing_same_output_and_grads(monkeypatch):
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(type(getattr(fn, "__self__", fn)).__name__)
        assert kwargs == {"use_reentrant": False}
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(unet_mod, "checkpoint", counting_checkpoint)
    cfg = UNetConfig.tiny()
    model = UNet(cfg).train()
    randomize(model, seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, cfg.context_dim, generator=g)
    y = torch.randn(1, cfg.adm_in_channels, generator=g)
    w = torch.randn(1, 4, 8, 8, generator=g)

    def run(flag: bool):
        model.gradient_checkpointing = flag
        model.zero_grad(set_to_none=True)
        xi, ci = x.clone().requires_grad_(), context.clone().requires_grad_()
        out = model(xi, torch.tensor([400]), ci, y)
        (out * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.detach(), xi.grad, ci.grad, grads

    out0, gx0, gc0, grads0 = run(False)
    assert calls == []
    out1, gx1, gc1, grads1 = run(True)
    n_blocks = sum(isinstance(m, (ResBlock, BasicTransformerBlock)) for m in model.modules())
    assert len(calls) == n_blocks + 1 and set(calls) == {"ResBlock", "BasicTransformerBlock", "Sequential"}
    torch.testing.assert_close(out1, out0, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=1e-6)
    torch.testing.assert_close(gc1, gc0, rtol=0, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)
    # not in eval mode or under no_grad
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(x, torch.tensor([400]), context, y)
    model.train()
    with torch.no_grad():
        model(x, torch.tensor([400]), context, y)
    assert calls == []


def test_timestep_embedding_known_values():
    emb = timestep_embedding(torch.tensor([0, 1]), 4)
    # dim 4: half 2, freqs [1, 10000^(-1/2)] = [1, 0.01]; layout [cos, cos, sin, sin]
    expected = torch.tensor(
        [[1.0, 1.0, 0.0, 0.0], [math.cos(1.0), math.cos(0.01), math.sin(1.0), math.sin(0.01)]]
    )
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-7)
    assert emb.dtype == torch.float32
    t = torch.tensor([0.0, 1.0, 17.5, 500.0, 999.0])
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 320), ref, rtol=0, atol=1e-6)
    odd = timestep_embedding(torch.tensor([3.0]), 5)
    # dim 5: half 2 as for dim 4, then one zero of padding
    expected_odd = torch.tensor([[math.cos(3.0), math.cos(0.03), math.sin(3.0), math.sin(0.03), 0.0]])
    torch.testing.assert_close(odd, expected_odd)


def test_sdxl_vector_layout():
    pooled = torch.randn(2, 1280)
    time_ids = torch.tensor([[1024.0, 768, 0, 16, 1024, 1024], [512.0, 512, 8, 0, 1024, 1024]])
    y = sdxl_vector(pooled, time_ids)
    assert y.shape == (2, 2816) == (2, UNetConfig.sdxl().adm_in_channels)
    assert torch.equal(y[:, :1280], pooled)
    for i in range(6):  # each number gets its own 256-d sinusoid, in time_ids order
        block = y[:, 1280 + 256 * i : 1280 + 256 * (i + 1)]
        torch.testing.assert_close(block, timestep_embedding(time_ids[:, i], 256))


def test_runs_in_weight_dtype_and_checks_y():
    cfg = UNetConfig.tiny()
    model = UNet(cfg).eval()
    randomize(model, seed=6)
    x = torch.randn(1, 4, 8, 8)  # small: bf16 matmuls are slow on CPU
    context = torch.randn(1, 77, cfg.context_dim)
    y = torch.randn(1, cfg.adm_in_channels)
    with torch.no_grad():
        ref = model(x, torch.tensor([250]), context, y)
        out = model.to(torch.bfloat16)(x, 250, context, y)  # fp32 inputs, scalar timestep
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 0.05
    with pytest.raises(ValueError, match="sdxl_vector"):
        model(x, torch.tensor([1]), context)
