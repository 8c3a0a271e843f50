"""Shared by the networks tests: fixed inputs, every part's outputs, LoRAs on every part."""

from __future__ import annotations

import torch

from eridiffusion import networks
from eridiffusion.models.unet import sdxl_vector

B = 2


def text_ids(seed: int = 0, n: int = 77) -> torch.Tensor:
    """(B, 77) ids: BOS, random tokens, EOS (the largest id), padding with EOS (CLIP-L style)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((B, n), 49407)
    ids[:, 0] = 49406
    for b, length in enumerate((9, 14)):
        ids[b, 1:length] = torch.randint(0, 49406, (length - 1,), generator=g)
    return ids


def unet_inputs(cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(B, 8, cfg.context_dim, generator=g)
    if cfg.adm_in_channels is None:
        return (x, t, ctx), {}
    pooled = torch.randn(B, cfg.adm_in_channels - 6 * cfg.addition_time_embed_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 32, 16, 832, 1216]])
    return (x, t, ctx, sdxl_vector(pooled, time_ids, cfg.addition_time_embed_dim)), {"pooled": pooled, "time_ids": time_ids}


@torch.no_grad()
def outputs(c) -> dict[str, torch.Tensor]:
    """Every part's output on fixed inputs: UNet noise prediction, text hidden and pooled."""
    out = {"unet": c.unet(*unet_inputs(c.unet.cfg)[0])}
    for part in ("te1", "te2"):
        m = getattr(c, part)
        if m is not None:
            o = m(text_ids())
            out[part] = torch.cat([o.hidden.flatten(1), o.last.flatten(1), o.pooled], dim=1)
    return out


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@torch.no_grad()
def randomize(networks, seed: int = 1, std: float = 0.05):
    """Give `up` non-zero values, as training would (down keeps its kaiming init)."""
    g = torch.Generator().manual_seed(seed)
    for net in networks:
        for m in net.loras.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * std)


def inject_all(c, rank=4, alpha=2.0, conv_rank=None, conv_alpha=None, dropout=0.0):
    nets = {"unet": networks.inject(c.unet, "unet", rank, alpha, conv_rank=conv_rank, conv_alpha=conv_alpha, dropout=dropout)}
    if c.te2 is None:
        nets["te"] = networks.inject(c.te1, "te", rank, alpha, dropout=dropout)
    else:
        nets["te1"] = networks.inject(c.te1, "te1", rank, alpha, dropout=dropout)
        nets["te2"] = networks.inject(c.te2, "te2", rank, alpha, dropout=dropout)
    return nets


FAMILIES = ["sdxl-tiny", "sd15-tiny"]
