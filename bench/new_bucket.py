"""What a new aspect bucket costs on its first step, with cuDNN autotuning on and off.

    python3 bench/new_bucket.py --cudnn-benchmark on --out on.json; python3 bench/new_bucket.py --cudnn-benchmark off --out off.json

`eri train` with compile + CUDA graph spent 6.6 s on the second bucket's first step (H200,
docs/benchmarks.md) with no graph compiled: warm-ups, capture and whatever the libraries do at
a new shape. This measures the libraries' part without compilation: the SDXL UNet (random bf16
weights, LoRA rank 16 on the default targets, fused q/k/v, batch 4, eager), one forward +
backward at each of three buckets (each shape new to the process), then the steady step at
1024². With `torch.backends.cudnn.benchmark` on (what `speed.set_fast_math` sets: cuDNN times its
convolution algorithms at every new shape) or off (cuDNN's heuristics); one process per setting,
so that neither reuses the other's choices.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import emit, environment, median, write_json  # noqa: I001

BUCKETS = [(1024, 1024), (1152, 896), (1216, 832)]


def build(batch: int):
    from eridiffusion import networks, speed
    from eridiffusion.families import FAMILIES
    from eridiffusion.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet(UNetConfig.sdxl())
    unet.to(torch.bfloat16).requires_grad_(False)
    net = networks.inject(unet, "unet", rank=16, alpha=16, targets=list(FAMILIES["sdxl"].lora_targets("unet")))
    net.to("cuda")
    unet.train()
    speed.fuse_qkv(unet)
    ctx = torch.randn(batch, 77, 2048, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(batch, 2816, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (batch,), device="cuda")

    def step(h: int, w: int) -> None:
        x = torch.randn(batch, 4, h // 8, w // 8, device="cuda", dtype=torch.bfloat16)
        unet(x, t, ctx, y).float().square().mean().backward()

    return step


def timed(fn, *args) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steady", type=int, default=5, help="steps timed at 1024² after the new buckets")
    ap.add_argument("--cudnn-benchmark", choices=["on", "off"], default="on")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/new_bucket.py: no CUDA GPU found", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    step = build(args.batch)
    torch.backends.cudnn.benchmark = False
    timed(step, 512, 512)  # CUDA context, cuBLAS handles, the first kernels: paid before the buckets
    env = environment(torch.device("cuda"))
    rows: list[dict] = []
    torch.backends.cudnn.benchmark = benchmark = args.cudnn_benchmark == "on"
    first = {f"{h}x{w}": timed(step, h, w) for h, w in BUCKETS}
    steady = [timed(step, 1024, 1024) for _ in range(args.steady)]
    emit({"cudnn_benchmark": benchmark, "batch": args.batch, "first_step_s": first,
          "steady_1024_s": median(steady), "steady_all_s": steady}, rows)  # fmt: skip
    write_json(args.out, env, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
