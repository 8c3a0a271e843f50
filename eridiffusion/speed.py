"""Speed settings for the GPU, applied without renaming any parameter.

Regional compilation: blocks of the UNet are compiled one by one, in place (each block's
body, `_forward`), so `state_dict()` keys stay the checkpoint's. Blocks of the same
structure share one compiled graph, so SDXL compiles 16 graphs instead of one 2.5
B-parameter graph, and the eager Python left between regions is a few dozen calls per step.
Gradient checkpointing wraps the compiled body from outside: backward reruns the compiled
forward and keeps only the block's inputs (a checkpoint traced inside the graph lets the
partitioner keep more: 22 GiB instead of 12 at SDXL batch 8).
The regions are every ResBlock and BasicTransformerBlock (fewest distinct graphs); the
benchmark's "stages" scope (whole `input_blocks.i`) lives in bench/steps.py.
"""
from __future__ import annotations

import torch
from torch import nn

from .models.unet import GEGLU, BasicTransformerBlock, CrossAttention, ResBlock, UNet

SCOPES = ("none", "blocks")


def set_fast_math(cudnn_benchmark: bool = True) -> None:
    """TF32 for the few fp32 matmuls/convs left (LoRA factors in fp32); cuDNN autotuning, which
    costs seconds at each new shape (SDXL batch 4 on an H200: 10–16 s per bucket, bench/new_bucket.py)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = cudnn_benchmark


# The input dims of each region that change with the aspect bucket: (argument index, dims).
# ResBlock._forward(x, emb, skip): x and skip are (B, C, H, W); BasicTransformerBlock._forward(x,
# context): x is (B, H·W, C). Batch, channels and the text length stay fixed.
SPATIAL_DIMS: dict[type, tuple[tuple[int, tuple[int, ...]], ...]] = {
    ResBlock: ((0, (2, 3)), (2, (2, 3))),
    BasicTransformerBlock: ((0, (1,)),),
}


class _SpatiallyDynamic:
    """A compiled region whose inputs' spatial dims are symbolic from its first compile on.

    With several buckets, `dynamic=None` alone compiles a static graph for the first bucket and a
    shape-generic one at the second (SDXL on an H200: 24 s more in the second step), and the next
    run, told by torch's automatic-dynamic profile, compiles the generic graphs at once: graphs
    the first run's compile cache does not hold. Marking the dims (`maybe_mark_dynamic`; marked
    dims get their own symbols, so a square first bucket does not tie H to W) makes every run
    compile the same generic graphs, once. Dynamo reads the marks when it compiles (~2 µs a call)."""

    def __init__(self, fn, dims: tuple[tuple[int, tuple[int, ...]], ...]):
        self.fn, self.dims = fn, dims

    def __call__(self, *args):
        return self.fn(*mark_dynamic(args, self.dims))


def mark_dynamic(args: tuple, dims: tuple[tuple[int, tuple[int, ...]], ...]) -> tuple:
    """`args`, with the dims `dims` names ((argument index, dims) pairs) marked dynamic for dynamo."""
    for i, d in dims:
        if i < len(args) and isinstance(args[i], torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(args[i], d)
    return args


def several_shapes(buckets) -> bool:
    """Whether a dataset's bucket sizes ((h, w) each) make more than one input shape."""
    return len({(int(h), int(w)) for h, w in buckets}) > 1


def compile_regions(
    unet: UNet, scope: str = "blocks", mode: str | None = None, backend: str = "inductor", dynamic: bool | None = False,
    spatial_dynamic: bool = False, precompiled=None,
) -> int:
    """Compile regions of `unet` in place; returns how many modules were wrapped.

    `dynamic=None` lets a second input shape (another aspect bucket) recompile once into a
    shape-generic graph instead of one set of graphs per bucket (past the recompile limit torch
    silently runs a region eagerly); `False` specialises on the one shape of a benchmark.
    `spatial_dynamic` (a dataset of several buckets): the regions' spatial dims are symbolic from
    the first compile (`_SpatiallyDynamic`), one generic graph per region. `precompiled` (a
    `precompile.Regions`): the regions run its saved or AOT-compiled variants instead, which a later
    process loads without tracing (`dynamic` is then None; `spatial_dynamic` the same)."""
    if scope not in SCOPES:
        raise ValueError(f"compile scope {scope!r} unknown; use one of {SCOPES}")
    if scope == "none":
        return 0
    regions = [m for m in unet.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
    # SDXL has 14 differently shaped ResBlocks; past torch's default of 8 graphs per function
    # the rest would run eagerly, silently.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(regions))
    if precompiled is not None:
        precompiled.spatial = SPATIAL_DIMS if spatial_dynamic else {}
        precompiled.backend, precompiled.mode = backend, mode
        return precompiled.install(regions)
    for m in regions:  # the block body: a checkpoint around it stays outside the graph
        m._forward = torch.compile(m._forward, backend=backend, mode=mode, dynamic=dynamic)
        if spatial_dynamic:
            m._forward = _SpatiallyDynamic(m._forward, next(d for c, d in SPATIAL_DIMS.items() if isinstance(m, c)))
    return len(regions)


def partitioner(fraction: float = 1.0, remat: bool = True):
    """Context manager for the settings of torch's partitioner (which activations a compiled
    region keeps for backward), read when a region compiles. `remat`: cheap elementwise results
    that a matmul reads in backward (the LayerNorm outputs the LoRA weight gradients need) are
    recomputed there rather than kept (torch keeps them by default): SDXL batch 4, compile + graph,
    H200: 1.9 GiB less for 1% less speed (docs/benchmarks.md); `train()` turns it off with
    `train.run.recomputes`. `fraction` < 1: keep about that share of the activations and
    recompute the rest (torch's activation_memory_budget)."""
    import torch._functorch.config  # not loaded by `import torch`: only once something compiles

    settings = {"ban_recompute_materialized_backward": not remat}
    if fraction < 1.0:
        settings["activation_memory_budget"] = fraction
    return torch._functorch.config.patch(settings)


def recompute_in_backward(unet: nn.Module, on: bool = True) -> int:
    """Compiled regions compute each GEGLU output and fused q/k/v weight again in backward
    instead of keeping them (`models.unet.GEGLU.recompute`, `CrossAttention.recompute`); returns
    how many GEGLU layers were switched."""
    n = 0
    for m in unet.modules():
        if isinstance(m, (GEGLU, CrossAttention)):
            m.recompute = on
            n += isinstance(m, GEGLU)
    return n


def fuse_qkv(unet: UNet, on: bool = True) -> int:
    """Compute every self-attention's q, k, v with one GEMM (LoRA included; names unchanged);
    returns how many attention layers were switched."""
    layers = [m for name, m in unet.named_modules() if isinstance(m, CrossAttention) and name.endswith("attn1")]
    for m in layers:
        m.fuse_qkv = on
    return len(layers)


def optimize_for_training(
    unet: UNet, compile: bool = True, scope: str = "blocks", channels_last: bool = False, mode: str | None = None,
    backend: str = "inductor", dynamic: bool | None = False, fused_qkv: bool = False, cudnn_benchmark: bool = True,
    recompute: bool = False,
) -> UNet:
    """Make `unet` fast for LoRA training on CUDA (in place) and return it. Regional compile
    measured +21% at batch 4 on an H100 (docs/benchmarks.md); the first step compiles (~50 s).
    `recompute`: `recompute_in_backward` (`train()` passes `train.run.recomputes(cfg.train)`)."""
    unet.train()
    fuse_qkv(unet, fused_qkv)
    recompute_in_backward(unet, recompute)
    if torch.cuda.is_available():
        set_fast_math(cudnn_benchmark)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        compile_regions(unet, scope=scope, mode=mode, backend=backend, dynamic=dynamic)
    return unet


def _warm_up(fn, args: list, kwargs: dict, warmup: int, prepare=None, rounds: int = 3) -> None:
    """Run `fn(*args, **kwargs)` `warmup` times (cuBLAS workspaces, compiled code, autotuning);
    `prepare()` after the first (`precompile.Regions.flush`: the regions it saw compile in
    parallel) and, while it returns True, one more run of what it prepared and `prepare()` again
    (a compiled block can hand its neighbour inputs of other strides than the eager one did), at
    most `rounds` times: what a capture records must not run eagerly."""
    for i in range(warmup):
        fn(*args, **kwargs)
        for _ in range(rounds if i == 0 and prepare is not None else 0):
            if not prepare():
                break
            fn(*args, **kwargs)


def _capture(fn, args: list, kwargs: dict, warmup: int, pool=None, prepare=None):
    """`_warm_up` on a side stream, then capture one call into a CUDA graph; returns (graph, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _warm_up(fn, args, kwargs, warmup, prepare)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(*args, **kwargs)
    return graph, out


def _signature(tensors) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.stride()) for t in tensors)


class _Replayed:
    """Replays `self.graphs[input signature]` = (static inputs, output, graph); `_capture`
    makes a missing one, `_check` vets the state before a replay."""

    graphs: dict[tuple, tuple[list[torch.Tensor], torch.Tensor, torch.cuda.CUDAGraph]]

    def _check(self) -> None:
        pass

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        key = _signature(tensors)
        if key not in self.graphs:
            self.graphs[key] = self._capture(tensors)
        else:
            self._check()
        static_in, loss, graph = self.graphs[key]
        for s, t in zip(static_in, tensors):
            s.copy_(t)
        graph.replay()
        return loss


class GraphedBackward(_Replayed):
    """Forward + backward of a training micro-step replayed from CUDA graphs; the optimizer
    stays outside (any optimizer, a changing LR, gradient clipping and the NaN guard in eager).

    `fn(*tensors) -> loss` runs forward and `backward()`; the gradients accumulate into the
    parameters' `.grad` tensors, which are created (zeros) before the first capture and must
    stay the same tensors: clear them with `optimizer.zero_grad(set_to_none=False)`. So
    gradient accumulation over micro-batches works as in eager. One graph per input signature
    (aspect bucket); all graphs share one memory pool, since they never run at once. The
    warm-up calls before a capture leave the gradients as they found them. Random ops inside
    `fn` (LoRA dropout) draw from the CUDA generator, as torch.cuda.graph arranges.
    """

    def __init__(self, fn, params: list[torch.Tensor], warmup: int = 2, prepare=None):
        self.fn, self.params, self.warmup, self.prepare = fn, list(params), warmup, prepare
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def _capture(self, tensors: tuple[torch.Tensor, ...]):
        static_in = [t.clone() for t in tensors]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        saved = [p.grad.clone() for p in self.params]
        graph, loss = _capture(self.fn, static_in, {}, self.warmup, self.pool, self.prepare)
        with torch.no_grad():  # undo the warm-ups' accumulation (the capture itself ran nothing)
            for p, s in zip(self.params, saved):
                p.grad.copy_(s)
        return static_in, loss, graph

    def _check(self) -> None:
        if any(p.grad is None for p in self.params):
            raise RuntimeError("GraphedBackward: a gradient was set to None; clear them with zero_grad(set_to_none=False)")


class GraphedForward:
    """Inference calls of `fn` replayed from CUDA graphs, one per input signature.

    For the sampling loop: 30 UNet calls with the same shapes cost one capture and 30
    replays instead of 30 × ~2,000 kernel launches from Python. Tensor arguments
    (positional or keyword) are copied into static buffers; the output is cloned, so the
    caller may keep it across calls. Non-tensor arguments must not change between calls
    with the same tensor signature.
    """

    def __init__(self, fn, warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple[list[torch.Tensor], dict, torch.Tensor, torch.cuda.CUDAGraph]] = {}

    @staticmethod
    def _key(args, kwargs) -> tuple:
        def sig(v):
            return (tuple(v.shape), v.dtype, v.stride(), v.device) if torch.is_tensor(v) else repr(v)

        return tuple(sig(a) for a in args) + tuple((k, sig(v)) for k, v in sorted(kwargs.items()))

    @torch.no_grad()
    def __call__(self, *args, **kwargs) -> torch.Tensor:
        key = self._key(args, kwargs)
        if key not in self.graphs:
            static_args = [a.clone() if torch.is_tensor(a) else a for a in args]
            static_kwargs = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            graph, out = _capture(self.fn, static_args, static_kwargs, self.warmup)
            self.graphs[key] = (static_args, static_kwargs, out, graph)
        static_args, static_kwargs, out, graph = self.graphs[key]
        for s, a in zip(static_args, args):
            if torch.is_tensor(s):
                s.copy_(a)
        for k, v in kwargs.items():
            if torch.is_tensor(v):
                static_kwargs[k].copy_(v)
        graph.replay()
        return out.clone()


# ---------------------------------------------------------------- the VAE (inference)
VAE_PARTS = ("encoder", "decoder")
# Latent caching compiles the encoder (train.compile, CUDA) only for at least this many images:
# one compile took 19-21 s on an H100 (bench/results/vae_h100.json, first_call_s) and there are
# two (the first bucket's, then a shape-generic one); at batch 1 it saves 29 ms an image (50 → 21
# ms), next to a similar time loading the image, so a smaller dataset is cached sooner eagerly.
VAE_COMPILE_MIN_IMAGES = 2000


def optimize_vae(
    vae: nn.Module, compile: bool = True, channels_last: bool = True, dynamic: bool | None = None,
    parts: tuple[str, ...] = VAE_PARTS, mode: str | None = None, backend: str = "inductor",
) -> nn.Module:
    """Make a `models.vae.AutoencoderKL` fast for inference (in place) and return it.

    `vae.encoder` and `vae.decoder` (`parts`) are each compiled whole with `nn.Module.compile`, so
    `state_dict()` keeps the checkpoint's names. Whole, not block by block: the VAE's blocks differ
    in width and resolution, so regions would share no graph, and each ResnetBlock instance would be
    another cache entry of the one `ResnetBlock.forward` code object, which dynamo stops compiling
    after 8 (the rest then runs eagerly, silently); one graph per stack also lets inductor fuse every
    GroupNorm + SiLU and residual add into a few passes over the 1024² × 128 activations. The
    `quant_conv` / `post_quant_conv` 1×1 convs (8 channels) stay eager.

    `channels_last`: NHWC conv weights in `parts`, so cuDNN runs its NHWC kernels without the
    NCHW↔NHWC transposes around each conv (conv outputs follow the weights' layout, so the input
    needs no conversion). Only worth it compiled: eager NHWC GroupNorm is slower than NCHW (encode
    1024², H100: 13.4 vs 20.1 img/s, bench/results/vae_sample_h100.json).

    `dynamic=None`: the first image shape compiles a static graph and a second shape (another
    aspect bucket) one shape-generic graph for the rest, instead of one graph per bucket; `False`
    specialises on each shape (benchmarks at one shape). Values equal the eager VAE's up to the
    fused kernels' rounding.
    """
    unknown = set(parts) - set(VAE_PARTS)
    if unknown:
        raise ValueError(f"optimize_vae: parts {sorted(unknown)} unknown; use a subset of {VAE_PARTS}")
    vae.eval()
    for name in parts:
        part = getattr(vae, name)
        if channels_last:
            part.to(memory_format=torch.channels_last)
        if compile:
            part.compile(backend=backend, mode=mode, dynamic=dynamic)
    return vae
