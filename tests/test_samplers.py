"""Samplers against diffusers' schedulers driving the same toy network from the same start.

The diffusers side runs the pipeline loop (scale_model_input, net(x, t), step) on
x_t-space latents; ours runs Denoiser + sample_* in sigma space. Both start from the same
noise and must end at the same latents within 1e-5 (fp32).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from torch import nn

from eridiffusion.diffusion import alphas_cumprod, scaled_linear_betas, sigmas_from_alphas_cumprod
from eridiffusion.samplers import (
    SAMPLERS,
    Denoiser,
    cfg_model,
    default_noise_sampler,
    sigmas_for,
)

# diffusers 0.42 schedulers call np.array(tensor, copy=False) and warn on numpy 2
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SDXL = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
    timestep_spacing="leading",
    steps_offset=1,
)
SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(solver_order=2, algorithm_type="dpmsolver++")),
    "ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=True)),
}
CTX = 8



class ToyNet(nn.Module):
    """Fixed random eps/v network: a per-timestep analytic part plus a conv net modulated by a
    sinusoidal timestep embedding (as the UNet's) and an optional context vector.

    For eps the analytic part sqrt(1 − alpha_bar_t)·x_t is the exact eps of unit-Gaussian
    data; with the bounded conv part (|.| < 0.1) the sampled latents stay O(1), so 1e-5 is a
    fp32-meaningful bound. The conv part makes the output depend non-linearly on x and on t
    at the frequencies the UNet uses.
    """

    def __init__(self, prediction: str, ac: torch.Tensor, ch: int = 4, hidden: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.conv_in = nn.Conv2d(ch, hidden, 3, padding=1)
        self.time = nn.Linear(32, 2 * hidden)
        self.ctx = nn.Linear(CTX, 2 * hidden)
        self.conv_out = nn.Conv2d(hidden, ch, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2
        self.register_buffer("g", (1 - ac) ** 0.5 if prediction == "epsilon" else torch.zeros_like(ac))
        self.calls = 0

    def forward(self, x, t, context=None):
        self.calls += 1
        t = t.float().expand(x.shape[0])
        freqs = torch.exp(-math.log(10000.0) * torch.arange(16, dtype=torch.float32) / 16)
        args = t[:, None] * freqs  # (B, 16)
        emb = self.time(torch.cat([torch.cos(args), torch.sin(args)], dim=1))  # (B, 2·hidden)
        if context is not None:
            emb = emb + self.ctx(context)
        scale, shift = emb[:, :, None, None].chunk(2, dim=1)  # (B, hidden, 1, 1) each
        h = F.silu(self.conv_in(x)) * (1 + scale) + shift
        lo = t.floor().long().clamp(0, 998)
        g = torch.lerp(self.g[lo], self.g[lo + 1], t - lo)  # analytic part at fractional t
        return g.view(-1, 1, 1, 1) * x + 0.1 * torch.tanh(self.conv_out(F.silu(h)))


def _ac():
    return alphas_cumprod(scaled_linear_betas())


def _scheduler(name, prediction="epsilon", **extra):
    cls, kw = SCHEDULERS[name]
    return cls(**{**SDXL, **kw, "prediction_type": prediction, **extra})


def _run_diffusers(sched, net, noise, steps, seed, **cond):
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    gen = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        out = net(x_in, t.expand(x.shape[0]), **cond)
        kw = {"generator": gen} if isinstance(sched, (EulerAncestralDiscreteScheduler,)) else {}
        x = sched.step(out, t, x, **kw).prev_sample
    return x


def _start(noise, sigmas, spacing):
    """diffusers' start latent in sigma space: noise·sqrt(sigma0² + 1) for "leading" Euler and
    for DDIM / DPM-Solver (x_T = noise on the VP chain), noise·sigma0 otherwise."""
    return noise * (sigmas[0] ** 2 + 1) ** 0.5 if spacing == "leading" else noise * sigmas[0]


@torch.no_grad()
@pytest.mark.parametrize(
    "name, prediction, spacing, karras, steps",
    [
        ("euler", "epsilon", "leading", False, 20),
        ("euler", "v_prediction", "leading", False, 20),
        ("euler", "epsilon", "leading", True, 25),
        ("euler", "epsilon", "trailing", False, 30),
        ("euler", "epsilon", "linspace", True, 13),
        ("euler_a", "epsilon", "leading", False, 20),
        ("euler_a", "v_prediction", "leading", False, 12),
        ("dpmpp_2m", "epsilon", "leading", False, 20),
        ("dpmpp_2m", "epsilon", "leading", True, 20),
        ("dpmpp_2m", "v_prediction", "leading", True, 10),
        ("dpmpp_2m", "epsilon", "trailing", False, 30),
        ("ddim", "epsilon", "leading", False, 20),
        ("ddim", "v_prediction", "leading", False, 30),
        ("ddim", "epsilon", "leading", False, 10),
    ],
)
def test_sampler_matches_diffusers(name, prediction, spacing, karras, steps):
    ac = _ac()
    net = ToyNet(prediction, ac)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    kw = {"use_karras_sigmas": True} if karras else {}
    sched = _scheduler(name, prediction, timestep_spacing=spacing, **kw)
    ref = _run_diffusers(sched, net, noise, steps, seed=99)

    sigmas = sigmas_for(steps, ac, spacing=spacing, karras=karras, sampler=name)
    vp_start = name in ("dpmpp_2m", "ddim")  # these diffusers schedulers start at x_T = noise
    x = noise * (sigmas[0] ** 2 + 1) ** 0.5 if vp_start else _start(noise, sigmas, spacing)
    model = Denoiser(net, ac, prediction, quantize=karras and name == "dpmpp_2m")
    ns = default_noise_sampler(x, torch.Generator().manual_seed(99))
    ours = SAMPLERS[name](model, x, sigmas, noise_sampler=ns)

    diff = (ours - ref).abs().max().item()
    print(f"\n{name} {prediction} {spacing} karras={karras} steps={steps}: max|diff| = {diff:.3g}")
    assert ref.abs().max() > 0.5  # the toy chain did not collapse to zeros
    assert diff <= 1e-5


@torch.no_grad()
def test_ddim_to_sigma_min_matches_diffusers_without_alpha_one():
    """SD's shipped DDIM config (set_alpha_to_one=False) ends on alpha_bar_0, not 1: ending
    our schedule at sigma_0 instead of 0 and dividing by sqrt(sigma_0² + 1) gives its x_0."""
    ac = _ac()
    net = ToyNet("epsilon", ac)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = _run_diffusers(_scheduler("ddim", set_alpha_to_one=False), net, noise, 20, seed=0)
    sigmas = sigmas_for(20, ac, sampler="ddim")
    sigmas[-1] = sigmas_from_alphas_cumprod(ac)[0]
    x = SAMPLERS["ddim"](Denoiser(net, ac), noise * (sigmas[0] ** 2 + 1) ** 0.5, sigmas)
    ours = x / (sigmas[-1] ** 2 + 1) ** 0.5
    diff = (ours - ref).abs().max().item()
    print(f"\nddim set_alpha_to_one=False: max|diff| = {diff:.3g}")
    assert diff <= 1e-5


@torch.no_grad()
def test_cfg_matches_diffusers_guidance_in_one_batched_call():
    """Pipeline-style CFG on eps (uncond + s·(cond − uncond)) with diffusers' Euler equals
    cfg_model on x0, and the network runs once per step on the [uncond, cond] batch."""
    ac, steps, scale = _ac(), 15, 6.5
    net = ToyNet("epsilon", ac)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = {"context": torch.randn(2, CTX, generator=torch.Generator().manual_seed(2))}
    uncond = {"context": torch.zeros(2, CTX)}

    sched = _scheduler("euler")
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        e_u, e_c = net(torch.cat([x_in, x_in]), t.expand(4), torch.cat([uncond["context"], cond["context"]])).chunk(2)
        x = sched.step(e_u + scale * (e_c - e_u), t, x).prev_sample

    sigmas = sigmas_for(steps, ac)
    net.calls = 0
    guided = cfg_model(Denoiser(net, ac), cond, uncond, scale)
    ours = SAMPLERS["euler"](guided, _start(noise, sigmas, "leading"), sigmas)
    diff = (ours - x).abs().max().item()
    print(f"\neuler cfg {scale}: max|diff| = {diff:.3g}")
    assert net.calls == steps
    assert diff <= 1e-5


@pytest.mark.parametrize(
    "name, karras", [("euler", False), ("euler", True), ("euler_a", False), ("dpmpp_2m", False), ("dpmpp_2m", True)]
)
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [7, 20, 30])
def test_sigmas_for_equals_diffusers_schedule(name, karras, spacing, steps):
    kw = {"use_karras_sigmas": True} if karras else {}
    sched = _scheduler(name, timestep_spacing=spacing, **kw)
    sched.set_timesteps(steps)
    ours = sigmas_for(steps, sched.alphas_cumprod, spacing=spacing, karras=karras, sampler=name)
    torch.testing.assert_close(ours, sched.sigmas, rtol=1e-7, atol=0)


@pytest.mark.parametrize("steps", [10, 20, 30, 50])
def test_ddim_sigmas_are_its_timesteps(steps):
    sched = _scheduler("ddim")
    sched.set_timesteps(steps)
    table = sigmas_from_alphas_cumprod(sched.alphas_cumprod)
    expected = torch.cat([table[sched.timesteps], torch.zeros(1)])
    torch.testing.assert_close(sigmas_for(steps, sched.alphas_cumprod, sampler="ddim"), expected, rtol=1e-7, atol=0)


def test_sigma_to_t_matches_diffusers_interpolation():
    ac = _ac()
    sched = _scheduler("euler")
    log_sigmas = sched.sigmas[:-1].flip(0).double().log().numpy()  # (1000,) ascending
    sigmas = torch.exp(torch.linspace(math.log(0.01), math.log(20.0), 301))  # beyond both table ends
    ref = torch.from_numpy(sched._sigma_to_t(sigmas.double().numpy(), log_sigmas)).float()
    den = Denoiser(nn.Identity(), ac)
    torch.testing.assert_close(den.sigma_to_t(sigmas), ref, rtol=0, atol=2e-3)
    table = sigmas_from_alphas_cumprod(ac)
    t = torch.tensor([0, 1, 500, 981, 999])
    assert (den.sigma_to_t(table[t]) - t).abs().max() < 2e-3
    assert torch.equal(Denoiser(nn.Identity(), ac, quantize=True).sigma_to_t(table[t]), t.float())


def test_denoiser_outputs_x0_for_eps_and_v():
    """With the exact eps or v of a known (x0, noise) the denoiser returns x0."""
    ac = _ac()
    table = sigmas_from_alphas_cumprod(ac)
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    idx = torch.tensor([100, 900])
    s = table[idx].view(-1, 1, 1, 1)
    x = x0 + s * noise  # sigma form
    a, b = ac[idx].sqrt().view(-1, 1, 1, 1), (1 - ac[idx]).sqrt().view(-1, 1, 1, 1)
    v = a * noise - b * x0
    eps_net = lambda x_in, t: noise  # noqa: E731
    v_net = lambda x_in, t: v  # noqa: E731
    torch.testing.assert_close(Denoiser(eps_net, ac)(x, table[idx]), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(Denoiser(v_net, ac, "v_prediction")(x, table[idx]), x0, rtol=0, atol=1e-5)


def test_noise_sampler_reproducible_and_errors():
    x = torch.zeros(2, 4, 8, 8)
    a = default_noise_sampler(x, torch.Generator().manual_seed(5))
    b = default_noise_sampler(x, torch.Generator().manual_seed(5))
    s = torch.tensor(1.0)
    first = a(s, s)
    assert torch.equal(first, b(s, s))
    assert not torch.equal(first, a(s, s))
    with pytest.raises(ValueError, match="spacing='uniform'"):
        sigmas_for(10, _ac(), spacing="uniform")
    with pytest.raises(ValueError, match="sampler='heun'"):
        sigmas_for(10, _ac(), sampler="heun")
    with pytest.raises(ValueError, match="prediction='x0'"):
        Denoiser(nn.Identity(), _ac(), "x0")
