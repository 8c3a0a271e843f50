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

    fp8gemm:   the frozen-base GEMMs of an SDXL batch-4 step's spatial transformers (forward x Wᵀ and
               input gradient dy W, each shape times its count) in bf16, in float8 with one scale per
               tensor and with rowwise scales (per token × per output channel); and what quantising
               costs: a compiled LayerNorm alone, with a rowwise e4m3 copy of its output fused into
               it, with a tensorwise one (amax over the whole tensor), and a rowwise quantisation alone.

    saved:     what one compiled SDXL transformer block (1280 channels, 32² tokens, batch 4, LoRA on
               the default targets, fused q/k/v) keeps for backward with each GEGLU way and
               partitioner setting (SAVED_WAYS): MiB and the shapes of the kept tensors.

    python bench/kernels.py --out bench/results/kernels_h200.json [--only attention|copies|geglu|fp8gemm|saved]
"""

from __future__ import annotations

import argparse
import collections
import sys
import types

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


def bench_geglu(rows: list[dict]) -> None:
    g = torch.Generator("cuda").manual_seed(0)
    ways = {"inductor (plain ops)": torch.compile(kernels.geglu_plain, dynamic=False), "triton op": kernels.geglu,
            "triton op, compiled": torch.compile(kernels.geglu, dynamic=False)}  # fmt: skip
    for name, b, t, n in GEGLU_SHAPES:
        y = torch.randn(b, t, 2 * n, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
        dout = torch.randn(b, t, n, device="cuda", dtype=torch.bfloat16, generator=g)
        y32 = y.detach().float().requires_grad_()
        ref = kernels.geglu_plain(y32)
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


def transformer_gemms(batch: int = 4) -> list[tuple[str, int, int, int, int]]:
    """(name, M, K, N, count) of the frozen Linears' forward GEMMs in SDXL's spatial transformers at
    1024² (640 channels over 64² tokens: 5 transformers of depth 2; 1280 over 32²: 6 of depth 10),
    q/k/v fused; the cross-attention k/v over 77 text tokens left out (M = 308)."""
    gemms = []
    for c, tokens, blocks, transformers in ((640, 4096, 10, 5), (1280, 1024, 60, 6)):
        m = batch * tokens
        gemms += [(f"{c} qkv", m, c, 3 * c, blocks), (f"{c} out/q/out", m, c, c, 3 * blocks),
                  (f"{c} ff proj", m, c, 8 * c, blocks), (f"{c} ff out", m, 4 * c, c, blocks),
                  (f"{c} proj in/out", m, c, c, 2 * transformers)]  # fmt: skip
    return gemms


def fp8_gemm_ways(m: int, k: int, n: int, g: torch.Generator) -> dict:
    """Forward and input-gradient GEMM of one (M, K, N) frozen Linear in each way, operands made
    beforehand: {way: (forward fn, input-gradient fn)}."""
    from eridiffusion import fp8_matmul

    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, w, dy = (torch.randn(*shape, **bf, generator=g) for shape in ((m, k), (n, k), (m, n)))
    e4 = fp8_matmul.E4M3
    x8, w8, dy8 = (t.to(e4) for t in (x, w, dy))
    w8t = w8.t().contiguous()
    one = torch.ones((), device="cuda")
    rows = {"m": torch.ones(m, 1, device="cuda"), "n": torch.ones(1, n, device="cuda"), "k": torch.ones(1, k, device="cuda")}

    def scaled(a, b, sa, sb):
        return lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)

    return {"bf16": (lambda: x @ w.t(), lambda: dy @ w),
            "fp8 tensorwise": (scaled(x8, w8.t(), one, one), scaled(dy8, w8t.t(), one, one)),
            "fp8 rowwise": (scaled(x8, w8.t(), rows["m"], rows["n"]), scaled(dy8, w8t.t(), rows["m"], rows["k"]))}  # fmt: skip


def quantise_ways() -> dict:
    """{way: compiled fn(x, w, b)}: a LayerNorm alone, with a float8 copy of its output (rowwise or
    tensorwise, `fp8_matmul.quantize`), and a rowwise quantisation alone."""
    from eridiffusion.fp8_matmul import E4M3, quantize

    def norm(x, w, b):
        return F.layer_norm(x, x.shape[-1:], w, b)

    def norm_rowwise(x, w, b):
        y = norm(x, w, b)
        return y, *quantize(y, E4M3, dim=-1)

    def norm_tensorwise(x, w, b):
        y = norm(x, w, b)
        return y, *quantize(y, E4M3)

    ways = {"layernorm": norm, "layernorm + rowwise e4m3": norm_rowwise, "layernorm + tensorwise e4m3": norm_tensorwise,
            "rowwise e4m3 alone": lambda x, w, b: quantize(x, E4M3, dim=-1)}  # fmt: skip
    return {name: torch.compile(fn, dynamic=False) for name, fn in ways.items()}


def bench_fp8gemm(rows: list[dict]) -> None:
    g = torch.Generator("cuda").manual_seed(0)
    totals = collections.Counter()
    for name, m, k, n, count in transformer_gemms():
        for way, (fwd, dgrad) in fp8_gemm_ways(m, k, n, g).items():
            row = {"probe": "fp8gemm", "gemm": name, "m": m, "k": k, "n": n, "count": count, "way": way}
            try:
                row.update(fwd_ms=timed_ms(fwd), dgrad_ms=timed_ms(dgrad))
                totals[way, "fwd"] += count * row["fwd_ms"]
                totals[way, "dgrad"] += count * row["dgrad_ms"]
            except Exception as e:  # a way this build does not take: say which and why
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            emit(row, rows)
    for (way, part), ms in sorted(totals.items()):
        emit({"probe": "fp8gemm", "total": part, "way": way, "ms_per_step": ms}, rows)
    ways = quantise_ways()
    for c, tokens in ((640, 4096), (1280, 1024)):
        x = torch.randn(4 * tokens, c, device="cuda", dtype=torch.bfloat16, generator=g)
        w, b = torch.ones(c, device="cuda", dtype=torch.bfloat16), torch.zeros(c, device="cuda", dtype=torch.bfloat16)
        for way, fn in ways.items():
            emit({"probe": "fp8quant", "shape": (4 * tokens, c), "way": way, "ms": timed_ms(lambda: fn(x, w, b))}, rows)


def saved_by_block(triton_geglu: bool, partitioner: dict, recompute: bool) -> dict:
    from eridiffusion import ops
    from eridiffusion.models.unet import BasicTransformerBlock

    torch._dynamo.reset()
    torch.manual_seed(0)
    holder = torch.nn.Module()  # names like "a.transformer_blocks.0.ff.net.2", as the LoRA targets ask
    holder.a = torch.nn.Module()
    holder.a.transformer_blocks = torch.nn.ModuleList([BasicTransformerBlock(1280, 2048, 20)])
    holder.to("cuda", torch.bfloat16).requires_grad_(False)
    holder.cfg = types.SimpleNamespace(adm_in_channels=2816)  # SDXL's: kohya's "ldm" key naming
    networks.inject(holder, "unet", rank=16, alpha=16)
    block = holder.a.transformer_blocks[0]
    speed.fuse_qkv(holder)
    speed.recompute_in_backward(holder, recompute)
    speed.compile_regions(holder)
    x = torch.randn(4, 1024, 1280, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ctx = torch.randn(4, 77, 2048, device="cuda", dtype=torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in holder.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = (tuple(t.shape), str(t.dtype), t.untyped_storage().nbytes())
        return t

    old, ops.TRITON_GEGLU = ops.TRITON_GEGLU, triton_geglu
    try:
        with torch._functorch.config.patch(partitioner):
            block(x, ctx).sum().backward()  # compiles
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(x, ctx)
        out.sum().backward()
    finally:
        ops.TRITON_GEGLU = old
    return {"probe": "saved", "triton_geglu": triton_geglu, "partitioner": partitioner, "recompute": recompute,
            "kept_mib": sum(v[2] for v in kept.values()) / 2**20,
            "kept": sorted(kept.values(), key=lambda v: -v[2])}  # fmt: skip


SAVED_WAYS = (  # (Triton GEGLU, torch._functorch.config settings while the block compiles, GEGLU.recompute)
    (False, {}, False), (True, {}, False), (True, {"ban_recompute_materialized_backward": False}, False),
    (True, {"ban_recompute_materialized_backward": False, "ban_recompute_not_in_allowlist": False}, False),
    (True, {"aggressive_recomputation": True}, False),
    (True, {"ban_recompute_materialized_backward": False}, True),  # as eri train compiles it (speed.partitioner)
)


def bench_saved(rows: list[dict]) -> None:
    for triton_geglu, partitioner, recompute in SAVED_WAYS:
        emit(saved_by_block(triton_geglu, partitioner, recompute), rows)


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


PROBES = {"attention": bench_attention, "copies": bench_copies, "geglu": bench_geglu, "fp8gemm": bench_fp8gemm,
          "saved": bench_saved}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="all", choices=("all", *PROBES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs CUDA")
    speed.set_fast_math()
    env, rows = environment(torch.device("cuda")), []
    for name, probe in PROBES.items():
        if args.only in ("all", name):
            probe(rows)
            write_json(args.out, env, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
