"""VAE encode and 30-step sampling at 1024²: ours against diffusers on the same random weights, in one run.

    encode:   VAE encode of (B, 3, 1024, 1024) for B = 1 and 4 → img/s, peak GiB
    sampling: 30 DPM++ 2M steps, CFG 7 (UNet batch 2: uncond + cond), then the VAE decode,
              timed apart (the denoising loop, the decode) and whole (`Pipeline.generate`
              with PIL output) → seconds per image, peak GiB
    variants: our VAE through `speed.optimize_vae` (`--variants`): "compiled" (encoder and decoder
              each one inductor graph), "compiled+cl" (+ channels_last weights), "compiled+cl+graph"
              (+ each call replayed from a CUDA graph, `speed.GraphedForward`), "compiled+cl+dynamic"
              (the shape-generic graph latent caching ends up with, batch 1); encode and decode rows
              with img/s, peak GiB, the first call's seconds (compile) and the largest difference
              from the eager VAE's output. Shapes are fixed, so compiled with dynamic=False.
    mid_attention: the mid-block attention alone (one head of 512 channels over (size/8)² tokens):
              which SDPA kernels take head dim 512, and SDPA against an fp32-score cuBLAS formulation

Ours runs `eridiffusion.samplers` (Denoiser, cfg_model, sample_dpmpp_2m, as the pipeline
calls them) and `Pipeline.decode`; the peer is diffusers `UNet2DConditionModel` +
`DPMSolverMultistepScheduler` in the StableDiffusionXLPipeline loop and diffusers
`AutoencoderKL`, loaded (strict) from our weights through diffusers' own ldm converters.
Both in bf16, on random weights at the full SDXL shapes (text encoders are not part of it:
the conditioning is random). Timing by CUDA events after warm-up; one model set on the GPU
at a time. `time_ratio_ours_over_peer` < 1 means ours is faster. diffusers is optional.

    python bench/vae_sample.py --out bench/results/vae_sample.json   # CUDA, full SDXL shapes
    python bench/vae_sample.py --only vae --out /tmp/vae.json        # CUDA, VAE rows only (no UNet)
    python bench/vae_sample.py --tiny --out /tmp/vs.json             # CPU smoke test (tiny models)

The JSON file is rewritten after every row, so a run cut off by a time limit keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common import (  # noqa: I001 (also puts the repo root on sys.path)
    emit, environment, free, median, peak_gib, print_table, random_part, reset_peak, resolve_device, sync,
    time_calls, write_json,
)
from train_step import DIFFUSERS_SDXL
from eridiffusion import checkpoint, diffusion, samplers, speed
from eridiffusion.pipeline import Pipeline

# diffusers twin of UNetConfig.tiny(): `attention_head_dim` is diffusers' name for the number of heads.
DIFFUSERS_TINY_SDXL = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128), layers_per_block=2, transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(2, 4, 8), cross_attention_dim=96, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=32, projection_class_embeddings_input_dim=256,
)  # fmt: skip
VARIANTS = ("compiled+cl", "compiled+cl+graph", "compiled", "compiled+cl+dynamic")
# SDXL base's scheduler settings (scheduler_config.json) with DPM-Solver++(2M).
DPMPP_2M = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                timestep_spacing="leading", steps_offset=1, solver_order=2, algorithm_type="dpmsolver++")  # fmt: skip


@dataclass(frozen=True)
class Settings:
    size: int  # square images, pixels
    steps: int
    cfg: float
    batches: tuple[int, ...]  # VAE encode batch sizes
    warmup: int
    repeats: int
    seed: int = 0

    @classmethod
    def full(cls, steps: int = 30, repeats: int = 3) -> Settings:
        return cls(1024, steps, 7.0, (1, 4), 2, repeats)

    @classmethod
    def tiny(cls, steps: int = 3, repeats: int = 1) -> Settings:
        return cls(64, steps, 7.0, (1, 2), 1, repeats)


def diffusers_vae_config(family: checkpoint.Family) -> dict:
    v = family.vae
    n = len(v.ch_mult)
    return dict(in_channels=v.in_channels, out_channels=v.out_ch, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[v.ch * m for m in v.ch_mult],
                layers_per_block=v.num_res_blocks, latent_channels=v.z_channels, norm_num_groups=v.num_groups,
                scaling_factor=v.scaling_factor)  # fmt: skip


@dataclass
class Inputs:
    """The same conditioning, start noise and test batches for both implementations (CPU, fp32)."""

    context: torch.Tensor  # (1, 77, D)
    pooled: torch.Tensor  # (1, P)
    noise: torch.Tensor  # (1, 4, h, w): pipeline.generate draws the same from its seed
    images: torch.Tensor  # (max batch, 3, H, W) in [-1, 1]
    probe_x: torch.Tensor  # (2, 4, h, w): one UNet forward for the parity figure
    probe_t: torch.Tensor  # (2,)

    @classmethod
    def make(cls, family: checkpoint.Family, s: Settings) -> Inputs:
        u = family.unet
        h = s.size // family.vae.factor
        pooled_dim = u.adm_in_channels - 6 * u.addition_time_embed_dim
        g = torch.Generator().manual_seed(s.seed + 1)
        noise = torch.randn((1, u.in_channels, h, h), generator=torch.Generator().manual_seed(s.seed))
        return cls(torch.randn(1, 77, u.context_dim, generator=g), torch.randn(1, pooled_dim, generator=g), noise,
                   torch.rand(max(s.batches), 3, s.size, s.size, generator=g) * 2 - 1,
                   torch.randn(2, u.in_channels, h, h, generator=g), torch.tensor([999.0, 500.0]))  # fmt: skip


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def scale(t: torch.Tensor) -> float:
    return t.float().abs().max().item()


def sample_row(impl: str, op: str, times: list[float], device, s: Settings, **extra) -> dict:
    sec = median(times)
    return {"impl": impl, "op": op, "size": s.size, "steps": s.steps, "cfg": s.cfg, "unet_batch": 2,
            "s_per_image": sec, "peak_gib": peak_gib(device), "runs": len(times), **extra}  # fmt: skip


class Rows(list):
    """The result rows; each one appended (by `emit`) rewrites the JSON file, so a run stopped by a
    time limit keeps what it measured."""

    def __init__(self, path: str | None, env: dict):
        super().__init__()
        self.path, self.env = path, env

    def append(self, row: dict) -> None:
        super().append(row)
        write_json(self.path, self.env, self)


def timed(fn, device, s: Settings, warmup: int | None = None) -> list[float]:
    for _ in range(s.warmup if warmup is None else warmup):
        fn()
    sync(device)
    reset_peak(device)
    return time_calls(fn, device, s.repeats)


def first_call(fn, device) -> float:
    """Seconds of one call, run to completion: the compile (or cuDNN autotuning, or graph capture) of a first call."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_encode(impl: str, encode, inp: Inputs, device, dtype, s: Settings, rows: list[dict],
                 batches: tuple[int, ...] | None = None, ref: torch.Tensor | None = None) -> torch.Tensor:
    """Rows for each batch size; returns the batch-1 posterior mean (for the parity figures), and
    with `ref` (the eager VAE's) each row gets the largest difference from it."""
    first = None
    for b in batches or s.batches:
        x = inp.images[:b].to(device, dtype)
        with torch.no_grad():
            first_s = first_call(lambda: encode(x), device)
            times = timed(lambda: encode(x), device, s)
            if first is None:
                first = encode(x[:1]).float().cpu()
        sec = median(times)
        extra = {} if ref is None else {"max_abs_diff_vs_eager": max_diff(first, ref), "max_abs": scale(ref)}
        emit({"impl": impl, "op": "vae_encode", "size": s.size, "batch": b, "s_per_batch": sec, "img_per_s": b / sec,
              "peak_gib": peak_gib(device), "runs": len(times), "first_call_s": first_s, **extra}, rows)  # fmt: skip
        free(device)
    return first


def bench_decode(impl: str, decode, device, s: Settings, rows: list[dict], ref: torch.Tensor | None = None
                 ) -> torch.Tensor:  # fmt: skip
    """One `vae_decode` row of `decode()` (one latent image); returns its output (float, CPU)."""
    with torch.no_grad():
        first_s = first_call(decode, device)
        times = timed(decode, device, s)
        out = decode().float().cpu()
    extra = {} if ref is None else {"max_abs_diff_vs_eager": max_diff(out, ref), "max_abs": scale(ref)}
    emit(sample_row(impl, "vae_decode", times, device, s, img_per_s=1 / median(times), first_call_s=first_s, **extra),
         rows)  # fmt: skip
    free(device)
    return out


def decode_latents(inp: Inputs, ours: dict, family) -> torch.Tensor:
    """Unscaled latents (1, 4, h, w) every decode row decodes: the sampled ones, else the start noise."""
    return ours.get("latents", inp.noise) / family.vae.scaling_factor


# ---------------------------------------------------------------- ours
def run_ours(family, device, dtype, inp: Inputs, s: Settings, rows: list[dict], keep_weights: bool,
             sampling: bool = True) -> dict:  # fmt: skip
    unet = random_part(family, "unet", device, dtype, seed=s.seed) if sampling else None
    vae = random_part(family, "vae", device, dtype, seed=s.seed + 1000)
    vae_state = {k: v.cpu() for k, v in vae.state_dict().items()}  # also for the optimize_vae variants
    weights = {"vae": vae_state} if keep_weights else {}
    if keep_weights and sampling:
        weights["unet"] = {k: v.cpu() for k, v in unet.state_dict().items()}
    free(device)
    impl = "eridiffusion"
    out = {"encode": bench_encode(impl, lambda x: vae.encode(x).mean, inp, device, dtype, s, rows),
           "vae_state": vae_state}
    if device.type == "cuda":  # channels_last convolutions (cuDNN's NHWC kernels)
        vae.to(memory_format=torch.channels_last)
        bench_encode(impl + " channels_last", lambda x: vae.encode(x.contiguous(memory_format=torch.channels_last)).mean,
                     inp, device, dtype, s, rows)  # fmt: skip
        vae.to(memory_format=torch.contiguous_format)
    if not sampling:
        z = decode_latents(inp, out, family).to(device, dtype)
        out["decode"] = bench_decode(impl, lambda: vae.decode(z), device, s, rows)
        out["weights"] = weights
        del vae
        free(device)
        return out

    # text encoders are not benchmarked: built on meta, they take no memory
    comps = checkpoint.Components(family, unet=unet, vae=vae, te1=family.build("te1", "meta"),
                                  te2=family.build("te2", "meta"))  # fmt: skip
    pipe = Pipeline(comps)
    size = (s.size, s.size)
    cond = {"context": inp.context.to(device, dtype), "pooled": inp.pooled.to(device, dtype)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}  # empty negative prompt: zeros (SDXL)
    ac = diffusion.alphas_cumprod(diffusion.scaled_linear_betas()).to(device)
    sigmas = samplers.sigmas_for(s.steps, ac, sampler="dpmpp_2m")
    model = samplers.cfg_model(samplers.Denoiser(unet, ac, pipe.prediction), pipe.unet_inputs(cond, size),
                               pipe.unet_inputs(uncond, size), s.cfg)  # fmt: skip
    x_start = inp.noise.to(device) * (sigmas[0] ** 2 + 1) ** 0.5  # as Pipeline.generate starts

    with torch.no_grad():
        y = pipe.unet_inputs(cond, size)["y"]
        out["forward"] = unet(inp.probe_x.to(device, dtype), inp.probe_t.to(device), cond["context"].expand(2, -1, -1),
                              y.expand(2, -1)).float().cpu()  # fmt: skip
        result = {}

        def loop():
            result["latents"] = samplers.sample_dpmpp_2m(model, x_start, sigmas)

        eager_op = "sample_loop (eager)" if device.type == "cuda" else "sample_loop"  # the pipeline's path on CPU
        emit(sample_row(impl, eager_op, timed(loop, device, s, warmup=1), device, s), rows)
        if device.type == "cuda":  # the pipeline's own path: UNet calls replayed from a CUDA graph
            graphed = samplers.cfg_model(samplers.Denoiser(speed.GraphedForward(unet), ac, pipe.prediction),
                                         pipe.unet_inputs(cond, size), pipe.unet_inputs(uncond, size), s.cfg)

            def graph_loop():
                result["graph_latents"] = samplers.sample_dpmpp_2m(graphed, x_start, sigmas)

            emit(sample_row(impl, "sample_loop", timed(graph_loop, device, s, warmup=1), device, s), rows)
            emit({"impl": impl, "op": "cuda graph vs eager latents", "max_abs_diff":
                  max_diff(result["graph_latents"].float(), result["latents"].float())}, rows)  # fmt: skip
        out["latents"] = result["latents"].float().cpu()
        latents = result["latents"]
        emit(sample_row(impl, "vae_decode", timed(lambda: pipe.decode(latents), device, s), device, s), rows)
        out["decode"] = pipe.decode(latents).float().cpu()

        def total():
            pipe.generate(cond, uncond, [s.seed], s.steps, s.cfg, "dpmpp_2m", False, size)

        emit(sample_row(impl, "total (generate, PIL)", timed(total, device, s, warmup=0), device, s), rows)
        if device.type == "cuda":  # `eri sample --compile`: compiled UNet regions + decoder, graphs kept
            eager_image = np.asarray(pipe.generate(cond, uncond, [s.seed], s.steps, s.cfg, "dpmpp_2m", False, size)[0])
            pipe.compile()
            compile_s = first_call(total, device)
            image = np.asarray(pipe.generate(cond, uncond, [s.seed], s.steps, s.cfg, "dpmpp_2m", False, size)[0])
            diff = int(np.abs(image.astype(np.int16) - eager_image.astype(np.int16)).max())
            emit(sample_row(impl, "total (generate, PIL, compiled)", timed(total, device, s, warmup=0), device, s,
                            first_call_s=compile_s, max_pixel_diff_vs_eager=diff), rows)  # fmt: skip
    out["weights"] = weights
    del pipe, comps, model, unet, vae, result, latents
    free(device)
    return out


def run_variants(family, device, dtype, inp: Inputs, s: Settings, rows: list[dict], names: list[str], backend: str,
                 ours: dict) -> None:  # fmt: skip
    """Our VAE through `speed.optimize_vae`, a fresh copy of the eager rows' weights per compile
    setting; "compiled+cl+graph" replays the "compiled+cl" copy's calls from CUDA graphs."""
    z = decode_latents(inp, ours, family).to(device, dtype)
    made: dict[str, torch.nn.Module] = {}

    def optimized(channels_last: bool, dynamic: bool | None) -> torch.nn.Module:
        vae = family.build("vae", device).to(dtype).eval().requires_grad_(False)
        vae.load_state_dict(ours["vae_state"])
        return speed.optimize_vae(vae, channels_last=channels_last, dynamic=dynamic, backend=backend)

    for name in names:
        impl = f"eridiffusion {name}"
        if name == "compiled+cl+graph":
            if device.type != "cuda":
                print(f"{name}: CUDA graphs need a CUDA device, skipped", flush=True)
                continue
            vae = made.get("compiled+cl") or optimized(True, False)
            encode = speed.GraphedForward(lambda x: vae.encode(x).mean)
            decode = speed.GraphedForward(lambda z: vae.decode(z))
        elif name == "compiled+cl+dynamic":  # H, W symbolic from the first call, as after a second bucket
            vae = optimized(True, None)

            def encode(x, vae=vae):
                torch._dynamo.maybe_mark_dynamic(x, 2)
                torch._dynamo.maybe_mark_dynamic(x, 3)
                return vae.encode(x).mean

            bench_encode(impl, encode, inp, device, dtype, s, rows, batches=(1,), ref=ours["encode"])
            del vae, encode
            free(device)
            continue
        else:
            vae = made[name] = optimized(name == "compiled+cl", False)
            encode = lambda x, vae=vae: vae.encode(x).mean  # noqa: E731
            decode = vae.decode
        bench_encode(impl, encode, inp, device, dtype, s, rows, ref=ours["encode"])
        bench_decode(impl, lambda: decode(z), device, s, rows, ref=ours["decode"])
        del vae, encode, decode
        free(device)
    made.clear()
    free(device)


def bench_mid_attention(family, device, dtype, s: Settings, rows: list[dict]) -> None:
    """The mid-block attention alone: q, k, v (1, 1, n, 512) with n = (size/8)² tokens. Which SDPA
    kernels take head dim 512, and their time against the same maths with fp32 scores from cuBLAS
    (`bmm(out_dtype=float32)`, softmax in fp32, P in bf16 for P·V, as flash rounds it), which
    would replace SDPA in models/vae.py only if much faster; each against an fp32 reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, c = (s.size // family.vae.factor) ** 2, family.vae.ch * family.vae.ch_mult[-1]
    g = torch.Generator(device).manual_seed(s.seed)
    q, k, v = (torch.randn(1, 1, n, c, device=device, generator=g).to(dtype) for _ in range(3))
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).cpu()

    def explicit():
        scores = torch.bmm(q[:, 0], k[:, 0].transpose(1, 2), out_dtype=torch.float32) * c**-0.5  # (1, n, n) fp32
        return torch.bmm(scores.softmax(dim=-1).to(dtype), v[:, 0])[:, None]  # (1, 1, n, c)

    cases = {f"sdpa {b.name.lower()}": b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                                    SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)}  # fmt: skip
    cases = {"sdpa (default choice)": None, **cases, "fp32 scores, cuBLAS": "explicit"}
    for label, b in cases.items():
        row = {"impl": "mid_attention", "op": label, "tokens": n, "channels": c}
        try:
            if b == "explicit":
                fn = explicit
            elif b is None:
                fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
            else:
                fn = lambda b=b: sdpa_with(b, q, k, v)  # noqa: E731
            with torch.no_grad():
                times = timed(fn, device, s)
                out = fn().float().cpu()
            row.update(ms=median(times) * 1e3, peak_gib=peak_gib(device), max_abs_diff_vs_fp32=max_diff(out, ref))
        except (RuntimeError, TypeError, NotImplementedError) as e:  # this kernel (or torch) does not take the shape
            row.update(error=str(e).splitlines()[0][:160])
        emit(row, rows)
        free(device)


def sdpa_with(backend, q, k, v) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


# ---------------------------------------------------------------- diffusers
def peer_model(cls, convert, prefix: str, state: dict, cfg: dict, device, dtype):
    """A diffusers model loaded (strict) from our weights through diffusers' own ldm converter."""
    converted = convert({prefix + k: v for k, v in state.items()}, cfg)
    with torch.device(device):
        model = cls(**cfg).to(dtype)
    model.load_state_dict(converted, strict=True)
    model.eval().requires_grad_(False)
    del converted
    free(device)
    return model


def run_peer(family, device, dtype, inp: Inputs, s: Settings, rows: list[dict], weights: dict, ours: dict,
             sampling: bool = True) -> None:  # fmt: skip
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    impl = "diffusers"
    vae = peer_model(AutoencoderKL, convert_ldm_vae_checkpoint, "first_stage_model.", weights["vae"],
                     diffusers_vae_config(family), device, dtype)  # fmt: skip
    if sampling:  # built first, as ours is: the encode rows' peak memory includes it on both sides
        ucfg = DIFFUSERS_TINY_SDXL if family.name == "sdxl-tiny" else DIFFUSERS_SDXL
        unet = peer_model(UNet2DConditionModel, convert_ldm_unet_checkpoint, "model.diffusion_model.", weights["unet"],
                          ucfg, device, dtype)  # fmt: skip
    enc = bench_encode(impl, lambda x: vae.encode(x).latent_dist.mean, inp, device, dtype, s, rows)
    if not sampling:
        z = decode_latents(inp, ours, family).to(device, dtype)
        dec = bench_decode(impl, lambda: vae.decode(z, return_dict=False)[0], device, s, rows)
        emit({"impl": "parity", "op": "same weights, ours vs diffusers",
              "vae_encode_max_abs_diff": max_diff(ours["encode"], enc), "vae_encode_max_abs": scale(enc),
              "vae_decode_max_abs_diff": max_diff(ours["decode"], dec), "vae_decode_max_abs": scale(dec),
              "dtype": str(dtype).removeprefix("torch.")}, rows)  # fmt: skip
        del vae
        free(device)
        return

    ctx = torch.cat([torch.zeros_like(inp.context), inp.context]).to(device, dtype)  # [uncond, cond]
    pooled = torch.cat([torch.zeros_like(inp.pooled), inp.pooled]).to(device, dtype)
    time_ids = torch.tensor([[s.size, s.size, 0, 0, s.size, s.size]] * 2, device=device, dtype=dtype)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    scheduler = DPMSolverMultistepScheduler(**DPMPP_2M)
    processor = VaeImageProcessor(vae_scale_factor=family.vae.factor)

    with torch.no_grad():
        fwd = unet(inp.probe_x.to(device, dtype), inp.probe_t.to(device), ctx[1:].expand(2, -1, -1),
                   added_cond_kwargs={"text_embeds": pooled[1:].expand(2, -1), "time_ids": time_ids},
                   return_dict=False)[0].float().cpu()  # fmt: skip
        result = {}

        def loop():  # StableDiffusionXLPipeline.__call__'s denoising loop
            scheduler.set_timesteps(s.steps, device=device)
            lat = inp.noise.to(device, dtype) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                x_in = scheduler.scale_model_input(torch.cat([lat, lat]), t)
                eps = unet(x_in, t, encoder_hidden_states=ctx, added_cond_kwargs=added, return_dict=False)[0]
                eps_u, eps_c = eps.chunk(2)
                lat = scheduler.step(eps_u + s.cfg * (eps_c - eps_u), t, lat, return_dict=False)[0]
            result["latents"] = lat

        emit(sample_row(impl, "sample_loop", timed(loop, device, s, warmup=1), device, s), rows)
        latents = result["latents"]

        def decode():
            return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

        emit(sample_row(impl, "vae_decode", timed(decode, device, s), device, s), rows)

        def total():
            loop()
            processor.postprocess(vae.decode(result["latents"] / vae.config.scaling_factor, return_dict=False)[0],
                                  output_type="pil")  # fmt: skip

        emit(sample_row(impl, "total (generate, PIL)", timed(total, device, s, warmup=0), device, s), rows)

    emit({"impl": "parity", "op": "same weights, ours vs diffusers",
          "vae_encode_max_abs_diff": max_diff(ours["encode"], enc), "vae_encode_max_abs": scale(enc),
          "unet_forward_max_abs_diff": max_diff(ours["forward"], fwd), "unet_forward_max_abs": scale(fwd),
          "final_latents_max_abs_diff": max_diff(ours["latents"], result["latents"]),
          "final_latents_max_abs": scale(result["latents"]), "dtype": str(dtype).removeprefix("torch.")}, rows)  # fmt: skip
    del unet, vae, result, latents
    free(device)


def add_ratios(rows: list[dict]) -> None:
    """time_ratio_ours_over_peer on each of our rows that diffusers also measured (< 1: ours is faster)."""
    def key(r):
        return r.get("op"), r.get("batch")

    peer = {key(r): r for r in rows if r.get("impl") == "diffusers"}
    for r in rows:
        p = peer.get(key(r))
        if str(r.get("impl", "")).startswith("eridiffusion") and p is not None:
            field = "s_per_batch" if r["op"] == "vae_encode" else "s_per_image"
            r["time_ratio_ours_over_peer"] = r[field] / p[field]
            r["peak_ratio_ours_over_peer"] = r["peak_gib"] / p["peak_gib"] if p["peak_gib"] else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny SDXL-layout models at 64² (CPU smoke test)")
    ap.add_argument("--device", default="auto", help="auto = cuda (cpu with --tiny)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 30; 3 with --tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 3; 1 with --tiny)")
    ap.add_argument("--peer", default="auto", choices=("auto", "yes", "no"), help="also run diffusers")
    ap.add_argument("--only", default="all", choices=("all", "vae"),
                    help="vae: the VAE encode / decode rows only (no UNet, no sampling)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated optimize_vae variants of {VARIANTS}, '' for none (default: the first "
                         "three; compiled+cl on the CPU, compiled with the eager backend)")  # fmt: skip
    ap.add_argument("--compile-backend", default="auto", help="auto: inductor on CUDA, eager (dynamo only) on the CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = resolve_device(args.device, args.tiny)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    make = Settings.tiny if args.tiny else Settings.full
    s = make(**{k: v for k, v in (("steps", args.steps), ("repeats", args.repeats)) if v is not None})
    family = checkpoint.FAMILIES["sdxl-tiny" if args.tiny else "sdxl"]
    sampling = args.only == "all"
    cuda = device.type == "cuda"
    backend = args.compile_backend if args.compile_backend != "auto" else "inductor" if cuda else "eager"
    variants = args.variants
    if variants is None:
        variants = ",".join(VARIANTS[:3]) if cuda else "compiled+cl"
    variants = [v for v in variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants {args.variants!r}: unknown {unknown}; use a comma-separated subset of {VARIANTS}")
    if device.type == "cuda":
        from eridiffusion.speed import set_fast_math

        set_fast_math()

    peer, note = args.peer != "no", None
    if peer:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            if args.peer == "yes":
                raise
            peer, note = False, "diffusers is not importable: peer rows skipped"
    env = {**environment(device), "family": family.name, "dtype": str(dtype).removeprefix("torch."),
           "settings": s.__dict__, "peer": peer, "note": note, "only": args.only, "variants": variants,
           "compile_backend": backend}  # fmt: skip
    print(json.dumps({"env": env}), flush=True)
    rows = Rows(args.out, env)
    inp = Inputs.make(family, s)
    ours = run_ours(family, device, dtype, inp, s, rows, keep_weights=peer, sampling=sampling)
    if peer:
        run_peer(family, device, dtype, inp, s, rows, ours.pop("weights"), ours, sampling=sampling)
    if device.type == "cuda":  # before the variants: seconds, where their compiles take minutes
        bench_mid_attention(family, device, dtype, s, rows)
    run_variants(family, device, dtype, inp, s, rows, variants, backend, ours)
    add_ratios(rows)
    write_json(args.out, env, rows)
    print()
    if note:
        print(note)
    print_table([r for r in rows if r["impl"] not in ("parity", "mid_attention")],
                [("impl", 32), ("op", 22), ("batch", 5), ("s_per_image", 11), ("s_per_batch", 11), ("img_per_s", 9),
                 ("peak_gib", 8), ("first_call_s", 12), ("max_abs_diff_vs_eager", 21),
                 ("time_ratio_ours_over_peer", 25)])  # fmt: skip
    attention = [r for r in rows if r["impl"] == "mid_attention"]
    if attention:
        print()
        print_table(attention, [("op", 24), ("tokens", 6), ("channels", 8), ("ms", 8), ("max_abs_diff_vs_fp32", 20),
                                ("error", 40)])  # fmt: skip
    for r in rows:
        if r["impl"] == "parity":
            print("parity (max abs diff / max abs):", ", ".join(
                f"{k.removesuffix('_max_abs_diff')} {r[k]:.3g} / {r[k.removesuffix('_diff')]:.3g}"
                for k in r if k.endswith("_max_abs_diff")))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
