"""Training-side diffusion maths against diffusers' DDPMScheduler and exact values."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from eridiffusion.diffusion import (
    add_noise,
    alphas_cumprod,
    min_snr_weight,
    offset_noise,
    sample_timesteps,
    scaled_linear_betas,
    sigmas_from_alphas_cumprod,
    target,
    velocity,
)

# diffusers 0.42 schedulers call np.array(tensor, copy=False) and warn on numpy 2
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")



SDXL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _ddpm(prediction="epsilon"):
    return DDPMScheduler(**SDXL, prediction_type=prediction)


def test_tables_equal_diffusers_and_compvis():
    ref = _ddpm()
    betas, ac = scaled_linear_betas(), alphas_cumprod(scaled_linear_betas())
    assert betas.dtype == ac.dtype == torch.float32 and betas.shape == ac.shape == (1000,)
    # diffusers squares in float32, we in float64 (CompVis make_beta_schedule): 1 ulp at most
    torch.testing.assert_close(betas, ref.betas, rtol=2.5e-7, atol=0)
    # diffusers accumulates the product in float32; measured max |diff| 4.8e-7, relative 9.5e-7
    torch.testing.assert_close(ac, ref.alphas_cumprod, rtol=1.5e-6, atol=0)
    # CompVis/sgm keep betas in float64 through the product: within 1 float32 ulp (6.2e-8)
    compvis = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    torch.testing.assert_close(ac.double(), compvis, rtol=1.2e-7, atol=0)
    assert ac[0].item() == pytest.approx(1 - 0.00085, rel=1e-7)
    # SD's well-known sigma range 0.0292 .. 14.6146 (k-diffusion, ComfyUI)
    sigmas = sigmas_from_alphas_cumprod(ac)
    assert sigmas[0].item() == pytest.approx(0.0292, abs=5e-5)
    assert sigmas[-1].item() == pytest.approx(14.6146, abs=5e-5)


def test_sigmas_equal_euler_scheduler_table():
    sched = EulerDiscreteScheduler(**SDXL)
    ours = sigmas_from_alphas_cumprod(sched.alphas_cumprod)
    torch.testing.assert_close(ours.flip(0), sched.sigmas[:-1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 3e-2)])
def test_add_noise_and_velocity_equal_ddpm(dtype, tol):
    ref = _ddpm("v_prediction")
    ac = alphas_cumprod(scaled_linear_betas())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 499, 998, 999])
    want_xt, want_v = ref.add_noise(x0, noise, t), ref.get_velocity(x0, noise, t)
    xt = add_noise(x0.to(dtype), noise.to(dtype), t, ac)
    v = velocity(x0.to(dtype), noise.to(dtype), t, ac)
    assert xt.dtype == v.dtype == dtype
    torch.testing.assert_close(xt.float(), want_xt, rtol=0, atol=tol)
    torch.testing.assert_close(v.float(), want_v, rtol=0, atol=tol)
    assert torch.equal(target("v_prediction", x0, noise, t, ac), velocity(x0, noise, t, ac))
    assert target("epsilon", x0, noise, t, ac) is noise
    with pytest.raises(ValueError, match="prediction='sample'"):
        target("sample", x0, noise, t, ac)


def test_v_target_recovers_x0_and_noise():
    """v and x_t determine x0 = sqrt(a)·x_t − sqrt(1−a)·v (Salimans & Ho 2022, section 4)."""
    ac = alphas_cumprod(scaled_linear_betas())
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([10, 500, 990])
    a = ac[t].view(-1, 1, 1, 1)
    xt, v = add_noise(x0, noise, t, ac), velocity(x0, noise, t, ac)
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.sqrt() * v + (1 - a).sqrt() * xt, noise, rtol=0, atol=1e-5)


def test_min_snr_weight_known_values():
    # alpha_bar 0.5, 0.9, 0.1, 0.99 -> snr 1, 9, 1/9, 99
    ac = torch.tensor([0.5, 0.9, 0.1, 0.99])
    t = torch.arange(4)
    eps = min_snr_weight(t, ac, 5.0, "epsilon")
    v = min_snr_weight(t, ac, 5.0, "v_prediction")
    torch.testing.assert_close(eps, torch.tensor([1.0, 5 / 9, 1.0, 5 / 99]), rtol=1e-5, atol=0)
    torch.testing.assert_close(v, torch.tensor([0.5, 0.5, 0.1, 5 / 100]), rtol=1e-5, atol=0)
    # the SDXL table at t = 0: snr = 0.99915 / 0.00085
    sdxl = alphas_cumprod(scaled_linear_betas())
    w = min_snr_weight(torch.tensor([0, 999]), sdxl, 5.0, "epsilon")
    assert w[0].item() == pytest.approx(5 * 0.00085 / 0.99915, rel=1e-4)
    assert w[1].item() == 1.0
    with pytest.raises(ValueError, match="prediction='x0'"):
        min_snr_weight(t, ac, 5.0, "x0")


def test_sample_timesteps_range_and_reproducible():
    a = sample_timesteps(4096, torch.Generator().manual_seed(3))
    b = sample_timesteps(4096, torch.Generator().manual_seed(3))
    c = sample_timesteps(4096, torch.Generator().manual_seed(4))
    assert a.dtype == torch.int64 and a.shape == (4096,)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() == 0 and a.max() == 999
    d = sample_timesteps(1000, torch.Generator().manual_seed(0), low=200, high=300)
    assert d.min() == 200 and d.max() == 299
    assert sample_timesteps(3, device="cpu").device.type == "cpu"


def test_offset_noise_is_per_sample_channel_constant():
    noise = torch.randn(3, 4, 8, 8)
    out = offset_noise(noise, 0.1, torch.Generator().manual_seed(1))
    expected = 0.1 * torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(1))  # (B, C, 1, 1)
    assert torch.equal(out, noise + expected)
    shift = out - noise
    assert shift.flatten(2).std(dim=2).max() < 1e-6  # constant over space
    assert shift[:, :, 0, 0].abs().min() > 0
    assert offset_noise(noise, 0.0) is noise
