"""Diffusion maths for training: noise schedule, forward process, targets, loss weights.

Small pure functions, kept apart from the network (k-diffusion's habit). Schedules are
float32 tables indexed by integer timesteps t in [0, 1000); every function takes a batch
of timesteps (B,) on any device and broadcasts the looked-up coefficient over x (B, ...).

Sources:
- DDPM forward process and epsilon target: Ho et al. 2020, "Denoising Diffusion
  Probabilistic Models", eq. 4 and eq. 14.
- "scaled_linear" betas of latent diffusion: Rombach et al. 2022 (CompVis
  ldm/modules/diffusionmodules/util.py make_beta_schedule, "linear" branch).
- v-prediction: Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
  Diffusion Models", section 4 (v = alpha·eps − sigma·x0).
- Min-SNR-gamma loss weighting: Hang et al. 2023, "Efficient Diffusion Training via
  Min-SNR Weighting Strategy", eq. 10.
- Offset noise: Nicholas Guttenberg, crosslabs.org 2023, "Diffusion with Offset Noise".
"""
from __future__ import annotations

import torch
from torch import Tensor

PREDICTIONS = ("epsilon", "v_prediction")


def scaled_linear_betas(n: int = 1000, start: float = 0.00085, end: float = 0.012) -> Tensor:
    """Betas of SD1.x/SDXL: linear in sqrt(beta) from sqrt(start) to sqrt(end), squared.

    Computed in float64 like CompVis' make_beta_schedule, returned as float32 (n,).
    """
    return (torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2).float()


def alphas_cumprod(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 − beta_s) (Ho et al. 2020, eq. 4), accumulated in
    float64 like CompVis/sgm and returned as float32 (n,)."""
    return torch.cumprod(1.0 - betas.double(), dim=0).float()


def sigmas_from_alphas_cumprod(ac: Tensor) -> Tensor:
    """Noise-to-signal ratio sigma_t = sqrt((1 − alpha_bar_t) / alpha_bar_t), ascending in t.

    x_t / sqrt(alpha_bar_t) = x0 + sigma_t·eps is the variance-exploding form samplers use
    (Karras et al. 2022, section 2).
    """
    return ((1.0 - ac) / ac) ** 0.5


def _at(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """table[t] (float32 lookup on t's device) shaped (B, 1, ..., 1) to broadcast over x."""
    values = table.to(device=t.device, dtype=torch.float32)[t.long()]
    return values.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)  # (B, 1, 1, 1)


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, ac: Tensor) -> Tensor:
    """q(x_t | x0): x_t = sqrt(alpha_bar_t)·x0 + sqrt(1 − alpha_bar_t)·noise (Ho et al. 2020, eq. 4)."""
    return _at(ac**0.5, t, x0) * x0 + _at((1.0 - ac) ** 0.5, t, x0) * noise


def velocity(x0: Tensor, noise: Tensor, t: Tensor, ac: Tensor) -> Tensor:
    """v = sqrt(alpha_bar_t)·noise − sqrt(1 − alpha_bar_t)·x0 (Salimans & Ho 2022, section 4)."""
    return _at(ac**0.5, t, x0) * noise - _at((1.0 - ac) ** 0.5, t, x0) * x0


def target(prediction: str, x0: Tensor, noise: Tensor, t: Tensor, ac: Tensor) -> Tensor:
    """What the network is trained to output: the noise ("epsilon") or v ("v_prediction")."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return velocity(x0, noise, t, ac)
    raise ValueError(f"prediction={prediction!r} is unknown: use one of {PREDICTIONS}")


def sample_timesteps(
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    low: int = 0,
    high: int = 1000,
) -> Tensor:
    """n training timesteps drawn uniformly from the integers [low, high) (Ho et al. 2020, alg. 1).

    Drawn on the generator's device (so a CPU generator gives the same numbers for any
    target device) and moved to `device`.
    """
    draw_device = generator.device if generator is not None else device
    return torch.randint(low, high, (n,), generator=generator, device=draw_device).to(device)


def min_snr_weight(t: Tensor, ac: Tensor, gamma: float, prediction: str) -> Tensor:
    """Per-sample loss weight of Min-SNR-gamma (Hang et al. 2023, eq. 10), shape (B,).

    snr_t = alpha_bar_t / (1 − alpha_bar_t). The x0-loss weight min(snr, gamma) is
    expressed for the network's own loss: ||eps − eps_hat||² = snr·||x0 − x0_hat||² and
    ||v − v_hat||² = (snr + 1)·||x0 − x0_hat||², so it is divided by snr for an epsilon
    loss and by snr + 1 for a v loss.
    """
    a = ac.to(device=t.device, dtype=torch.float32)[t.long()]
    snr = a / (1.0 - a)
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"prediction={prediction!r} is unknown: use one of {PREDICTIONS}")


def offset_noise(noise: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """noise + strength·N(0, 1) drawn once per (sample, channel) and constant over space.

    Lets the model learn to shift the mean brightness of an image (Guttenberg,
    crosslabs 2023). Drawn on the generator's device in float32, then moved to noise's.
    """
    if strength == 0:
        return noise
    draw_device = generator.device if generator is not None else noise.device
    shape = (*noise.shape[:2], *([1] * (noise.ndim - 2)))  # (B, C, 1, 1)
    offset = torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32)
    return noise + strength * offset.to(device=noise.device, dtype=noise.dtype)
