"""Data-parallel SDXL LoRA training step under torchrun: img/s per rank and in total.

Same work per image as bench/train_step.py (full SDXL UNet shapes, random weights, bf16,
LoRA r16 on attention to_q/to_k/to_v/to_out.0, 1024² images = 128² latents, AdamW), run
on every rank on synthetic latents, with the LoRA gradients averaged across ranks:

- default: the UNet in DDP (eridiffusion.distributed.wrap_ddp, as `eri train` does),
  bucketed all-reduce overlapping the backward; one process runs without DDP, as training does;
- `--graph`: no DDP; forward + backward + one flat NCCL all-reduce of the LoRA grads +
  AdamW captured in one CUDA graph (bench/steps.py GraphedStep). Needs NCCL ≥ 2.9.6;
  TORCH_NCCL_ASYNC_ERROR_HANDLING=0 is set before the group is created, as PyTorch's
  CUDA-graph notes ask for collectives inside a capture.

    torchrun --nproc-per-node 1 bench/ddp_step.py --batch 4 --out bench/results/ddp_1gpu.json
    torchrun --nproc-per-node 2 bench/ddp_step.py --batch 4 --out bench/results/ddp_2gpu.json
    torchrun --nproc-per-node 2 bench/ddp_step.py --tiny       # CPU / gloo smoke test

Scaling efficiency = img_per_s_total(N) / (N · img_per_s_total(1)). Rank 0 prints one JSON
line (and writes `--out`); every rank's median step time is in `per_rank`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.train_step import ATTN_TARGETS, LATENT  # noqa: E402
from bench.steps import compile_stages, training_step  # noqa: E402
from eridiffusion import distributed, networks  # noqa: E402
from eridiffusion.models.unet import UNet, UNetConfig, sdxl_vector  # noqa: E402
from eridiffusion.speed import optimize_for_training  # noqa: E402

TINY_LATENT = 16  # 128² images for the tiny UNet
POOLED = 1280


def inputs(cfg: UNetConfig, batch: int, latent: int, device: torch.device, dtype: torch.dtype, seed: int):
    """Synthetic x_t, t, context, y and target for one rank (seeded by rank: different data)."""
    g = torch.Generator(device=device).manual_seed(seed)
    pooled_dim = cfg.adm_in_channels - 6 * cfg.addition_time_embed_dim
    x = torch.randn(batch, 4, latent, latent, device=device, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    ctx = torch.randn(batch, 77, cfg.context_dim, device=device, generator=g, dtype=dtype)
    pooled = torch.randn(batch, pooled_dim, device=device, generator=g, dtype=dtype)
    side = float(latent * 8)
    time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]], device=device).repeat(batch, 1)
    y = sdxl_vector(pooled, time_ids, cfg.addition_time_embed_dim).to(dtype)  # (B, adm_in_channels)
    target = torch.randn(batch, 4, latent, latent, device=device, generator=g, dtype=dtype)
    return x, t, ctx, y, target


def build(args, w: distributed.World):
    """UNet + LoRA (+ DDP) and a step function `step(x, t, ctx, y, target) -> loss`."""
    device = w.device
    cfg = UNetConfig.tiny() if args.tiny else UNetConfig.sdxl()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)  # same frozen weights on every rank, as from one checkpoint file
    with torch.device(device):
        unet = UNet(cfg)
    unet.to(dtype).requires_grad_(False)
    targets = None if args.tiny else ATTN_TARGETS
    net = networks.inject(unet, "unet", rank=args.rank, alpha=args.rank, targets=targets)
    net.to(device)
    unet.gradient_checkpointing = args.checkpointing
    optimize_for_training(unet, compile=args.compile and args.scope == "blocks")
    if args.compile and args.scope == "stages":
        compile_stages(unet)
    params = net.lora_parameters()
    if args.ddp_always and not torch.distributed.is_initialized():
        raise SystemExit("bench/ddp_step.py: --ddp-always needs a process group; launch with torchrun")
    use_ddp = (w.distributed or args.ddp_always) and not args.graph
    if use_ddp:
        model = distributed.DDP(unet, device_ids=[device.index] if device.type == "cuda" else None,
                                broadcast_buffers=False, init_sync=False, gradient_as_bucket_view=True,
                                bucket_cap_mb=args.bucket_cap_mb)  # fmt: skip
        distributed.broadcast_params(params)
    else:
        model = unet
        distributed.broadcast_params(params)  # --graph: same LoRA init on every rank
    fast = {"fused": True, "capturable": args.graph} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=1e-4, **fast)

    def body(x, t, ctx, y, target):
        pred = model(x, t, ctx, y)
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        if not use_ddp:
            distributed.all_reduce_grads(params)  # no-op on one process
        opt.step()
        return loss

    step = training_step(body, params, opt, graph=args.graph)

    mode = "graph+allreduce" if args.graph else ("ddp" if use_ddp else "single")
    n_params = sum(p.numel() for p in params)
    return step, cfg, dtype, mode, n_params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="images per rank per step")
    ap.add_argument("--tiny", action="store_true", help="tiny UNet on the CPU (gloo): smoke test")
    ap.add_argument("--device", default="auto", help="auto: cuda unless --tiny")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile (eridiffusion.speed)")
    ap.add_argument("--scope", default="blocks", choices=["blocks", "stages"])
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--graph", action="store_true", help="CUDA graph of the whole step with a flat all-reduce")
    ap.add_argument("--ddp-always", action="store_true", help="wrap in DDP even on one process")
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP all-reduce bucket size")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON file written by rank 0")
    args = ap.parse_args(argv)

    name = args.device if args.device != "auto" else ("cpu" if args.tiny else "cuda")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/ddp_step.py: no CUDA device; use --tiny for the CPU smoke test")
    if args.graph:
        if device.type != "cuda":
            raise SystemExit("bench/ddp_step.py: --graph needs CUDA")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    w = distributed.init(device)
    device = w.device
    latent = TINY_LATENT if args.tiny else LATENT
    try:
        step, cfg, dtype, mode, n_params = build(args, w)
        xs = inputs(cfg, args.batch, latent, device, dtype, seed=1000 + w.rank)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        step(*xs)
        sync(device)
        first = time.perf_counter() - t0
        for _ in range(args.warmup):
            step(*xs)
        sync(device)
        distributed.barrier()
        times, loss = [], None
        wall0 = time.perf_counter()
        for _ in range(args.iters):
            t0 = time.perf_counter()
            loss = step(*xs)
            sync(device)  # per-step time on this rank (DDP's all-reduce makes ranks wait for each other)
            times.append(time.perf_counter() - t0)
        distributed.barrier()
        wall = time.perf_counter() - wall0
        times.sort()
        mine = {"rank": w.rank, "s_per_step": times[len(times) // 2], "first_step_s": first,
                "spread": (times[-1] - times[0]) / times[len(times) // 2], "loss": float(loss.detach()),
                "peak_gib": max(torch.cuda.max_memory_allocated(device) / 2**30,  # --graph: GraphedStep resets it
                                *getattr(step, "phase_peaks", {}).values()) if device.type == "cuda" else None}  # fmt: skip
        per_rank = [mine]
        if w.distributed:
            per_rank = [None] * w.size
            torch.distributed.all_gather_object(per_rank, mine)
        if w.main:
            slowest = max(r["s_per_step"] for r in per_rank)
            row = {
                "bench": "ddp_step", "mode": mode, "world": w.size, "batch_per_rank": args.batch,
                "global_batch": args.batch * w.size, "latent": latent, "tiny": args.tiny,
                "compile": args.compile, "scope": args.scope if args.compile else None,
                "checkpointing": args.checkpointing, "bucket_cap_mb": args.bucket_cap_mb,
                "lora_rank": args.rank, "lora_params": n_params, "warmup": args.warmup, "iters": args.iters,
                "s_per_step": slowest,
                "img_per_s_per_rank": args.batch / slowest,
                "img_per_s_total": args.batch * w.size * args.iters / wall,
                "img_per_s_total_median": args.batch * w.size / slowest,
                "per_rank": per_rank,
            }  # fmt: skip
            env = {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
                   "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
                   "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None}  # fmt: skip
            print(json.dumps({"env": env, **row}), flush=True)
            if args.out:
                os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump({"env": env, "rows": [row]}, f, indent=1)
    finally:
        distributed.cleanup(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
