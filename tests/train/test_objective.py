"""Loss and noise options of `[train]` against their references.

kohya references are re-implemented here from kohya-ss/sd-scripts at commit
48d368fa557731ad0488c07304dfeba8c07910eb (`library/train_util.py` `conditional_loss`,
`get_huber_threshold_if_needed`, `get_noise_noisy_latents_and_timesteps`;
`library/custom_train_functions.py` `apply_debiased_estimation`, `pyramid_noise_like`),
copied as written there except where noted (a generator in place of the global RNGs).
diffusers (test-only) gives the zero-terminal-SNR betas, the trailing schedules and CFG rescale.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale
from torch import nn

from eridiffusion import diffusion
from eridiffusion.families import FAMILIES
from eridiffusion.samplers import Denoiser, cfg_model, rescale_cfg, sample_euler, sigmas_for
from eridiffusion.train.step import Objective, TrainStep, diffusion_loss

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SDXL_SCHED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


# -- kohya, re-implemented from the cited commit ---------------------------------------------
def kohya_huber_c(huber_c, huber_schedule, timesteps, alphas_cumprod, num_train_timesteps=1000, huber_scale=1.0):
    """`get_huber_threshold_if_needed` with `args` and `noise_scheduler` spelled out."""
    b_size = timesteps.shape[0]
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        result = torch.exp(-alpha * timesteps) * huber_scale
    elif huber_schedule == "snr":
        ac = torch.index_select(alphas_cumprod, 0, timesteps.cpu())
        sigmas = ((1.0 - ac) / ac) ** 0.5
        result = (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    else:
        result = torch.full((b_size,), huber_c * huber_scale)
    return result


def kohya_conditional_loss(model_pred, target, loss_type, huber_c):
    """`conditional_loss` with reduction "none"."""
    if loss_type == "l2":
        return F.mse_loss(model_pred, target, reduction="none")
    huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
    if loss_type == "huber":
        return 2 * huber_c * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
    return 2 * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)


def kohya_debiased(loss, timesteps, alphas_cumprod, v_prediction):
    """`prepare_scheduler_for_custom_training` (all_snr) + `apply_debiased_estimation`."""
    all_snr = (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2
    snr_t = torch.stack([all_snr[t] for t in timesteps])
    snr_t = torch.minimum(snr_t, torch.ones_like(snr_t) * 1000)
    weight = 1 / (snr_t + 1) if v_prediction else 1 / torch.sqrt(snr_t)
    return weight * loss


def kohya_pyramid_noise_like(noise, generator, iterations=6, discount=0.4):
    """`pyramid_noise_like`; `random.random()` and `torch.randn` drawn from `generator` (same order)."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn, generator=generator)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


# -- pure maths ------------------------------------------------------------------------------
def test_zero_terminal_snr_betas_equal_diffusers():
    betas = diffusion.scaled_linear_betas()
    ours = diffusion.rescale_zero_terminal_snr(betas)  # computed in float64
    torch.testing.assert_close(ours, diffusers_rescale(betas.double()).float(), rtol=1e-6, atol=1e-9)
    # diffusers on float32 betas: its float32 ratios alpha_bar[t] / alpha_bar[t-1] round beta ~ 1e-3 to ~2e-4
    torch.testing.assert_close(ours, diffusers_rescale(betas.clone()), rtol=5e-4, atol=1e-5)
    ac = FAMILIES["sdxl-tiny"].schedule(zero_terminal_snr=True)
    assert ac[-1] == 0 and ac[0] == pytest.approx(1 - betas[0].item(), rel=1e-6)
    assert torch.equal(FAMILIES["sdxl-tiny"].schedule(), diffusion.alphas_cumprod(betas))


@pytest.mark.parametrize("loss", ["huber", "smooth_l1", "l2"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_equals_kohya(loss, schedule):
    g = torch.Generator().manual_seed(0)
    ac = diffusion.alphas_cumprod(diffusion.scaled_linear_betas())
    t = torch.tensor([0, 1, 250, 500, 999])
    pred, target = torch.randn(5, 4, 8, 8, generator=g) * 2, torch.randn(5, 4, 8, 8, generator=g)
    c = diffusion.huber_threshold(t, ac, 0.1, schedule)
    torch.testing.assert_close(c, kohya_huber_c(0.1, schedule, t, ac).float())
    ours = diffusion.elementwise_loss(pred, target, loss, c)
    torch.testing.assert_close(ours, kohya_conditional_loss(pred, target, loss, c))
    if loss != "l2":  # quadratic for small errors, linear for large ones
        small = diffusion.elementwise_loss(torch.full((1, 1), 1e-3), torch.zeros(1, 1), loss, torch.tensor([0.1]))
        assert small.item() == pytest.approx(1e-6 if loss == "huber" else 1e-5, rel=1e-2)  # d², d²/c


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_debiased_weight_equals_kohya(prediction):
    ac = diffusion.alphas_cumprod(diffusion.scaled_linear_betas())
    t = torch.tensor([0, 3, 100, 700, 999])
    loss = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.5
    ours = loss * diffusion.debiased_weight(t, ac, prediction)
    torch.testing.assert_close(ours, kohya_debiased(loss, t, ac, prediction == "v_prediction"))
    w = FAMILIES["sd15-tiny"].loss_weight(t, ac, prediction, 5.0, debiased=True)  # min-SNR × debiased
    torch.testing.assert_close(w, diffusion.min_snr_weight(t, ac, 5.0, prediction) * diffusion.debiased_weight(t, ac, prediction))


@pytest.mark.parametrize("shape, iterations, discount", [((2, 4, 16, 24), 6, 0.3), ((1, 4, 64, 64), 10, 0.8), ((3, 4, 8, 8), 2, 0.5)])
def test_multires_noise_equals_kohya(shape, iterations, discount):
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours = diffusion.multires_noise(noise.clone(), iterations, discount, torch.Generator().manual_seed(5))
    ref = kohya_pyramid_noise_like(noise.clone(), torch.Generator().manual_seed(5), iterations, discount)
    torch.testing.assert_close(ours, ref)
    assert diffusion.multires_noise(noise, 0, discount) is noise


class Recorder(nn.Module):
    """A denoiser that records its inputs; out = w·x_t (one trainable weight)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, context=None):
        self.seen.append((x.detach().clone(), t.clone()))
        return self.w * x


def test_input_perturbation_as_kohya():
    """x_t = add_noise(x0, noise + gamma·xi), the target (eps here) the noise alone."""
    fam, g = FAMILIES["sd15-tiny"], torch.Generator().manual_seed(3)
    ac = fam.schedule()
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, xi = torch.tensor([10, 900]), torch.randn(2, 4, 8, 8, generator=g)
    net = Recorder()
    loss = diffusion_loss(fam, net, x0, {"context": torch.zeros(2, 77, 32)}, None, t, noise, ac, "epsilon",
                          perturbation=0.1 * xi)  # fmt: skip
    x_t = diffusion.add_noise(x0, noise + 0.1 * xi, t, ac)
    torch.testing.assert_close(net.seen[0][0], x_t)
    torch.testing.assert_close(loss, F.mse_loss(0.5 * x_t, noise))


# -- TrainStep: draws outside the (graphable) micro-step ------------------------------------
class Batch:
    def __init__(self, x0, cond):
        self.x0, self.cond, self.time_ids, self.weight = x0, cond, None, None
        self.n, self.rows, self.scale = x0.shape[0], slice(None), 1.0


def batches(n=4):
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(n, 4, 8, 8, generator=g)
    while True:
        yield Batch(x0, {"context": torch.zeros(n, 77, 32)})


def test_timestep_range_and_draw_order():
    fam, net = FAMILIES["sd15-tiny"], Recorder()
    obj = Objective(timesteps=(200, 300), ip_noise_gamma=0.1, multires_noise_iterations=3, multires_noise_discount=0.5)
    step = TrainStep(fam, net, list(net.parameters()), torch.optim.SGD(net.parameters(), lr=0.0), prediction="epsilon",
                     device=torch.device("cpu"), objective=obj)  # fmt: skip
    it = batches()
    for _ in range(50):
        step(it, torch.Generator().manual_seed(len(net.seen)))
    ts = torch.cat([t for _, t in net.seen])
    assert ts.min() >= 200 and ts.max() < 300 and len(ts.unique()) > 50
    # one step by hand: t, noise, multires, perturbation, all from the noise generator in that order
    gen, net.seen = torch.Generator().manual_seed(9), []
    b = next(it)
    step(iter([b]), torch.Generator().manual_seed(9))
    t = torch.randint(200, 300, (4,), generator=gen)
    noise = diffusion.multires_noise(torch.randn(4, 4, 8, 8, generator=gen), 3, 0.5, gen)
    xi = torch.randn(4, 4, 8, 8, generator=gen)
    torch.testing.assert_close(net.seen[0][0], diffusion.add_noise(b.x0, noise + 0.1 * xi, t, fam.schedule()))
    assert torch.equal(net.seen[0][1], t)


@pytest.mark.slow
def test_v_prediction_zero_terminal_snr_trains_the_tiny_unet():
    """v-pred on the rescaled schedule with Huber, debiased weights and the noise options: the
    loss stays finite (t = 999, SNR 0, included) and falls on a fixed evaluation draw."""
    from eridiffusion import checkpoint, networks

    c = checkpoint.tiny_components("sd15-tiny", seed=0)
    fam, unet = c.family, c.unet
    net = networks.inject(unet, "unet", rank=8, alpha=8, conv_rank=8)
    params = list(net.adapter_params())
    obj = Objective(loss="huber", huber_schedule="snr", debiased_estimation=True, ip_noise_gamma=0.1,
                    multires_noise_iterations=2, zero_terminal_snr=True)  # fmt: skip
    opt = torch.optim.AdamW(params, lr=1e-2)
    step = TrainStep(fam, unet, params, opt, prediction="v_prediction", max_grad_norm=0.0, device=torch.device("cpu"),
                     objective=obj)  # fmt: skip
    ac = step.schedule
    assert ac[-1] == 0
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 16, 16, generator=g) * 0.8
    ctx = torch.randn(2, 77, 32, generator=g)
    t_eval, noise_eval = torch.tensor([999, 400]), torch.randn(2, 4, 16, 16, generator=g)

    def eval_loss():
        with torch.no_grad():
            return diffusion_loss(fam, unet, x0, {"context": ctx}, None, t_eval, noise_eval, ac, "v_prediction",
                                  objective=obj).item()  # fmt: skip

    def data():
        while True:
            yield Batch(x0, {"context": ctx})

    before, gen, it = eval_loss(), torch.Generator().manual_seed(1), data()
    losses = [step(it, gen).loss.item() for _ in range(25)]
    after = eval_loss()
    assert all(math.isfinite(x) for x in losses)
    assert after < 0.95 * before, (before, after)  # pseudo-Huber near SNR 0 is ~linear: a slow fall


# -- sampling a zero-terminal-SNR v-prediction model ---------------------------------------
@pytest.mark.parametrize("steps", [10, 25, 30])
def test_trailing_zero_snr_schedules_equal_diffusers(steps):
    ac = FAMILIES["sdxl-tiny"].schedule(zero_terminal_snr=True)
    euler = EulerDiscreteScheduler(**SDXL_SCHED, timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                   prediction_type="v_prediction")  # fmt: skip
    euler.set_timesteps(steps)
    ours = sigmas_for(steps, ac, spacing="trailing", sampler="euler")
    torch.testing.assert_close(ours, euler.sigmas, rtol=1e-5, atol=0)
    ddim = DDIMScheduler(**SDXL_SCHED, timestep_spacing="trailing", rescale_betas_zero_snr=True)
    ddim.set_timesteps(steps)
    t = Denoiser(nn.Identity(), ac).sigma_to_t(ours[:-1])
    torch.testing.assert_close(t, ddim.timesteps.float(), rtol=0, atol=1e-3)
    assert ddim.timesteps[0] == 999


class ToyV(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.a = nn.Parameter(torch.randn(4, 4, generator=g) * 0.3)

    def forward(self, x, t, context=None):
        mix = torch.einsum("oc,bchw->bohw", self.a, x)
        out = 0.5 * x + torch.tanh(mix) * (t.float() / 1000).view(-1, 1, 1, 1)
        return out + (0 if context is None else 0.1 * context.mean(dim=1).view(-1, 1, 1, 1))


@torch.no_grad()
def test_euler_trailing_zero_snr_v_sampling_equals_diffusers():
    """eps/v → x0 on sigma form with sigma_max = sqrt((1 − 2^-24) / 2^-24) as diffusers' Euler."""
    ac, net, steps = FAMILIES["sdxl-tiny"].schedule(zero_terminal_snr=True), ToyV(), 12
    sched = EulerDiscreteScheduler(**SDXL_SCHED, timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                   prediction_type="v_prediction")  # fmt: skip
    sched.set_timesteps(steps)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(net(sched.scale_model_input(x, t), t.expand(2)), t, x).prev_sample
    sigmas = sigmas_for(steps, ac, spacing="trailing", sampler="euler")
    ours = sample_euler(Denoiser(net, ac, "v_prediction"), noise * sigmas[0], sigmas)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_cfg_rescale_equals_diffusers():
    g = torch.Generator().manual_seed(6)
    guided, cond = torch.randn(3, 4, 8, 8, generator=g) * 3, torch.randn(3, 4, 8, 8, generator=g)
    for phi in (0.0, 0.7, 1.0):
        torch.testing.assert_close(rescale_cfg(guided, cond, phi), rescale_noise_cfg(guided, cond, phi))


@torch.no_grad()
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_cfg_model_rescales_the_network_output(prediction):
    """cfg_model(rescale) in x0 space = diffusers' guidance + rescale_noise_cfg on the network output."""
    ac, net = FAMILIES["sdxl-tiny"].schedule(zero_terminal_snr=True), ToyV()
    den = Denoiser(net, ac, prediction)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * 3
    sigma = torch.tensor([2.5, 2.5])
    cond, uncond = {"context": torch.ones(2, 3)}, {"context": torch.zeros(2, 3)}
    ours = cfg_model(den, cond, uncond, 6.0, rescale=0.7)(x, sigma)
    t = den.sigma_to_t(sigma)
    x_in = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    out_c, out_u = net(x_in, t, **cond), net(x_in, t, **uncond)
    out = rescale_noise_cfg(out_u + 6.0 * (out_c - out_u), out_c, 0.7)
    s = sigma.view(-1, 1, 1, 1)
    ref = x - s * out if prediction == "epsilon" else x / (s**2 + 1) - out * s / (s**2 + 1) ** 0.5
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# -- a run with every option on resumes bit-exactly (tests/test_train.py's resume pattern) --
@pytest.mark.slow
def test_resume_with_the_options_on_is_bit_exact(tmp_path):
    from eridiffusion.tiny import demo_config, prepare
    from eridiffusion.train import train

    prepare(tmp_path, n_images=4, log=lambda s: None)
    options = dict(loss="smooth_l1", huber_schedule="exponential", debiased_estimation=True, ip_noise_gamma=0.1,
                   multires_noise_iterations=3, multires_noise_discount=0.5, min_timestep=100, max_timestep=1000,
                   zero_terminal_snr=True, noise_offset=0.05, batch_size=2)  # fmt: skip

    def cfg(out, **train_extra):
        return demo_config(tmp_path, 6).replace(save={"every_n_steps": 0, "output_dir": str(tmp_path / out)},
                                                sample={"every_n_steps": 0}, data={"max_tokens": 150},
                                                train={**options, **train_extra})  # fmt: skip

    full = train(cfg("full"), progress=False, log=lambda s: None)
    assert all(math.isfinite(x) for x in full.losses)
    first = train(cfg("resumed"), stop_after=3, progress=False, log=lambda s: None)
    assert first.interrupted and first.losses == full.losses[:3]
    second = train(cfg("resumed", resume=True), progress=False, log=lambda s: None)
    assert second.losses == full.losses
    plain = train(cfg("plain", loss="l2", ip_noise_gamma=0.0, multires_noise_iterations=0), progress=False,
                  log=lambda s: None)  # fmt: skip
    assert plain.losses != full.losses  # the options changed what was trained
