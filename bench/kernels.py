"""Three probes of the non-matmul time in the SDXL training step (issue 17, item 2), CUDA only.

    attention: forward + backward of every attention shape of an SDXL batch-4 1024² step
               (self-attention over 64² and 32² tokens, cross-attention over 77 text tokens,
               head dim 64) with each SDPA backend torch has here (cuDNN, flash, memory-efficient,
               the default choice) and FlexAttention (compiled): ms per call, largest difference
               of the output from the default's.
    copies:    one profiled training step (batch 4, LoRA rank 16, regional compile, eager launch
               so the profiler links kernels to the ops that launched them) of the random-weight
               SDXL UNet; every device-to-device copy kernel (`memcpy*`, `Memcpy DtoD`) with the
               chain of ops that launched it, summed per chain.

    geglu:     forward + backward of GEGLU at SDXL's two feed-forward shapes (batch 4, 1024²): the
               plain ops compiled by inductor against eridiffusion.kernels' Triton op (eager and
               compiled); ms per call, largest error of output and input gradient against fp32.

    python bench/kernels.py --out bench/results/kernels_h200.json [--only attention|copies|geglu]
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
import torch.nn.functional as F

from common import emit, environment, median, random_part, time_calls, write_json  # noqa: I001 (repo root on sys.path)
from eridiffusion import checkpoint, kernels, networks, speed

SHAPES = (  # (name, batch, heads, query tokens, key tokens, head dim) at SDXL 1024², batch 4
    ("self 64x64", 4, 10, 4096, 4096, 64),
    ("self 32x32", 4, 20, 1024, 1024, 64),
    ("cross 64x64", 4, 10, 4096, 77, 64),
    ("cross 32x32", 4, 20, 1024, 77, 64),
)


def timed_ms(fn, iters: int = 20, device: torch.device = torch.device("cuda")) -> float:
    """Median ms of `iters` calls after 3 warm-ups (CUDA events: `common.time_calls`)."""
    for _ in range(3):
        fn()
    return 1e3 * median(time_calls(fn, device, iters))


def attention_backends() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def with_backend(backend):
        def attend(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        return attend

    backends = {"default": F.scaled_dot_product_attention, "cudnn": with_backend(SDPBackend.CUDNN_ATTENTION),
                "flash": with_backend(SDPBackend.FLASH_ATTENTION),
                "efficient": with_backend(SDPBackend.EFFICIENT_ATTENTION)}  # fmt: skip
    try:
        from torch.nn.attention.flex_attention import flex_attention

        backends["flex (compiled)"] = torch.compile(flex_attention, dynamic=False)
    except ImportError:
        pass
    return backends


def bench_attention(rows: list[dict]) -> None:
    g = torch.Generator("cuda").manual_seed(0)
    for name, b, h, tq, tk, d in SHAPES:
        q = torch.randn(b, h, tq, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        k, v = (torch.randn(b, h, tk, d, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
                for _ in range(2))  # fmt: skip
        dout = torch.randn(b, h, tq, d, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = F.scaled_dot_product_attention(q, k, v).float()
        for backend, attend in attention_backends().items():
            row = {"probe": "attention", "shape": name, "backend": backend}
            try:
                diff = (attend(q, k, v).float() - ref).abs().max().item()

                def step():
                    out = attend(q, k, v)
                    torch.autograd.grad(out, (q, k, v), dout)

                row.update(fwd_ms=timed_ms(lambda: attend(q, k, v)), fwd_bwd_ms=timed_ms(step), max_abs_diff=diff)
            except Exception as e:  # a backend that does not take this shape: say which and why
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            emit(row, rows)


GEGLU_SHAPES = (("64x64, 640 ch", 4, 4096, 2560), ("32x32, 1280 ch", 4, 1024, 5120))  # (name, batch, tokens, n)


def plain_geglu(y):
    x, gate = y.chunk(2, dim=-1)
    return x * F.gelu(gate)


def bench_geglu(rows: list[dict]) -> None:
    g = torch.Generator("cuda").manual_seed(0)
    ways = {"inductor (plain ops)": torch.compile(plain_geglu, dynamic=False), "triton op": kernels.geglu,
            "triton op, compiled": torch.compile(kernels.geglu, dynamic=False)}  # fmt: skip
    for name, b, t, n in GEGLU_SHAPES:
        y = torch.randn(b, t, 2 * n, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        dout = torch.randn(b, t, n, device="cuda", dtype=torch.bfloat16, generator=g)
        y32 = y.detach().float().requires_grad_()
        ref = plain_geglu(y32)
        (ref_grad,) = torch.autograd.grad(ref, y32, dout.float())
        for way, fn in ways.items():
            out = fn(y)
            (grad,) = torch.autograd.grad(out, y, dout)
            row = {"probe": "geglu", "shape": name, "way": way,
                   "out_max_err": (out.float() - ref).abs().max().item(),
                   "grad_max_err": (grad.float() - ref_grad).abs().max().item(),
                   "fwd_ms": timed_ms(lambda: fn(y.detach())),
                   "fwd_bwd_ms": timed_ms(lambda: torch.autograd.grad(fn(y), y, dout))}  # fmt: skip
            emit(row, rows)


def chain(evt) -> str:
    names = []
    while evt is not None and len(names) < 6:
        names.append(evt.name)
        evt = evt.cpu_parent
    return " < ".join(names)


def bench_copies(rows: list[dict]) -> None:
    family = checkpoint.FAMILIES["sdxl"]
    unet = random_part(family, "unet", torch.device("cuda"), torch.bfloat16, seed=0)
    net = networks.inject(unet, "unet", 16, 16.0)
    for p in net.lora_parameters():
        p.data = p.data.float()
    speed.optimize_for_training(unet, compile=True, fused_qkv=True)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(4, 4, 128, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.randint(0, 1000, (4,), device="cuda", generator=g)
    ctx = torch.randn(4, 77, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    y = torch.randn(4, 2816, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        unet(x, t, ctx, y).float().pow(2).mean().backward()

    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_chain, total = collections.defaultdict(lambda: [0, 0.0]), 0.0
    for evt in prof.events():
        for k in evt.kernels:
            if "memcpy" in k.name.lower():
                key = f"{k.name} :: {chain(evt)} :: {evt.input_shapes}"
                by_chain[key][0] += 1
                by_chain[key][1] += k.duration / 1000
                total += k.duration / 1000
    emit({"probe": "copies", "total_ms": total, "kernels": sum(n for n, _ in by_chain.values())}, rows)
    for key, (n, ms) in sorted(by_chain.items(), key=lambda kv: -kv[1][1])[:25]:
        emit({"probe": "copies", "launched_by": key, "count": n, "ms": ms}, rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="all", choices=("all", "attention", "copies", "geglu"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs CUDA")
    speed.set_fast_math()
    env, rows = environment(torch.device("cuda")), []
    if args.only in ("all", "attention"):
        bench_attention(rows)
        write_json(args.out, env, rows)
    if args.only in ("all", "copies"):
        bench_copies(rows)
        write_json(args.out, env, rows)
    if args.only in ("all", "geglu"):
        bench_geglu(rows)
        write_json(args.out, env, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
