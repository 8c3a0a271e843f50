"""SDXL full fine-tune step (`train.mode = "finetune"`): img/s and peak GPU memory.

Work per step: full SDXL UNet shapes with random weights in bf16, every UNet weight trained,
batch 1 at 1024² (128² latents), 77-token context, gradient checkpointing; AdamW (fused) over
fp32 master weights (so its state is fp32) as `eri train` runs it: `train.finetune.FullModel`
+ `train.TrainStep`. Cases: no EMA, EMA on the CPU, EMA on the GPU, and a CUDA-graphed
forward + backward (`train.cuda_graph`). Peak = torch.cuda.max_memory_allocated over the
timed steps (the first step allocates the optimizer state and the fp32 gradient copies).

    python bench/finetune_step.py --out bench/results/finetune_step_h200.json
"""
from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

LATENT, CONTEXT, POOLED = 128, (77, 2048), 1280
CASES = {  # name: train section overrides
    "ckpt_adamw_fp32": {},
    "ckpt_adamw_fp32_ema_cpu": {"ema_decay": 0.9999, "ema_device": "cpu"},
    "ckpt_adamw_fp32_ema_gpu": {"ema_decay": 0.9999, "ema_device": "gpu"},
    "ckpt_adamw_fp32_graph": {"cuda_graph": True},
}


def run_case(name: str, train: dict, steps: int, warmup: int) -> dict:
    from eridiffusion.checkpoint import Components
    from eridiffusion.config import TrainConfig
    from eridiffusion.families import FAMILIES
    from eridiffusion.models.unet import UNet, UNetConfig
    from eridiffusion.speed import optimize_for_training
    from eridiffusion.train import TrainStep
    from eridiffusion.train.batches import Batch
    from eridiffusion.train.finetune import FullModel

    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:
        unet = UNet(UNetConfig.sdxl())
    unet.to(torch.bfloat16).requires_grad_(False)  # as checkpoint.load leaves it
    unet.gradient_checkpointing = True
    optimize_for_training(unet, compile=False, fused_qkv=True)
    cfg = TrainConfig.from_dict({"train": {"mode": "finetune", **train}, "optim": {"unet_lr": 1e-5}})
    family = FAMILIES["sdxl"]
    model = FullModel(cfg, Components(family, unet=unet))
    opt = model.build_optimizer(device)
    step = TrainStep(family, unet, model.parameters(), opt.optimizer, prediction="epsilon", max_grad_norm=1.0,
                     cuda_graph=bool(train.get("cuda_graph")), device=device)  # fmt: skip
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(1, 4, LATENT, LATENT, device=device, generator=g, dtype=torch.bfloat16)
    cond = {"context": torch.randn(1, *CONTEXT, device=device, generator=g, dtype=torch.bfloat16),
            "pooled": torch.randn(1, POOLED, device=device, generator=g, dtype=torch.bfloat16)}  # fmt: skip
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device=device)
    batches = itertools.repeat(Batch(x0, cond, time_ids, slice(None), 1, 1.0))
    noise_gen = torch.Generator(device).manual_seed(1)
    losses = []
    for _ in range(warmup):
        losses.append(float(step(batches, noise_gen).loss))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        result = step(batches, noise_gen)
    losses.append(float(result.loss))
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    out = {
        "case": name, "train": train, "batch": 1, "latent": LATENT, "steps_timed": steps, "warmup": warmup,
        "step_s": round(seconds, 4), "img_per_s": round(1 / seconds, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
        "trained_params": sum(p.numel() for p in model.parameters()), "describe": model.describe(),
        "losses": [round(v, 4) for v in losses], "finite": all(map(lambda v: v == v and abs(v) < 1e4, losses)),
    }  # fmt: skip
    del step, opt, model, unet, batches
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/finetune_step.json")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    results = {
        "bench": "finetune_step", "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "python": platform.python_version(), "cases": [],
    }  # fmt: skip
    for name in args.cases:
        try:
            r = run_case(name, CASES[name], args.steps, args.warmup)
        except Exception as e:  # one failing case (e.g. out of memory) keeps the others' figures
            r = {"case": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
        results["cases"].append(r)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
