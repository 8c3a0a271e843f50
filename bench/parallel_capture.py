"""The UNet's block graphs compiled in worker processes, then captured in a CUDA graph (CUDA).

    python3 bench/parallel_capture.py [--model tiny|sdxl] [--workers 2] [--steps 4] [--out x.json]

`precompile.Regions(workers=N)` (train.compile_workers) runs a new shape's blocks eagerly once,
compiles the recorded calls in N processes and loads the variants; `speed.GraphedBackward` calls
that flush between its first warm-up and its capture. This runs the LoRA training micro-step as
`eri train` does (checkpointing, fused q/k/v, spatial dims marked, graphed forward + backward,
AdamW outside) and logs each flush and every block call that ran eagerly (no variant accepted
it), with the stream's capture state at that moment: such a call during the capture is recorded
eagerly into the CUDA graph. The losses are compared with an eager run of the same steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from common import environment, write_json
from steps import training_batch

from eridiffusion import networks, precompile, speed
from eridiffusion.families import FAMILIES
from eridiffusion.models.unet import UNet, UNetConfig


def build(model: str, batch: int, size: int):
    cfg = UNetConfig.tiny() if model == "tiny" else UNetConfig.sdxl()
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet(cfg)
    unet.to(torch.bfloat16).requires_grad_(False)
    net = networks.inject(unet, "unet", rank=8, alpha=8, targets=list(FAMILIES["sdxl"].lora_targets("unet")))
    torch.manual_seed(1)
    for p in net.lora_parameters():  # non-zero up weights: the LoRA path matters from step 0
        torch.nn.init.normal_(p, std=0.02)
    unet.gradient_checkpointing = True
    speed.optimize_for_training(unet, compile=False, fused_qkv=True, cudnn_benchmark=False)
    inputs = training_batch(cfg, batch, size, torch.Generator(device="cuda").manual_seed(2))
    return unet, net.lora_parameters(), inputs


def describe(sig) -> str:
    meta, _training, grad = sig
    return "; ".join(f"{tuple(m[0])} stride {tuple(m[1])} rg={m[4]}" if isinstance(m, tuple) and len(m) == 5 else repr(m)
                     for m in meta) + f" | grad={grad}"  # fmt: skip


def run(args, compiled: bool) -> dict:
    unet, params, inputs = build(args.model, args.batch, args.size)
    names = {id(m): n for n, m in unet.named_modules()}
    events: list[dict] = []
    regions = None
    if compiled:
        regions = precompile.Regions(workers=args.workers, log=lambda s: events.append({"log": s}))
        speed.compile_regions(unet, dynamic=None, spatial_dynamic=True, precompiled=regions)
        call = regions.call

        def watched(module, group, a):  # a call that ran eagerly (no variant accepted it), with the capture state
            sig = precompile._signature(module, a)
            out = call(module, group, a)
            if (id(module), sig) not in regions.memo and group not in regions.fallback:
                events.append({"miss": names[id(module)], "capturing": torch.cuda.is_current_stream_capturing(),
                               "call": describe(sig)})  # fmt: skip
            return out

        regions.call = watched
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)

    def micro(*a):
        x, t, ctx, y, target = a
        loss = F.mse_loss(unet(x, t, ctx, y).float(), target.float())
        loss.backward()
        return loss

    def prepare():
        t0 = time.perf_counter()
        done = regions.flush()
        events.append({"flush_s": round(time.perf_counter() - t0, 2), "any": done})
        return done

    step = speed.GraphedBackward(micro, params, prepare=prepare) if compiled else micro
    losses, error, t0 = [], None, time.perf_counter()
    for i in range(args.steps):
        opt.zero_grad(set_to_none=False)
        try:
            losses.append(float(step(*inputs)))
        except Exception as e:  # noqa: BLE001  (the capture's error, reported with what led to it)
            error = f"step {i}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            break
        opt.step()
        if regions is not None and regions.pending:
            prepare()
        if i == 0:
            events.append({"first_step_s": round(time.perf_counter() - t0, 2)})
    return {"compiled": compiled, "losses": losses, "error": error, "events": events,
            "variants": sum(len(v) for v in regions.variants.values()) if regions else 0}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "sdxl"), default="tiny")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=None, help="latent side (tiny 32, sdxl 128)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.size = args.size or (32 if args.model == "tiny" else 128)
    rows = [run(args, compiled=False), run(args, compiled=True)]
    eager, ours = rows[0]["losses"], rows[1]["losses"]
    diff = max((abs(a - b) for a, b in zip(eager, ours)), default=None)
    row = {"model": args.model, "workers": args.workers, "batch": args.batch, "size": args.size,
           "max_loss_diff": diff, "runs": rows}  # fmt: skip
    print(json.dumps(row, indent=1), flush=True)
    write_json(args.out, environment(torch.device("cuda")), [row])
    return 0 if rows[1]["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
