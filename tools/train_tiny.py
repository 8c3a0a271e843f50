"""Train the shipped tiny shapes model (`eridiffusion/tiny/weights/tiny_shapes.safetensors`) from scratch.

Family `sdxl-micro`: the real SDXL layout (CLIP-L and OpenCLIP text encoders, UNet with pooled
`y`, AutoencoderKL) at small widths, 11.2 MB in fp16. The data are `tiny.shapes` images drawn on
the GPU: circle / square / triangle / diamond (star and heart are held out for `eri demo`) in
one of 8 colours on another, 128×128, captions "a red circle on a blue background".

Recipe:
1. text encoders: random (seed 0) and frozen; the UNet learns from their deterministic outputs.
   All 224 base captions are encoded once, as the pipeline does (`Pipeline.encode_text`,
   `unet_inputs`); a dropped caption (10%) is all-zero context and pooled, which is what the
   pipeline feeds the unconditional branch of CFG for an empty negative prompt.
2. VAE: reconstruction (MSE + L1 on [-1, 1] pixels) + 1e-4 · KL (per element), AdamW 1e-3,
   fresh images every step. Then its latents are rescaled (mean rows of `quant_conv` · k,
   logvar bias + 2 ln k, `post_quant_conv` input columns / k: the decoder sees the same thing)
   so that latents · 0.13025 (the family's scaling factor) have unit std.
3. UNet: full-weight training on a pool of encoded images (posterior samples · scaling), eps
   prediction, DDPM forward process with SDXL's scaled-linear betas (`eridiffusion.diffusion`),
   uniform timesteps, AdamW 5e-4 with warm-up and cosine decay, grad-norm clip 1, EMA 0.999
   of the weights, which are the ones shipped.

Phases are bounded by wall-clock minutes (the learning-rate schedule follows elapsed time), so
a run fits one device call; the steps each phase reached are logged and written into the file's
metadata. The shipped weights came from two calls on one NVIDIA H200 (2026-11-29, torch 2.11):

    python tools/train_tiny.py --out $OUT --vae-minutes 2 --unet-minutes 5 --offset-noise 0
    #   VAE 2728 steps (batch 64, recon MSE 0.0031), UNet 2501 steps (batch 512): 7.3 min
    python tools/train_tiny.py --out $OUT --resume $OUT/tiny_shapes.safetensors \
        --unet-minutes 2.3 --lr 3e-4 --offset-noise 0.15
    #   UNet 1231 more steps: 2.6 min

Offset noise matters here: on a 16×16 latent the scaled-linear schedule leaks the image's mean
colour at t = 999 (sqrt(ᾱ) = 0.068 against a per-channel noise mean of std 1/16), so without it
the model takes the background colour from the start noise instead of the caption (first call:
prompted foreground colour found in 38% of samples; after the second: 81%). One call with
`--offset-noise 0.15` from the start should do as well; it has not been run. `--smoke` runs a
few CPU steps to check the script. bf16 autocast on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eridiffusion import checkpoint, diffusion
from eridiffusion.pipeline import Pipeline
from eridiffusion.tiny import shapes

FAMILY = "sdxl-micro"
SIZE = 128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for tiny_shapes.safetensors and train_log.txt")
    p.add_argument("--vae-minutes", type=float, default=2.0)
    p.add_argument("--unet-minutes", type=float, default=5.0)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--unet-batch", type=int, default=512)
    p.add_argument("--pool", type=int, default=131072, help="encoded images the UNet trains on")
    p.add_argument("--offset-noise", type=float, default=0.15, help="diffusion.offset_noise strength for the UNet")
    p.add_argument("--resume", help="a tiny_shapes.safetensors to continue from: its VAE is kept, its UNet trained on")
    p.add_argument("--lr", type=float, default=5e-4, help="UNet peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few CPU steps to check the script")
    return p.parse_args(argv)


class Logger:
    def __init__(self, path: Path):
        self.file, self.start = open(path, "a", encoding="utf-8"), time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.start:7.1f}s] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def cosine_lr(base: float, frac: float, warmup_frac: float = 0.03) -> float:
    if frac < warmup_frac:
        return base * frac / warmup_frac
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warmup_frac) / (1 - warmup_frac))))


def checkpoint_meta(path) -> dict:
    from eridiffusion.weights import WeightLoader

    with WeightLoader(path) as w:
        return dict(w.metadata or {})


def save(components: checkpoint.Components, out: Path, meta: dict) -> None:
    on_cpu = checkpoint.Components(components.family, **{n: copy.deepcopy(m).cpu() for n, m in components.items()})
    checkpoint.save(on_cpu, out / "tiny_shapes.safetensors", dtype=torch.float16,
                    metadata={k: str(v) for k, v in meta.items()})  # fmt: skip


def train_vae(vae, args, rng, device, amp, log, meta):
    """Reconstruction + small KL on fresh images, then the latent rescale (module docstring)."""
    vae = vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    budget, t0, step = args.vae_minutes * 60, time.time(), 0
    while (step < 3) if args.smoke else (time.time() - t0 < budget):
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = cosine_lr(1e-3, frac)
        x = shapes.render(shapes.random_specs(args.vae_batch, rng), SIZE, device) * 2 - 1  # (B, 3, 128, 128)
        with amp:
            post = vae.encode(x)
            rec = vae.decode(post.sample()).float()
        kl = 0.5 * (post.mean.float() ** 2 + post.logvar.float().exp() - 1 - post.logvar.float()).mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0 or args.smoke:
            log(f"vae step {step}: loss {loss.item():.5f} (mse {F.mse_loss(rec, x).item():.5f}, kl {kl.item():.2f})")
    meta["vae_steps"] = step
    vae.eval().requires_grad_(False)

    # latents · scaling_factor with unit std: rescale the posterior, undo it before the decoder
    fam, scale = checkpoint.FAMILIES[FAMILY], checkpoint.FAMILIES[FAMILY].vae.scaling_factor
    with torch.no_grad(), amp:
        probe = shapes.render(shapes.random_specs(256 if not args.smoke else 8, rng), SIZE, device) * 2 - 1
        std = vae.encode(probe).mean.float().std().item()
    k = 1.0 / (scale * std)
    with torch.no_grad():
        z = fam.vae.embed_dim
        vae.quant_conv.weight[:z] *= k
        vae.quant_conv.bias[:z] *= k
        vae.quant_conv.bias[z:] += 2 * math.log(k)
        vae.post_quant_conv.weight /= k
        with amp:
            post = vae.encode(probe)
            mse = F.mse_loss(vae.decode(post.mean).float(), probe).item()
        log(f"vae done after {step} steps; latent std {std:.3f} → rescaled by {k:.3f}: scaled std "
            f"{(post.mean.float() * scale).std().item():.3f}; reconstruction mse {mse:.5f}")  # fmt: skip
    meta["vae_recon_mse"] = f"{mse:.5f}"

    return vae


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "train_log.txt")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.smoke:
        args.vae_batch, args.unet_batch, args.pool = 4, 8, 32
    rng = random.Random(args.seed)
    fam = checkpoint.FAMILIES[FAMILY]
    torch.manual_seed(args.seed)
    parts = checkpoint.Components(fam, **{p: fam.build(p) for p in fam.parts})
    if args.resume:  # the same random text encoders (seed 0), the trained VAE and UNet
        parts = checkpoint.load(args.resume, family=FAMILY)
        args.vae_minutes = 0
    for p in ("te1", "te2"):
        getattr(parts, p).requires_grad_(False).eval()
    meta = {"eridiffusion.tiny": "tools/train_tiny.py", "seed": args.seed, "offset_noise": args.offset_noise}
    log(f"device {device}; family {FAMILY}; parameters " +
        ", ".join(f"{n} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for n, m in parts.items()))  # fmt: skip

    # -- 1. the captions, encoded once by the frozen random text encoders ---------------------
    pipe = Pipeline(parts)
    captions = [shapes.caption(s, fg, bg) for s in shapes.BASE_SHAPES for fg in shapes.COLOUR_NAMES
                for bg in shapes.COLOUR_NAMES if fg != bg]  # fmt: skip
    cond_index = {c: i for i, c in enumerate(captions)}
    with torch.no_grad():
        cond, uncond = pipe.encode(captions)
        cond = {k: v.to(device) for k, v in pipe.unet_inputs(cond, (SIZE, SIZE)).items()}  # context (224, 77, 40), y (224, 120)
        uncond = {k: v[:1].to(device) for k, v in pipe.unet_inputs(uncond, (SIZE, SIZE)).items()}
    log(f"encoded {len(captions)} captions: context {tuple(cond['context'].shape)}, y {tuple(cond['y'].shape)}")

    # -- 2. VAE ---------------------------------------------------------------------------
    scale = fam.vae.scaling_factor
    vae = train_vae(parts.vae, args, rng, device, amp, log, meta) if not args.resume else parts.vae.to(device)

    # -- 3. the pool of latents the UNet trains on ----------------------------------------- parts.vae.to(device).train().requires_grad_(True)
    pool_specs = shapes.random_specs(args.pool, rng)
    latents, labels = [], torch.tensor([cond_index[s.caption] for s in pool_specs], device=device)
    with torch.no_grad(), amp:
        for i in range(0, args.pool, 1024):
            x = shapes.render(pool_specs[i : i + 1024], SIZE, device) * 2 - 1
            latents.append((vae.encode(x).sample() * scale).float())
    latents = torch.cat(latents)  # (pool, 4, 16, 16)
    log(f"encoded a pool of {args.pool} images: latents {tuple(latents.shape)}, std {latents.std().item():.3f}")

    # -- 4. UNet ----------------------------------------------------------------------------
    unet = parts.unet.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ac = diffusion.alphas_cumprod(diffusion.scaled_linear_betas()).to(device)
    budget, t0, step, last_save, losses = args.unet_minutes * 60, time.time(), 0, time.time(), []
    parts.te1, parts.te2 = parts.te1.cpu(), parts.te2.cpu()
    while (step < 3) if args.smoke else (time.time() - t0 < budget):
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = cosine_lr(args.lr, frac)
        idx = torch.randint(0, args.pool, (args.unet_batch,), device=device)
        x0, rows = latents[idx], labels[idx]
        keep = (torch.rand(args.unet_batch, device=device) >= 0.1)[:, None]  # caption dropout → unconditional
        context = torch.where(keep[:, :, None], cond["context"][rows], uncond["context"])  # (B, 77, 40)
        y = torch.where(keep, cond["y"][rows], uncond["y"])  # (B, 120)
        noise = diffusion.offset_noise(torch.randn_like(x0), args.offset_noise)
        t = diffusion.sample_timesteps(args.unet_batch, device=device)
        with amp:
            pred = unet(diffusion.add_noise(x0, noise, t, ac), t, context, y).float()
        loss = F.mse_loss(pred, diffusion.target("epsilon", x0, noise, t, ac))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - min(0.999, (1 + step) / (10 + step)))
        step += 1
        losses.append(loss.item() if step % 50 == 0 or args.smoke else None)
        if step % 500 == 0 or args.smoke:
            recent = [v for v in losses[-500:] if v is not None]
            log(f"unet step {step}: loss {sum(recent) / len(recent):.4f}, lr {opt.param_groups[0]['lr']:.2e}")
        if time.time() - last_save > 60:  # a timeout still leaves weights behind
            save(checkpoint.Components(fam, ema, vae, parts.te1, parts.te2), out, {**meta, "unet_steps": step})
            last_save = time.time()
    meta["unet_steps"] = step
    if args.resume:
        prior = checkpoint_meta(args.resume)
        meta.update({k: prior[k] for k in ("vae_steps", "vae_recon_mse") if k in prior})
        meta["resumed_from"] = {k: prior[k] for k in ("unet_steps", "offset_noise") if k in prior}
    save(checkpoint.Components(fam, ema, vae, parts.te1, parts.te2), out, meta)
    log(f"done: vae {meta['vae_steps']} steps, unet {step} steps (batch {args.unet_batch}); wrote {out / 'tiny_shapes.safetensors'}")


if __name__ == "__main__":
    main()
