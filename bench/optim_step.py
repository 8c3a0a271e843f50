"""The optimizer step alone on SDXL LoRA parameters: time and memory per optimizer and rank.

Parameters: the LoRA (down, up) matrices `eri train` trains on the full SDXL UNet with the
family's default targets (attention q/k/v/out, feed-forward, proj_in/out), fp32, with random
gradients. Per optimizer and rank: the state's bytes after the first step, the step's peak
allocation above params + grads + state, and the median of 30 timed steps (CUDA events, after
5 warm-up steps, which for torchao include its per-shape compiles).

    python bench/optim_step.py --out bench/results/optim_step_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from eridiffusion import networks, optim  # noqa: E402
from eridiffusion.config import TrainConfig  # noqa: E402
from eridiffusion.families import FAMILIES  # noqa: E402
from eridiffusion.models.unet import UNet  # noqa: E402

CASES = {  # name → [optim] section
    "adamw": {"optimizer": "adamw"},
    "adamw8bit-torchao": {"optimizer": "adamw8bit", "args": {"backend": "torchao"}},
    "adamw8bit-bitsandbytes": {"optimizer": "adamw8bit", "args": {"backend": "bitsandbytes"}},
    "prodigy": {"optimizer": "prodigy", "unet_lr": 1.0},
    "adafactor": {"optimizer": "adafactor", "unet_lr": 1e-2},
    "adafactor-kohya": {"optimizer": "adafactor",
                        "args": {"scale_parameter": False, "relative_step": False, "warmup_init": False}},
}  # fmt: skip


def lora_shapes(rank: int) -> list[tuple[int, ...]]:
    """Shapes of every LoRA parameter `eri train` creates on the SDXL UNet at `rank`."""
    fam = FAMILIES["sdxl"]
    with torch.device("meta"):
        unet = UNet(fam.unet)
        net = networks.inject(unet, "unet", rank, float(rank), targets=list(fam.lora_targets("unet", conv=False)),
                              naming=fam.unet_lora_naming)  # fmt: skip
    return [tuple(p.shape) for p in net.lora_parameters()]


def measure(name: str, section: dict, shapes, steps: int = 30, warmup: int = 5) -> dict:
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(dev).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=dev, generator=g) * 0.01) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=dev, generator=g) * 1e-3
    base = torch.cuda.memory_allocated()
    cfg = TrainConfig.from_dict({"optim": section}).optim
    opt = optim.build(cfg, [{"params": params, "lr": cfg.unet_lr, "name": "unet"}], dev)
    t0 = time.perf_counter()
    opt.optimizer.step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    state = torch.cuda.memory_allocated() - base
    for _ in range(warmup - 1):
        opt.optimizer.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        opt.optimizer.step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    n = sum(p.numel() for p in params)
    out = {"optimizer": name, "params": n, "tensors": len(params), "step_ms": statistics.median(times),
           "step_ms_min": min(times), "first_step_s": first, "state_bytes": state, "state_bytes_per_param": state / n,
           "step_peak_extra_bytes": torch.cuda.max_memory_allocated() - held}  # fmt: skip
    del opt, params
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/optim_step.json")
    ap.add_argument("--ranks", default="16,128")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    for mod in ("torchao", "bitsandbytes", "prodigyopt"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            meta[mod] = f"missing ({type(e).__name__})"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = []
    for rank in map(int, args.ranks.split(",")):
        shapes = lora_shapes(rank)
        for name, section in CASES.items():
            if args.only and name not in args.only.split(","):
                continue
            try:
                row = {"rank": rank, **measure(name, section, shapes)}
            except Exception as e:  # a missing library or a failing backend: recorded, the rest goes on
                row = {"rank": rank, "optimizer": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(args.out, "w") as f:  # after every row: a run cut short keeps what it measured
                json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
