"""Where dynamo's tracing time goes in `eri train`'s compiled regions (CPU, no GPU needed).

    python3 bench/trace_regions.py [--plain-lora] [--repeat 3] [--out x.json]

Warm runs read inductor's and AOTAutograd's graphs from the compile cache, but dynamo still traces
every distinct region (issue 17: 8.4 s of an H200 warm run's 25.4 s first step). Tracing does not
depend on the device, so this builds SDXL on the meta device (bf16, the default LoRA targets,
rank 16, fused q/k/v, checkpointing, the regions compiled as `eri train` does with several buckets,
the eager backend: no inductor), runs one forward and backward at 1024², and reports the seconds
per region kind and dynamo's own `bytecode_tracing` timer. `--plain-lora` swaps `ops.lora_linear`
for plain matmuls while compiling (no `autograd.Function` for dynamo to trace): an experiment,
not what the trainer runs (its partitioning, so memory and speed, would need a GPU run).
Each repeat is a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from common import REPO, write_json  # noqa: I001


def child(plain_lora: bool) -> dict:
    from torch._dynamo.utils import compilation_time_metrics, counters

    from eridiffusion import networks, ops, speed
    from eridiffusion.families import FAMILIES
    from eridiffusion.models.unet import BasicTransformerBlock, ResBlock, UNet, UNetConfig

    if plain_lora:
        fused = ops.lora_linear

        def lora_linear(x, weight, bias, down, up):
            if not torch.compiler.is_compiling():
                return fused(x, weight, bias, down, up)
            w = weight if torch.is_tensor(weight) else torch.cat(tuple(weight))
            x2, shape = x.reshape(-1, x.shape[-1]), (*x.shape[:-1], w.shape[0])
            update = None if down is None else ((x2 @ down.t()) @ up.t()).view(shape)
            return ops._plain((x2 @ w.t()).view(shape), bias, update)

        ops.lora_linear = lora_linear
    family = FAMILIES["sdxl"]
    with torch.device("meta"):
        unet = UNet(UNetConfig.sdxl()).to(torch.bfloat16).requires_grad_(False)
    networks.inject(unet, "unet", rank=16, alpha=16, targets=list(family.lora_targets("unet"))).to("meta")
    unet.gradient_checkpointing = True
    unet.train()
    speed.fuse_qkv(unet)
    speed.compile_regions(unet, backend="eager", dynamic=None, spatial_dynamic=True)
    seconds: dict[str, float] = {}
    for m in unet.modules():
        if isinstance(m, (ResBlock, BasicTransformerBlock)):
            def timed(*a, body=m._forward, kind=type(m).__name__):
                t0 = time.perf_counter()
                out = body(*a)
                seconds[kind] = seconds.get(kind, 0.0) + time.perf_counter() - t0
                return out

            m._forward = timed
    with torch.device("meta"):
        x, ctx = torch.randn(1, 4, 128, 128, dtype=torch.bfloat16), torch.randn(1, 77, 2048, dtype=torch.bfloat16)
        y, t = torch.randn(1, 2816, dtype=torch.bfloat16), torch.tensor([10])
    t0 = time.perf_counter()
    out = unet(x, t, ctx, y)
    t1 = time.perf_counter()
    out.float().sum().backward()
    t2 = time.perf_counter()
    return {"plain_lora": plain_lora, "forward_s": t1 - t0, "backward_s": t2 - t1,
            "region_s": {k: round(v, 3) for k, v in seconds.items()}, "frames": counters["frames"]["ok"],
            "bytecode_tracing_s": sum(compilation_time_metrics.get("bytecode_tracing", [0.0]))}  # fmt: skip


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(argv[1] == "plain")), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plain-lora", action="store_true", help="also measure plain matmuls for the LoRA layers")
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes per variant")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for variant in ["function"] + (["plain"] if args.plain_lora else []):
        for _ in range(args.repeat):
            done = subprocess.run([sys.executable, __file__, "--child", variant], cwd=REPO, capture_output=True,
                                  text=True, check=True)  # fmt: skip
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    env = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "device": "meta (tracing only)"}
    write_json(args.out, env, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
