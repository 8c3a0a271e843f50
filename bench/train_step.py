"""SDXL LoRA training step: eridiffusion vs diffusers+peft, in the same run, on one GPU.

Work per step (as in docs/benchmarks.md): full SDXL UNet shapes with random weights,
LoRA rank 16 on attention to_q/to_k/to_v/to_out.0, 1024² images (128² latents),
77-token context, bf16 weights, AdamW; one step = forward + backward + optimizer.
FLOPs are counted once with FlopCounterMode (forward + backward to the inputs at batch 1);
MFU = FLOPs/image × img/s ÷ measured bf16 matmul peak.

    python bench/train_step.py --out bench/results/train_step_h100.json
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

ATTN_TARGETS = ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0"]
LATENT = 128  # 1024² images
CONTEXT = (77, 2048)


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    compile: bool = False
    checkpointing: bool = False
    scope: str = "blocks"  # regional compile scope: "blocks" (eridiffusion.speed) or "stages" (bench/steps.py)
    channels_last: bool = False
    attn: str = "auto"  # SDPA backend priority
    mode: str | None = None  # torch.compile mode
    graph: bool = False  # capture forward+backward+AdamW in one CUDA graph (bench/steps.py GraphedStep)
    graph_backward: bool = False  # graph forward+backward only, AdamW eager: what `eri train` does (GraphedBackward)
    memory_budget: float | None = None  # torch._functorch activation_memory_budget for the compiled regions
    fused_qkv: bool = False  # self-attention q, k, v (and their LoRA) as one GEMM (eridiffusion.speed.fuse_qkv)
    inductor: tuple = ()  # (name, value) pairs of torch._inductor.config in force while the regions compile
    functorch: tuple = ()  # (name, value) pairs of torch._functorch.config (the partitioner's) while they compile
    cudnn_benchmark: bool = True  # cuDNN autotuning (its trial workspaces count in the first step's peak)
    dynamic: bool | None = False  # torch.compile's dynamic: None is what `eri train` uses (shape-generic after a recompile)
    fp8: bool = False  # train.fp8_matmul: the frozen transformer GEMMs in float8 (eridiffusion.fp8_matmul)
    fp8_backward: str = "bf16"  # their input-gradient GEMM: "bf16" or "fp8" (fp8_matmul.BACKWARD)
    lora: str = "plain"  # how LoRA layers run in compiled regions (eridiffusion.ops.COMPILED): "plain" or "function"
    triton_geglu: bool = True  # GEGLU by eridiffusion.kernels' Triton op (ops.TRITON_GEGLU); False: plain ops
    targets: str = "attention"  # LoRA targets: "attention" (ATTN_TARGETS, the peer's) or "default" (eri train's)
    recompute: bool | None = None  # cheap recomputes in compiled backward (speed.partitioner's remat, GEGLU
    # outputs); None: as eri train (on unless checkpointing)

    @property
    def recomputes(self) -> bool:
        return not self.checkpointing if self.recompute is None else self.recompute


CASES = [  # ours as `eri train` runs it (fused q/k/v); the peer runs the eager and checkpointing rows
    Case("b1_eager", 1, fused_qkv=True),
    Case("b1_graph", 1, compile=True, graph=True, fused_qkv=True),
    Case("b1_checkpointing_graph", 1, compile=True, checkpointing=True, graph=True, fused_qkv=True),
    Case("b4_eager", 4, fused_qkv=True),
    Case("b4_compile", 4, compile=True, fused_qkv=True),
    Case("b4_graph", 4, compile=True, graph=True, fused_qkv=True),
    Case("b4_graph_plain_geglu", 4, compile=True, graph=True, fused_qkv=True, triton_geglu=False),
    Case("b4_graph_mem0.6", 4, compile=True, graph=True, fused_qkv=True, memory_budget=0.6),
    Case("b4_graph_mem0.8", 4, compile=True, graph=True, fused_qkv=True, memory_budget=0.8),
    Case("b4_graph_fp8", 4, compile=True, graph=True, fused_qkv=True, fp8=True),
    Case("b4_graph_fp8_bwd", 4, compile=True, graph=True, fused_qkv=True, fp8=True, fp8_backward="fp8"),
    Case("b4_graph_nobench", 4, compile=True, graph=True, fused_qkv=True, cudnn_benchmark=False),  # as eri train
    Case("b4_graph_keep", 4, compile=True, graph=True, fused_qkv=True, recompute=False),  # before 2026-11-29 (9th)
    Case("b4_graph_all", 4, compile=True, graph=True, fused_qkv=True, targets="default"),
    Case("b4_graph_all_keep", 4, compile=True, graph=True, fused_qkv=True, targets="default", recompute=False),
    Case("b4_graph_remat", 4, compile=True, graph=True, fused_qkv=True, recompute=False,  # the remat flag alone
         functorch=(("ban_recompute_materialized_backward", False),)),
    Case("b4_graph_remat_ops", 4, compile=True, graph=True, fused_qkv=True, recompute=False,  # any op but matmuls
         functorch=(("ban_recompute_materialized_backward", False), ("ban_recompute_not_in_allowlist", False))),
    Case("b4_graph_aggressive", 4, compile=True, graph=True, fused_qkv=True, recompute=False,
         functorch=(("aggressive_recomputation", True),)),
    Case("b8_eager", 8, fused_qkv=True),
    Case("b8_graph", 8, compile=True, graph=True, fused_qkv=True),
    Case("b8_checkpointing", 8, checkpointing=True, fused_qkv=True),
    Case("b8_checkpointing_graph", 8, compile=True, checkpointing=True, graph=True, fused_qkv=True),
    Case("b8_checkpointing_graph_plain_geglu", 8, compile=True, checkpointing=True, graph=True, fused_qkv=True,
         triton_geglu=False),
]
# Variants of our step measured one change at a time (bench/train_step.py --variants).
VARIANTS = [
    Case("b1_graph", 1, graph=True),
    Case("b1_graph_blocks", 1, compile=True, graph=True),
    Case("b4_graph", 4, graph=True),
    Case("b4_graph_blocks", 4, compile=True, graph=True),
    Case("b4_graph_stages", 4, compile=True, scope="stages", graph=True),
    Case("b8_graph_blocks", 8, compile=True, graph=True),
    Case("b8_ckpt_graph_blocks", 8, compile=True, checkpointing=True, graph=True),
    Case("b4_blocks", 4, compile=True),
    Case("b4_blocks_cl", 4, compile=True, channels_last=True),
    Case("b4_stages", 4, compile=True, scope="stages"),
    Case("b4_stages_cl", 4, compile=True, scope="stages", channels_last=True),
    Case("b4_stages_cudnn", 4, compile=True, scope="stages", attn="cudnn"),
    Case("b4_eager_cudnn", 4, attn="cudnn"),
    Case("b1_train_graph", 1, graph_backward=True),
    Case("b1_train_graph_blocks", 1, compile=True, graph_backward=True),
    Case("b4_train_graph_blocks", 4, compile=True, graph_backward=True),
    Case("b4_graph_blocks_cl", 4, compile=True, channels_last=True, graph=True),
    Case("b4_graph_blocks_mem0.7", 4, compile=True, graph=True, memory_budget=0.7),
    Case("b4_graph_blocks_mem0.4", 4, compile=True, graph=True, memory_budget=0.4),
    Case("b4_graph_fused_mem0.9", 4, compile=True, graph=True, fused_qkv=True, memory_budget=0.9),
    Case("b4_graph_fn", 4, compile=True, graph=True, fused_qkv=True, lora="function"),
    Case("b8_checkpointing_graph_fn", 8, compile=True, checkpointing=True, graph=True, fused_qkv=True, lora="function"),
    Case("b1_graph_fused", 1, graph=True, fused_qkv=True),
    Case("b4_graph_blocks_fused", 4, compile=True, graph=True, fused_qkv=True),
    Case("b4_eager_fused", 4, fused_qkv=True),
    Case("b8_ckpt_graph_fused", 8, compile=True, checkpointing=True, graph=True, fused_qkv=True),
    Case("b8_ckpt_eager_fused", 8, checkpointing=True, fused_qkv=True),
    Case("b8_ckpt_compile_fused", 8, compile=True, checkpointing=True, fused_qkv=True),
    Case("b4_graph_fused_cdt", 4, compile=True, graph=True, fused_qkv=True,
         inductor=(("coordinate_descent_tuning", True),)),
    Case("b8_ckpt_graph_fused_nobench", 8, compile=True, checkpointing=True, graph=True, fused_qkv=True,
         cudnn_benchmark=False),
    Case("b4_train_graph_fused", 4, compile=True, graph_backward=True, fused_qkv=True),
    Case("b4_train_graph_fused_dynamic", 4, compile=True, graph_backward=True, fused_qkv=True, dynamic=None),
    Case("b4_train_graph_fused_fp8", 4, compile=True, graph_backward=True, fused_qkv=True, fp8=True),
    Case("b8_ckpt_graph_fused_cdt", 8, compile=True, checkpointing=True, graph=True, fused_qkv=True,
         inductor=(("coordinate_descent_tuning", True),)),
]
PEER_CASES = {"b1_eager", "b4_eager", "b4_compile", "b8_eager", "b8_checkpointing"}
# torch.compile of the whole diffusers UNet took 293 s to its first step on an H100: --peer-compile adds it.


def matmul_peak(n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 matmul rate (TFLOP/s) on random data: the MFU denominator."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def inputs(batch: int, seed: int = 0, channels_last: bool = False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, 4, LATENT, LATENT, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
    ctx = torch.randn(batch, *CONTEXT, device="cuda", generator=g, dtype=torch.bfloat16)
    pooled = torch.randn(batch, 1280, device="cuda", generator=g, dtype=torch.bfloat16)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device="cuda").repeat(batch, 1)
    target = torch.randn(batch, 4, LATENT, LATENT, device="cuda", generator=g, dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, t, ctx, pooled, time_ids, target


# ---------------------------------------------------------------- eridiffusion
def build_ours(case: Case):
    """Our step as `eri train` runs it: `eridiffusion.train.TrainStep` (its micro-step's
    forward + backward; with graph_backward the whole TrainStep, optimizer and clipping eager)."""
    import itertools

    from eridiffusion import networks
    from eridiffusion.families import FAMILIES
    from eridiffusion.models.unet import UNet, UNetConfig, sdxl_vector
    from eridiffusion.speed import optimize_for_training
    from eridiffusion.train import TrainStep
    from eridiffusion.train.batches import Batch
    from steps import attention_priority, compile_stages, training_step

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet(UNetConfig.sdxl())
    unet.to(torch.bfloat16).requires_grad_(False)
    net = networks.inject(unet, "unet", rank=16, alpha=16, targets=ATTN_TARGETS if case.targets == "attention" else None)
    net.to("cuda")
    unet.gradient_checkpointing = case.checkpointing
    unet.train()
    if case.fp8:
        from eridiffusion.fp8_matmul import enable_fp8_matmul

        enable_fp8_matmul(unet)
    stages = case.compile and case.scope == "stages"
    forward = optimize_for_training(unet, compile=case.compile and not stages, channels_last=case.channels_last,
                                    mode=case.mode, fused_qkv=case.fused_qkv, dynamic=case.dynamic,
                                    recompute=case.recomputes)
    if stages:
        compile_stages(unet, mode=case.mode, dynamic=case.dynamic)
    params = net.lora_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=case.graph)
    family = FAMILIES["sdxl"]
    train_step = TrainStep(family, forward, params, opt, prediction="epsilon", max_grad_norm=1.0,
                           cuda_graph=case.graph_backward, device=torch.device("cuda"))

    def fwd_bwd(x, t, ctx, pooled, time_ids, target):  # x: x0, target: the noise (epsilon target)
        with attention_priority(case.attn):
            return train_step.micro_step(x, time_ids, t, target, ctx, pooled)

    def body(*tensors):
        loss = fwd_bwd(*tensors)
        opt.step()
        return loss

    if case.graph_backward:  # the whole TrainStep as eri train runs it with train.cuda_graph
        noise_gen = torch.Generator("cuda").manual_seed(0)

        def step(x, t, ctx, pooled, time_ids, target):
            batch = Batch(x, {"context": ctx, "pooled": pooled}, time_ids, slice(None), x.shape[0], 1.0)
            with attention_priority(case.attn):
                return train_step(itertools.repeat(batch), noise_gen).loss
    else:
        step = training_step(body, params, opt, graph=case.graph)

    def fwd(x, t, ctx, pooled, time_ids):
        return unet(x, t, ctx, sdxl_vector(pooled, time_ids).to(x.dtype))

    return step, fwd, unet, net


# ---------------------------------------------------------------- diffusers + peft
DIFFUSERS_SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def build_peer(case: Case):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**DIFFUSERS_SDXL)
    unet.to(torch.bfloat16).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if case.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    model = torch.compile(unet) if case.compile else unet
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step(x, t, ctx, pooled, time_ids, target):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def fwd(x, t, ctx, pooled, time_ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    return step, fwd, unet, None


# ---------------------------------------------------------------- measurement
def count_flops(step) -> float:
    """FLOPs of one batch-1 training step (forward + backward), counted, not assumed."""
    from torch.utils.flop_counter import FlopCounterMode

    args = inputs(1)
    counter = FlopCounterMode(display=False)
    with counter:
        step(*args)
    return float(counter.get_total_flops())


def time_step(step, batch: int, warmup: int, iters: int, channels_last: bool = False, graphed: bool = False) -> dict:
    """Median step time; `peak_gib` over everything from the first step on (compilation, cuDNN
    autotuning and graph capture included); `steady_peak_gib` over the timed steps alone, not
    for graphed steps (a replay allocates nothing: its memory was taken at capture); for those
    `steady_reserved_gib`, what stays reserved after the timed steps once the free cache is released."""
    args = inputs(batch, channels_last=channels_last)
    torch.cuda.reset_peak_memory_stats()  # the peak includes compile / graph capture: the real working set
    t0 = time.perf_counter()
    step(*args)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step(*args)
    torch.cuda.synchronize()
    first_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()  # from here on: the steady step's working set
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        step(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    med = times[len(times) // 2]
    torch.cuda.empty_cache()  # what stays reserved: the live tensors and the graphs' private pool
    phases = getattr(step, "phase_peaks", {})  # GraphedStep: its warm-up and capture peaks (it resets the peak)
    return {
        "s_per_step": med,
        "img_per_s": batch / med,
        "peak_gib": max(first_peak / 2**30, torch.cuda.max_memory_allocated() / 2**30, *phases.values()),
        "warmup_peak_gib": phases.get("warmup_gib"),  # graphed: compilation, autotuning and the warm-up steps
        "capture_peak_gib": phases.get("capture_gib"),  # graphed: the capture alone
        "steady_peak_gib": None if graphed else torch.cuda.max_memory_allocated() / 2**30,
        # graphed: the memory a replayed step holds (weights, optimizer state, the captured pool)
        "steady_reserved_gib": torch.cuda.memory_reserved() / 2**30 if graphed else None,
        "first_step_s": first,
        "spread": (times[-1] - times[0]) / med,
    }


CATEGORIES = [  # kernel-name patterns -> category, first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
    ("optimizer", ("adam", "multi_tensor")),
    ("norm", ("group_norm", "layer_norm", "groupnorm", "layernorm", "welford", "red_fused_native_group_norm")),
    ("conv", ("conv", "implicit", "dgrad", "wgrad", "fprop", "winograd")),
    ("matmul", ("gemm", "cutlass", "xmma", "sm90", "nvjet", "matmul")),
    ("fused elementwise (triton)", ("triton", "_geglu_")),  # inductor's triton_* and eridiffusion.kernels'
    ("copy/cast", ("copy", "cast", "to_copy", "cat", "transpose")),
]


def profile_case(case: Case, path: str) -> dict:
    """Profile three steps of our step, under the case's settings as `run_case` times it: share of
    GPU time by kernel category, and idle time."""
    from torch.profiler import ProfilerActivity, profile

    with case_settings(case):
        built = build_ours(case)
        step, model = built[0], built[2]
        torch.backends.cudnn.benchmark = case.cudnn_benchmark  # after build: optimize_for_training sets it
        args = inputs(case.batch, channels_last=case.channels_last)
        for _ in range(3):  # compiles
            step(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(*args)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 3
    totals: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        us = evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        if us <= 0:
            continue
        name = evt.key.lower()
        cat = next((c for c, pats in CATEGORIES if any(p in name for p in pats)), "other")
        totals[cat] = totals.get(cat, 0.0) + us / 3 / 1e6
        kernels.append((us / 3 / 1e6, evt.key[:90], cat))
    busy = sum(totals.values())
    kernels.sort(reverse=True)
    summary = {"case": case.name, "wall_s_per_step": wall, "gpu_busy_s": busy,
               "idle_share": max(0.0, 1 - busy / wall),
               "share": {k: v / wall for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
               "top_kernels": [{"s": s_, "name": n, "category": c} for s_, n, c in kernels[:80]]}
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: summary[k] for k in ("case", "wall_s_per_step", "idle_share", "share")}), flush=True)
    del built, step, model
    gc.collect()
    torch.cuda.empty_cache()
    return summary


def _where(frames: list[dict]) -> str:
    """The innermost frame in our code (eridiffusion/, bench/) of an allocation's Python stack."""
    for f in frames:
        name = f.get("filename", "")
        if "/eridiffusion/" in name or "/bench/" in name:
            return f"{name.split('/eridiffusion/')[-1].split('/bench/')[-1]}:{f.get('line')} {f.get('name')}"
    return "(no Python frame: autograd's backward)" if not frames else f"{frames[0].get('filename')}:{frames[0].get('line')}"


def _warmed(case: Case):
    """Our step for `case` after two warm-up steps: (step, forward, unet, inputs)."""
    step, fwd, unet, _ = build_ours(case)
    args = inputs(case.batch, channels_last=case.channels_last)
    for _ in range(2):
        step(*args)
    torch.cuda.synchronize()
    return step, fwd, unet, args


def _sum_by(items) -> list[tuple[str, int, int]]:
    """(key, bytes) pairs summed per key: [(key, bytes, blocks)], largest first."""
    groups: dict[str, list] = {}
    for key, size in items:
        g = groups.setdefault(key, [0, 0])
        g[0] += size
        g[1] += 1
    return sorted(((k, b, n) for k, (b, n) in groups.items()), key=lambda r: -r[1])


def memory_case(case: Case, path: str, top: int = 30) -> dict:
    """Where a step's memory goes, after two warm-up steps: what was allocated before the step
    (weights, LoRA, optimizer state), what the forward leaves alive for backward, summed by the
    innermost frame of our code that allocated it (torch's allocator trace, recorded in the forward
    only: stacks recorded in autograd's backward thread failed under torch 2.11), and the peak
    the backward adds on top. Eager cases only."""
    step, fwd, _, args = _warmed(case)  # step kept: its optimizer state counts as "before the step"
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    out = fwd(*args[:5])
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    after_forward, forward_peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    live: dict[int, dict] = {}
    for e in (e for trace in snap["device_traces"] for e in trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    rows = _sum_by((_where(e.get("frames", [])), e["size"]) for e in live.values())
    gib = 2**30
    summary = {"case": case.name, "before_step_gib": base / gib, "after_forward_gib": after_forward / gib,
               "forward_peak_gib": forward_peak / gib, "peak_gib": torch.cuda.max_memory_allocated() / gib,
               "kept_for_backward": [{"where": w, "gib": b / gib, "blocks": n} for w, b, n in rows[:top]]}  # fmt: skip
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "kept_for_backward"}), flush=True)
    for r in summary["kept_for_backward"]:
        print(f"{r['gib']:8.3f} GiB {r['blocks']:6d}  {r['where']}", flush=True)
    return summary


MARK_BASE = 2**19  # markers: 512 KiB + 512 bytes × code (small pool: cut to the exact size; no step tensor has it)


def peak_case(case: Case, path: str, top: int = 25) -> dict:
    """What is alive at the peak of a whole steady step (forward, backward, optimizer), after two
    warm-up steps. Allocator events are recorded without stacks; each region (ResBlock, transformer
    block) allocates a marker of its own size when its body starts (forward, and the checkpoint's
    recompute in backward) and when the gradient reaches its output, so every block alive at the
    peak is told by the region and phase that allocated it, and the peak by the last marker
    before it. Not for graphed cases (a replay allocates nothing)."""
    from eridiffusion.models.unet import BasicTransformerBlock, ResBlock

    step, _, unet, args = _warmed(case)
    regions = [(n, m) for n, m in unet.named_modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
    labels = {}

    def mark(code: int) -> None:
        torch.empty(MARK_BASE + 512 * code, dtype=torch.uint8, device="cuda")

    for i, (name, m) in enumerate(regions):
        body, start, grad = m._forward, 2 * i + 1, 2 * i + 2
        labels[MARK_BASE + 512 * start], labels[MARK_BASE + 512 * grad] = f"{name} body", f"{name} output grad"

        def marked(*a, body=body, start=start, grad=grad):
            mark(start)
            out = body(*a)
            if out.requires_grad:
                out.register_hook(lambda g: mark(grad))
            return out

        m._forward = marked
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=4_000_000, context=None, stacks="python")
    step(*args)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snap["device_traces"] for e in trace]

    def replay(stop: int | None = None):  # the live blocks (size, phase) after `stop` events; the peak's index
        live, now, peak, at, phase = {}, base, base, 0, "before the step"
        for i, e in enumerate(events[:stop]):
            if e["action"] == "alloc":
                phase = labels.get(e["size"], phase)
                live[e["addr"]] = (e["size"], phase)
                now += e["size"]
                if now > peak:
                    peak, at = now, i + 1
            elif e["action"] == "free_requested" and e["addr"] in live:
                now -= live.pop(e["addr"])[0]
        return live, peak, at, phase

    _, peak, at, _ = replay()
    live, _, _, peak_phase = replay(at)
    gib = 2**30
    largest = sorted(live.values(), key=lambda v: -v[0])[:top]
    summary = {"case": case.name, "before_step_gib": base / gib, "peak_gib": peak / gib,
               "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / gib, "peak_during": peak_phase,
               "alive_at_peak_by_phase": [{"allocated_in": ph, "gib": b / gib, "blocks": n}
                                          for ph, b, n in _sum_by((ph, size) for size, ph in live.values())[:top]],
               "largest_at_peak": [{"mib": sz / 2**20, "allocated_in": ph} for sz, ph in largest]}  # fmt: skip
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: summary[k] for k in ("case", "before_step_gib", "peak_gib", "max_memory_allocated_gib",
                                              "peak_during")}), flush=True)  # fmt: skip
    for r in summary["alive_at_peak_by_phase"]:
        print(f"{r['gib']:8.3f} GiB {r['blocks']:6d}  {r['allocated_in']}", flush=True)
    for r in summary["largest_at_peak"][:12]:
        print(f"{r['mib']:10.1f} MiB  {r['allocated_in']}", flush=True)
    return summary


def fp8_fidelity(unet) -> float:
    """‖UNet(x) in fp8 − UNet(x) in bf16‖ / ‖UNet(x) in bf16‖ at batch 1, eager, same weights and
    LoRA (its up weights set non-zero): the whole network's forward error from the float8 GEMMs."""
    from eridiffusion.fp8_matmul import disable_fp8_matmul, enable_fp8_matmul
    from eridiffusion.models.unet import sdxl_vector

    for name, p in unet.named_parameters():
        if p.requires_grad and "lora_up" in name:
            torch.nn.init.normal_(p, std=0.01)
    x, t, ctx, pooled, time_ids, _ = inputs(1, seed=1)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        run = lambda: unet(x, t, ctx, sdxl_vector(pooled, time_ids).to(x.dtype)).float()  # noqa: E731
        out8 = run()
        disable_fp8_matmul(unet)
        ref = run()
        enable_fp8_matmul(unet)
    return ((out8 - ref).norm() / ref.norm()).item()


def case_settings(case: Case, impl: str = "eridiffusion") -> contextlib.ExitStack:
    """The settings `case` compiles and traces under (read in the first step), to enter around
    building it and its first steps: partitioner, inductor / functorch patches, how LoRA layers,
    GEGLU and fp8's input gradient run."""
    from eridiffusion import fp8_matmul, ops, speed

    budget = contextlib.ExitStack()
    budget.enter_context(speed.partitioner(case.memory_budget or 1.0, remat=case_recomputes(case, impl)))
    if case.inductor:
        budget.enter_context(torch._inductor.config.patch(dict(case.inductor)))
    if case.functorch:
        budget.enter_context(torch._functorch.config.patch(dict(case.functorch)))
    budget.enter_context(mock.patch.object(ops, "COMPILED", case.lora))  # read when the regions trace
    budget.enter_context(mock.patch.object(ops, "TRITON_GEGLU", case.triton_geglu))
    budget.enter_context(mock.patch.object(fp8_matmul, "BACKWARD", case.fp8_backward))  # read by enable_fp8_matmul
    return budget


def case_recomputes(case: Case, impl: str) -> bool:
    return case.recomputes and impl == "eridiffusion"  # the peer compiles under torch's defaults


def run_case(impl: str, case: Case, flops_per_image: float, peak: float, warmup: int, iters: int) -> dict:
    build = build_ours if impl == "eridiffusion" else build_peer
    recompute = case_recomputes(case, impl)
    row = {"impl": impl, "config": case.name, "batch": case.batch, "compile": case.compile,
           "checkpointing": case.checkpointing, "scope": case.scope, "channels_last": case.channels_last,
           "attn": case.attn, "mode": case.mode, "graph": case.graph, "graph_backward": case.graph_backward,
           "memory_budget": case.memory_budget, "fused_qkv": case.fused_qkv and impl == "eridiffusion",
           "inductor": dict(case.inductor), "functorch": dict(case.functorch), "cudnn_benchmark": case.cudnn_benchmark,
           "dynamic": case.dynamic, "fp8": case.fp8, "fp8_backward": case.fp8_backward if case.fp8 else None,
           "lora": case.lora, "targets": case.targets,
           "triton_geglu": case.triton_geglu, "recompute": recompute}
    with case_settings(case, impl):
        built = build(case)
        step, model = built[0], built[2]
        torch.backends.cudnn.benchmark = case.cudnn_benchmark  # after build: optimize_for_training sets it
        row.update(time_step(step, case.batch, warmup, iters, case.channels_last and impl == "eridiffusion",
                             graphed=case.graph or case.graph_backward))
        if case.fp8:
            row["fp8_forward_rel_err"] = fp8_fidelity(model)
    torch.backends.cudnn.benchmark = True
    row["mfu"] = flops_per_image * row["img_per_s"] / (peak * 1e12)
    del built, step, model
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all of the set)")
    ap.add_argument("--peer", default="auto", choices=["auto", "yes", "no"])
    ap.add_argument("--peer-compile", action="store_true", help="also time torch.compile of the diffusers UNet (minutes)")
    ap.add_argument("--variants", action="store_true", help="measure our step's speed variants, no peer")
    ap.add_argument("--profile", default=None, help="write a profiler summary of this case's step")
    ap.add_argument("--memory", default=None, help="write what is alive at this case's peak (not for graphed cases)")
    ap.add_argument("--peak", default=None, help="write what is alive at the peak of this case's whole step "
                    "(not for graphed cases)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/train_step.py: no CUDA GPU found; this benchmark measures the GPU step (docs/benchmarks.md)",
              file=sys.stderr)  # fmt: skip
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    peer = args.peer == "yes"
    if args.peer == "auto":
        try:
            import diffusers  # noqa: F401
            import peft  # noqa: F401
            peer = True
        except ImportError:
            peer = False

    if args.memory:
        memory_case(next(c for c in CASES + VARIANTS if c.name == args.memory), args.out or "memory.json")
        return 0
    if args.peak:
        peak_case(next(c for c in CASES + VARIANTS if c.name == args.peak), args.out or "peak.json")
        return 0
    peak = matmul_peak()
    built = build_ours(Case("flops", 1))  # kept whole, then dropped whole: its LoRA network holds the base
    flops = count_flops(built[0])  # layers it wraps, ~1.9 GiB that a stray reference added to every row's peak
    del built
    gc.collect()
    torch.cuda.empty_cache()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "python": platform.python_version(), "bf16_peak_tflops": round(peak, 1),
           "flops_per_image_fwd_bwd": flops}
    print(json.dumps({"env": env}), flush=True)
    if args.profile:
        case = next(c for c in CASES + VARIANTS if c.name == args.profile)
        profile_case(case, args.out or "profile.json")
        return 0
    rows = []
    wanted = args.cases.split(",") if args.cases else None
    pool = VARIANTS if args.variants else CASES
    by_name = {c.name: c for c in pool}
    unknown = [n for n in wanted or [] if n not in by_name]
    if unknown:
        print(f"bench/train_step.py: unknown cases {unknown}; known: {', '.join(by_name)}", file=sys.stderr)
        return 2
    cases = pool if wanted is None else [by_name[n] for n in wanted]  # in the order asked for
    peer = peer and not args.variants
    for case in cases:
        peer_here = peer and case.name in PEER_CASES and (args.peer_compile or not case.compile)
        for impl in ["eridiffusion"] + (["diffusers+peft"] if peer_here else []):
            try:
                row = run_case(impl, case, flops, peak, args.warmup, args.iters)
            except torch.OutOfMemoryError:
                row = {"impl": impl, "config": case.name, "error": "out of memory"}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out + "l", "a") as f:
                    f.write(json.dumps(row) + "\n")
    by = {(r["impl"], r["config"]): r for r in rows}
    for r in rows:
        p = by.get(("diffusers+peft", r["config"]))
        if r["impl"] == "eridiffusion" and p and "img_per_s" in p and "img_per_s" in r:
            r["ratio_to_peer"] = r["img_per_s"] / p["img_per_s"]
    print(f"{'impl':16} {'config':24} {'img/s':>7} {'s/step':>7} {'GiB':>6} {'steady':>6} {'MFU':>6} {'x peer':>6}")
    for r in rows:
        if "img_per_s" in r:
            print(f"{r['impl']:16} {r['config']:24} {r['img_per_s']:7.2f} {r['s_per_step']:7.3f} "
                  f"{r['peak_gib']:6.1f} {r['steady_peak_gib'] or float('nan'):6.1f} {100 * r['mfu']:5.1f}% "
                  f"{r.get('ratio_to_peer', float('nan')):6.2f}")
        else:
            print(f"{r['impl']:16} {r['config']:18} {r.get('error')}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
