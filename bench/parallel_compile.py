"""Experiment: compile the UNet's distinct block graphs in worker processes, then the main process.

    python3 bench/parallel_compile.py [--workers 2] [--out x.json]      # CPU, tiny SDXL-layout UNet

Issue 17 asks for the distinct block graphs to compile in parallel. `eri train` compiles them one
after another as its first step reaches each block (SDXL on an H200: 98 s of a 131 s cold start).
Here the main process records, on a meta-device copy of the UNet, each block's call (argument
shapes, dtypes, strides, requires_grad), groups the blocks by what their graph depends on, and
sends one meta copy of a block per group to a worker process. A worker materialises it
(`to_empty`), compiles it as `speed.compile_regions` does and runs forward + backward once, which
fills the shared inductor / AOTAutograd cache folder. The main process then trains one step and
counts its cache hits and misses: misses mean the workers compiled other graphs than it needs.
Tiny model with LoRA on the default targets, fused q/k/v, gradient checkpointing, regions
shape-generic in H and W, inductor on the CPU. Not the training path: an experiment, whose result
(docs/benchmarks.md, "Issue 17, fourth pass") is that a block's graph depends on more than its own
call: the strides its compiled neighbours give its inputs, and (with torch's automatic dynamic
shapes) which blocks the same process compiled before it.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from common import REPO, write_json  # noqa: I001
from eridiffusion.precompile import meta_copy

BUCKETS = [(16, 16), (24, 16)]  # latent sizes (tiny model)


def build_unet() -> nn.Module:
    from eridiffusion import networks, speed
    from eridiffusion.families import FAMILIES
    from eridiffusion.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).requires_grad_(False)
    networks.inject(unet, "unet", rank=4, alpha=4, targets=list(FAMILIES["sdxl"].lora_targets("unet")))
    unet.gradient_checkpointing = True
    unet.train()
    speed.fuse_qkv(unet)
    return unet


def inputs(h: int, w: int, device="cpu"):
    g = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(2, 4, h, w, generator=g)
    return [t.to(device) for t in (x, torch.tensor([10.0, 500.0]), torch.randn(2, 7, 96, generator=g),
                                   torch.randn(2, 256, generator=g))]  # fmt: skip


def spec(v):
    if torch.is_tensor(v):
        return {"shape": list(v.shape), "stride": list(v.stride()), "dtype": str(v.dtype).split(".")[1],
                "requires_grad": v.requires_grad}  # fmt: skip
    return {"value": v}


def record_groups(unet: nn.Module) -> list[tuple[nn.Module, list]]:
    """[(meta copy of one block, its call's argument specs)] per distinct (block type, parameter
    metadata, argument metadata): blocks alike in all three share one compiled graph."""
    from eridiffusion import speed
    from eridiffusion.models.unet import BasicTransformerBlock, ResBlock

    meta = meta_copy(unet)
    groups: dict[str, tuple[nn.Module, list]] = {}

    def hook(module, args):
        params = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in module.named_parameters()]
        specs = [spec(a) for a in args]
        # spatial dims are symbolic in the compiled regions: any bucket's call stands for all
        dyn = dict(next(d for c, d in speed.SPATIAL_DIMS.items() if isinstance(module, c)))
        shapes = [[None if d in dyn.get(i, ()) else n for d, n in enumerate(s.get("shape", []))] for i, s in enumerate(specs)]
        fixed = [{k: v for k, v in s.items() if k not in ("shape", "stride")} for s in specs]
        key = json.dumps([type(module).__name__, params, shapes, fixed])
        groups.setdefault(key, (module, specs))

    handles = [m.register_forward_pre_hook(hook) for m in meta.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
    x, t, ctx, y = inputs(*BUCKETS[0], device="meta")
    meta(x, t, ctx, y)
    for h in handles:
        h.remove()
    return list(groups.values())


def watch_misses(unet: nn.Module, counters) -> list:
    """The blocks whose call compiled a graph no cache held, with their inputs' shapes and strides
    (filled as the main process trains)."""
    from eridiffusion.models.unet import BasicTransformerBlock, ResBlock

    missed = []
    for name, m in unet.named_modules():
        if isinstance(m, (ResBlock, BasicTransformerBlock)):
            def watched(*a, fn=m._forward, name=name):
                before = counters["aot_autograd"]["autograd_cache_miss"]
                out = fn(*a)
                if counters["aot_autograd"]["autograd_cache_miss"] > before:
                    missed.append([name, [[list(t.shape), list(t.stride())] if torch.is_tensor(t) else t for t in a]])
                return out

            m._forward = watched
    return missed


WORKER = r"""
import pickle, sys, torch
sys.path.insert(0, sys.argv[2])
from eridiffusion import speed
torch._dynamo.config.automatic_dynamic_shapes = sys.argv[3] == "auto"
with open(sys.argv[1], "rb") as f:
    jobs = pickle.load(f)
for block, specs in jobs:
    block.to_empty(device="cpu")
    speed.compile_regions(block, dynamic=None, spatial_dynamic=True)
    args = []
    for s in specs:
        if "value" in s:
            args.append(s["value"])
            continue
        t = torch.empty_strided(s["shape"], s["stride"], dtype=getattr(torch, s["dtype"])).normal_()
        args.append(t.requires_grad_(s["requires_grad"]))
    out = block(*args)
    if out.requires_grad:  # blocks before the first trained layer run without autograd in the UNet too
        out.float().square().mean().backward()
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--buckets", type=int, default=len(BUCKETS), help="how many of the buckets the main process trains")
    ap.add_argument("--static-unmarked", action="store_true", help="torch._dynamo automatic_dynamic_shapes off "
                    "in every process: only the marked spatial dims are symbolic")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch._dynamo.config.automatic_dynamic_shapes = not args.static_unmarked
    from torch._dynamo.utils import counters

    from eridiffusion import speed

    work = Path(tempfile.mkdtemp(prefix="parallel_compile_"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")
    unet = build_unet()
    groups = record_groups(unet)
    jobs: list[list] = [[] for _ in range(args.workers)]
    for i, g in enumerate(groups):
        jobs[i % args.workers].append(g)
    t0 = time.perf_counter()
    procs = []
    for i, share in enumerate(jobs):
        path = work / f"jobs{i}.pkl"
        path.write_bytes(pickle.dumps(share))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        mode = "static" if args.static_unmarked else "auto"
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(REPO), mode], env=env))
    rcs = [p.wait() for p in procs]
    t_workers = time.perf_counter() - t0
    speed.compile_regions(unet, dynamic=None, spatial_dynamic=True)
    missed = watch_misses(unet, counters)
    t1 = time.perf_counter()
    for h, w in BUCKETS[: args.buckets]:
        x, t, ctx, y = inputs(h, w)
        unet(x, t, ctx, y).float().square().mean().backward()
    row = {"workers": args.workers, "buckets": BUCKETS[: args.buckets], "static_unmarked": args.static_unmarked,
           "groups": len(groups), "worker_rc": rcs, "workers_s": t_workers,
           "main_steps_s": time.perf_counter() - t1, "fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
           "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
           "autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
           "autograd_miss": counters["aot_autograd"]["autograd_cache_miss"],
           "frames": counters["frames"]["ok"], "missed_blocks": missed}  # fmt: skip
    print(json.dumps(row), flush=True)
    write_json(args.out, {"torch": torch.__version__, "cpus": os.cpu_count()}, [row])
    return 0 if not any(rcs) else 1


if __name__ == "__main__":
    sys.exit(main())
