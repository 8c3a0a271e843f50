"""Samplers for sample images, k-diffusion style.

A sampler sees the network only as a denoiser D(x, sigma) -> x0 on the variance-exploding
form x = x0 + sigma·eps (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", section 2), where x = x_t / sqrt(alpha_bar_t) of the
DDPM chain and sigma = sqrt((1 − alpha_bar_t) / alpha_bar_t). `Denoiser` builds D from an
eps- or v-prediction UNet; every sampler is a free function with one signature

    sample_xxx(model, x, sigmas, callback=None, noise_sampler=None) -> x0

taking the start latent x at noise level sigmas[0] (its scale: see `sigmas_for`) and a
descending schedule `sigmas` (steps + 1,) that ends with 0.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .diffusion import PREDICTIONS, sigmas_from_alphas_cumprod

NoiseSampler = Callable[[Tensor, Tensor], Tensor]
SPACINGS = ("leading", "linspace", "trailing")
# a zero-terminal-SNR schedule's alpha_bar ends at 0 (infinite sigma); diffusers' Euler
# schedulers set that entry to 2^-24 ("close to 0 without being 0"), so do we (sigma_max ≈ 4096)
MIN_ALPHA_CUMPROD = 2.0**-24


def _sampling_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """Ascending sigmas (T,) of a training table, finite for a zero-terminal-SNR one too."""
    return sigmas_from_alphas_cumprod(alphas_cumprod.float().clamp(min=MIN_ALPHA_CUMPROD))


class Denoiser(nn.Module):
    """D(x, sigma) = x0 estimate from a DDPM-trained network net(x_t, t, **cond).

    The network sees x_t = x / sqrt(sigma² + 1) and the (fractional) timestep t whose
    log-sigma is linearly interpolated in the training table (k-diffusion DiscreteSchedule,
    diffusers `_sigma_to_t`); `quantize=True` rounds t to the nearest trained timestep
    (diffusers DPMSolverMultistep with Karras sigmas, ComfyUI).
    eps: x0 = x − sigma·eps. v (Salimans & Ho 2022): x0 = c_skip·x + c_out·v with
    c_skip = 1 / (sigma² + 1), c_out = −sigma / sqrt(sigma² + 1).
    """

    def __init__(self, model: nn.Module, alphas_cumprod: Tensor, prediction: str = "epsilon", quantize: bool = False):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} is unknown: use one of {PREDICTIONS}")
        self.model = model
        self.prediction = prediction
        self.quantize = quantize
        log_sigmas = _sampling_sigmas(alphas_cumprod).log()
        self.register_buffer("log_sigmas", log_sigmas, persistent=False)  # (T,) ascending

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Timestep (B,) float32 for sigma (B,) by interpolation in log-sigma."""
        log_sigma = sigma.float().clamp(min=1e-10).log()
        table = self.log_sigmas.to(log_sigma.device)
        low = (torch.searchsorted(table, log_sigma, right=True) - 1).clamp(0, table.shape[0] - 2)
        lo, hi = table[low], table[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = low + w
        return t.round() if self.quantize else t

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        s = sigma.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        c_in = (s**2 + 1) ** -0.5
        out = self.model(x * c_in.to(x.dtype), self.sigma_to_t(sigma), **cond).to(x.dtype)
        if self.prediction == "epsilon":
            return x - s.to(x.dtype) * out
        return x * (c_in**2).to(x.dtype) - out * (s * c_in).to(x.dtype)


def rescale_cfg(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """CFG rescale (Lin et al. 2023, section 3.4, eq. 15–16; diffusers `rescale_noise_cfg`):
    scale the guided prediction to the per-sample std of the conditional one over (C, H, W),
    then mix: rescale·guided·(std_cond / std_guided) + (1 − rescale)·guided."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    return rescale * (guided * (std_cond / std_guided)) + (1 - rescale) * guided


def cfg_model(model: Callable[..., Tensor], cond: dict[str, Tensor], uncond: dict[str, Tensor], scale: float,
              rescale: float = 0.0):  # fmt: skip
    """Classifier-free guidance (Ho & Salimans 2022): D = D_u + scale·(D_c − D_u).

    `model` is a Denoiser taking conditioning as keywords (context=..., y=...); cond and
    uncond run as one batch [uncond, cond]. Guiding x0 equals guiding eps or v, since
    both are affine in the network output with the same coefficients. `rescale` > 0 applies
    `rescale_cfg` to the network's own output (v or eps) as diffusers does: the guided and
    conditional outputs are recovered from x0 as (x − x0) / sigma, an affine map whose
    rescaling then commutes back (used with zero-terminal-SNR models, rescale 0.7).
    """
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def denoise(x: Tensor, sigma: Tensor | float) -> Tensor:
        if scale == 1.0:
            return model(x, sigma, **cond)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        x0_u, x0_c = model(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        guided = x0_u + scale * (x0_c - x0_u)
        if rescale == 0:
            return guided
        out_c, out_g = _network_output(model, x, sigma, x0_c), _network_output(model, x, sigma, guided)
        return _x0_from_output(model, x, sigma, rescale_cfg(out_g, out_c, rescale))

    return denoise


def _coefficients(model, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) with x0 = a·x + b·out for the Denoiser's prediction (see `Denoiser`), (B, 1, 1, 1)."""
    s = sigma.view(-1, *([1] * (x.ndim - 1))).to(torch.float32)
    if getattr(model, "prediction", "epsilon") == "epsilon":
        return torch.ones_like(s), -s
    c_in = (s**2 + 1) ** -0.5
    return c_in**2, -s * c_in


def _network_output(model, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    a, b = _coefficients(model, x, sigma)
    return ((x0.float() - a * x.float()) / b).to(x0.dtype)


def _x0_from_output(model, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
    a, b = _coefficients(model, x, sigma)
    return (a * x.float() + b * out.float()).to(out.dtype)


def _interp(table: Tensor, t: Tensor) -> Tensor:
    """Piecewise-linear table lookup at fractional t (numpy.interp on 0..T-1), float64."""
    low = t.floor().long().clamp(0, table.shape[0] - 2)
    frac = t - low
    return table[low] + frac * (table[low + 1] - table[low])


def _linspace(stop: float, num: int) -> Tensor:
    """numpy.linspace(0, stop, num) in float64, bit for bit (i·step, last = stop): torch's
    linspace rounds differently, which moves .5 ties of the rounded schedules."""
    y = torch.arange(num, dtype=torch.float64) * (stop / max(num - 1, 1))
    y[-1] = stop if num > 1 else 0.0
    return y


def _timesteps(steps: int, n_train: int, spacing: str, steps_offset: int, dpm: bool) -> Tensor:
    """Descending timesteps (steps,) float64 as diffusers' schedulers choose them
    (timestep_spacing of Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", table 2). DPMSolverMultistep divides the range into steps + 1
    parts and rounds; Euler, Euler ancestral and DDIM use steps parts."""
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "trailing":
        return (n_train - i * (n_train / steps)).round() - 1
    if spacing == "leading":
        ratio = n_train // (steps + 1 if dpm else steps)
        return (i.flip(0) + (1 if dpm else 0)) * ratio + steps_offset
    if spacing == "linspace":
        if dpm:
            return _linspace(n_train - 1, steps + 1).round().flip(0)[:-1]
        return _linspace(n_train - 1, steps).float().double().flip(0)
    raise ValueError(f"spacing={spacing!r} is unknown: use one of {SPACINGS}")


def sigmas_for(
    steps: int,
    alphas_cumprod: Tensor,
    spacing: str = "leading",
    karras: bool = False,
    sampler: str = "euler",
    steps_offset: int = 1,
    rho: float = 7.0,
) -> Tensor:
    """Descending sigmas (steps + 1,) float32 ending with 0, as diffusers' scheduler for
    `sampler` picks them (EulerDiscrete / EulerAncestralDiscrete / DDIM for "euler",
    "euler_a", "ddim"; DPMSolverMultistep for "dpmpp_2m"), SDXL/SD1.5 use "leading" with
    steps_offset 1.

    karras: rho-spaced sigmas of Karras et al. 2022, eq. 5, between the ends of the
    spaced schedule (Euler) or of the whole training table (DPM-Solver); use
    `Denoiser(quantize=True)` to feed the network rounded timesteps as DPMSolverMultistep does.

    Start latent for the same image as diffusers: x = noise·sqrt(sigmas[0]² + 1) for DDIM and
    DPM-Solver (they start from x_t = noise) and for Euler with "leading"; x = noise·sigmas[0]
    for Euler with "linspace"/"trailing" (k-diffusion and ComfyUI always use noise·sigmas[0]).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown: use one of {tuple(SAMPLERS)}")
    dpm = sampler == "dpmpp_2m"
    table = _sampling_sigmas(alphas_cumprod).double().cpu()  # (T,) ascending
    sigmas = _interp(table, _timesteps(steps, table.shape[0], spacing, steps_offset, dpm))
    if karras:
        lo, hi = (table[0], table[-1]) if dpm else (sigmas[-1], sigmas[0])
        ramp = _linspace(1.0, steps)
        sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float().to(alphas_cumprod.device)


def default_noise_sampler(x: Tensor, generator: torch.Generator | None = None) -> NoiseSampler:
    """noise_sampler(sigma, sigma_next) drawing N(0, 1) like x from `generator` (on its own
    device, as diffusers' randn_tensor does), so a seeded generator reproduces diffusers."""
    device = generator.device if generator is not None else x.device

    def noise(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)

    return noise


def _sigma_batch(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.to(device=x.device, dtype=torch.float32).expand(x.shape[0])  # (B,)


@torch.no_grad()
def sample_euler(model, x: Tensor, sigmas: Tensor, callback=None, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """Euler method on the probability-flow ODE dx/dsigma = (x − D(x, sigma)) / sigma
    (Karras et al. 2022, algorithm 1 with second-order correction off)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _sigma_batch(sigma, x))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model, x: Tensor, sigmas: Tensor, callback=None, noise_sampler: NoiseSampler | None = None
) -> Tensor:
    """Ancestral Euler (k-diffusion sample_euler_ancestral, eta = 1): an Euler step down to
    sigma_down, then fresh noise of std sigma_up, with sigma_up² + sigma_down² = sigma_next²
    and sigma_up² = sigma_next²·(sigma² − sigma_next²) / sigma² (the DDPM posterior
    variance, Ho et al. 2020, in sigma form)."""
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _sigma_batch(sigma, x))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
        sigma_up = torch.minimum(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model, x: Tensor, sigmas: Tensor, callback=None, noise_sampler: NoiseSampler | None = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2) in sigma form with
    lambda = −log sigma: x' = (sigma'/sigma)·x − (e^(−h) − 1)·D', where D' extrapolates the
    last two denoised values, D' = (1 + 1/2r)·D_i − (1/2r)·D_(i−1), r = h_(i−1) / h.
    First order on the first step and on the last step to sigma = 0 (diffusers'
    lower_order_final with final_sigmas_type="zero", k-diffusion)."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _sigma_batch(sigma, x))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
            continue
        h = sigma.log() - sigma_next.log()
        if old_denoised is None:
            denoised_d = denoised
        else:
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_ddim(model, x: Tensor, sigmas: Tensor, callback=None, noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DDIM with eta = 0 (Song et al. 2020, "Denoising Diffusion Implicit Models", eq. 12)
    in sigma form: x' = x0 + sigma'·eps with eps = (x − x0) / sigma. On x = x_t / sqrt(alpha_bar)
    this is the same update as an Euler step of the probability-flow ODE (Karras et al.
    2022, section 4), so it runs `sample_euler`; x' / sqrt(sigma'² + 1) is DDIM's x_(t−1)."""
    return sample_euler(model, x, sigmas, callback=callback, noise_sampler=noise_sampler)


SAMPLERS = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
}
