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
- Zero terminal SNR: Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", algorithm 1 (diffusers `rescale_zero_terminal_snr`).
- kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb (kohya below):
  Huber / smooth-L1 loss and its schedules (`library/train_util.py` `conditional_loss`,
  `get_huber_threshold_if_needed`; Khrapov et al. 2024, "Improving Diffusion Models's Data-
  Corruption Resistance using Scheduled Pseudo-Huber Loss"), debiased estimation
  (`library/custom_train_functions.py` `apply_debiased_estimation`; Yu et al. 2024, "Debias
  the Training of Diffusion Models"), multi-resolution noise (`pyramid_noise_like`, after
  J. Whitaker 2023, "Multi-Resolution Noise for Diffusion Model Training") and input
  perturbation (`get_noise_noisy_latents_and_timesteps`; Ning et al. 2023, "Input
  Perturbation Reduces Exposure Bias in Diffusion Models", eq. 9).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PREDICTIONS = ("epsilon", "v_prediction")
LOSSES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def scaled_linear_betas(n: int = 1000, start: float = 0.00085, end: float = 0.012) -> Tensor:
    """Betas of SD1.x/SDXL: linear in sqrt(beta) from sqrt(start) to sqrt(end), squared.

    Computed in float64 like CompVis' make_beta_schedule, returned as float32 (n,).
    """
    return (torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2).float()


def alphas_cumprod(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 − beta_s) (Ho et al. 2020, eq. 4), accumulated in
    float64 like CompVis/sgm and returned as float32 (n,)."""
    return torch.cumprod(1.0 - betas.double(), dim=0).float()


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose last alpha_bar is exactly 0 (signal-to-noise ratio 0 at t = T − 1).

    Lin et al. 2023, algorithm 1: shift sqrt(alpha_bar) so its last value is 0 and scale it so
    its first value is unchanged, then recover the betas. In float64, returned as float32 (n,).
    Training on it needs v-prediction (an epsilon target says nothing at SNR 0).
    """
    sqrt_ab = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return (1.0 - alphas).float()


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


def debiased_weight(t: Tensor, ac: Tensor, prediction: str) -> Tensor:
    """Per-sample loss weight of debiased estimation (kohya `apply_debiased_estimation`), (B,):
    1 / sqrt(snr_t) for an epsilon loss, 1 / (snr_t + 1) for a v loss, snr_t capped at 1000
    (it is infinite where alpha_bar_t = 1)."""
    a = ac.to(device=t.device, dtype=torch.float32)[t.long()]
    snr = (a / (1.0 - a)).clamp(max=1000.0)
    if prediction == "epsilon":
        return 1.0 / snr.sqrt()
    if prediction == "v_prediction":
        return 1.0 / (snr + 1.0)
    raise ValueError(f"prediction={prediction!r} is unknown: use one of {PREDICTIONS}")


def huber_threshold(t: Tensor, ac: Tensor, c: float, schedule: str) -> Tensor:
    """The Huber threshold per sample (B,) float32 (kohya `get_huber_threshold_if_needed`, huber_scale 1):
    "constant": c; "exponential": exp(−alpha·t) with alpha = −ln(c) / T (1 at t = 0, c at t = T);
    "snr": (1 − c) / (1 + sigma_t)² + c with sigma_t = sqrt((1 − alpha_bar_t) / alpha_bar_t)."""
    n_train = ac.shape[0]
    tf = t.to(torch.float32)
    if schedule == "constant":
        return torch.full_like(tf, c)
    if schedule == "exponential":
        return torch.exp(tf * (math.log(c) / n_train))
    if schedule == "snr":
        a = ac.to(device=t.device, dtype=torch.float32)[t.long()]
        sigma = ((1.0 - a) / a) ** 0.5
        return (1.0 - c) / (1.0 + sigma) ** 2 + c
    raise ValueError(f"huber_schedule={schedule!r} is unknown: use one of {HUBER_SCHEDULES}")


def elementwise_loss(pred: Tensor, target: Tensor, loss: str = "l2", c: Tensor | None = None) -> Tensor:
    """Per-element loss (kohya `conditional_loss`, reduction "none"); c (B,) is `huber_threshold`.

    "l2": (pred − target)²; "huber" (pseudo-Huber): 2c·(sqrt((pred − target)² + c²) − c);
    "smooth_l1": 2·(sqrt((pred − target)² + c²) − c). Both tend to the squared error for
    |pred − target| << c and grow linearly beyond it.
    """
    if loss == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is unknown: use one of {LOSSES}")
    c = c.view(-1, *([1] * (pred.ndim - 1))).to(pred.dtype)  # (B, 1, 1, 1)
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * root if loss == "huber" else 2 * root


def multires_noise(noise: Tensor, iterations: int, discount: float, generator: torch.Generator | None = None) -> Tensor:
    """Multi-resolution ("pyramid") noise (kohya `pyramid_noise_like`): for i < iterations,
    add discount^i · N(0, 1) drawn at the size / r^i (r uniform in [2, 4), floored, at least 1)
    and bilinearly upsampled, stopping after a 1-pixel level; then divide by the std of the
    whole batch. Draws (r, then the level's noise) come from `generator` on its device, in
    float32; the result is on noise's device and dtype.
    """
    if iterations <= 0:
        return noise
    draw_device = generator.device if generator is not None else noise.device
    b, c, h, w = noise.shape
    out = noise.float()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator, device=draw_device)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn((b, c, hn, wn), generator=generator, device=draw_device, dtype=torch.float32)
        out = out + F.interpolate(level.to(noise.device), size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(noise.dtype)


def perturbation(noise: Tensor, gamma: float, generator: torch.Generator | None = None) -> Tensor:
    """Input perturbation (Ning et al. 2023; kohya `ip_noise_gamma`): gamma·xi, xi ~ N(0, 1) like
    noise, drawn on the generator's device in float32. x_t is built from noise + gamma·xi while
    the target keeps noise."""
    draw_device = generator.device if generator is not None else noise.device
    xi = torch.randn(noise.shape, generator=generator, device=draw_device, dtype=torch.float32)
    return (gamma * xi).to(device=noise.device, dtype=noise.dtype)


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
