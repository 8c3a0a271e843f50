"""Precompiled regions: each UNet block graph saved whole and loaded without tracing.

`torch.compile` on a block traces its Python with dynamo at every process start (SDXL on an
H200: 8.7 s of a warm run's first step), even when inductor and AOTAutograd answer from the
compile cache. torch's AOT precompile (`torch.compile(fn, fullgraph=True).aot_compile(example)`)
captures one call's graph, guards, AOTAutograd forward/backward and inductor code as an object
that serialises (`AOTCompiledFunction`); a later process deserialises it and calls it with no
tracing at all. Here each region body (`ResBlock._forward`, `BasicTransformerBlock._forward`) is
compiled as the unbound function `type(block)._forward(block, *args)`: the block is an input
(parameters too, as torch inlines built-in modules), so one compiled variant serves every block
of the same structure.

`Regions` keeps, per group of alike blocks (type, parameter and buffer metadata), the variants
compiled so far, and dispatches each call to the first whose guards pass (shapes, strides,
dtypes, requires_grad, the module's attributes; a memo keyed by the arguments' metadata skips the
check on repeat calls). A call that no variant accepts compiles one more: with `spatial` the
inputs' spatial dims are marked dynamic first (several buckets share one graph), else the
variant is specialised on the shape. A block that does not compile as one graph (a graph break,
a guard torch cannot serialise) falls back to plain `torch.compile` for its group, with one
log line. `dumps()` / `loads()` carry the variants across processes (`compile_cache.py` keeps
them in the run's cache file; each carries its Triton kernels).

With `workers` > 1 (`train.compile_workers`; by default on CUDA) a call no variant accepts runs
eagerly and is recorded; `flush()` (after the step, or between a CUDA-graph warm-up and its
capture) compiles the recorded calls in that many spawned processes at once, each from a meta
copy of the block and arguments of the recorded shapes and strides, under this process's global
settings (TF32 and the rest that dynamo's guards check), and loads the results.
"""

from __future__ import annotations

import copy
import importlib
import io
import multiprocessing
import os
import pickle
import sys
import types
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import torch
from torch import nn

from eridiffusion.speed import mark_dynamic

FORMAT = 1
Log = Callable[[str], None]


def available() -> bool:
    """Whether this torch has AOT precompile (`torch._dynamo.aot_compile`, torch ≥ 2.10)."""
    try:
        from torch._dynamo.aot_compile import AOTCompiledFunction  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch._dynamo.config, "enable_aot_compile")


MAX_WORKERS = 8  # SDXL has 14-15 distinct block graphs: two rounds of 8 (H200: 28 s, docs/benchmarks.md)
WORKER_GIB = 2.0  # GPU memory a worker process may take (CUDA context, one block, autotuning)
WORKER_HOST_GIB = 2.0  # and host memory (torch, inductor, its compile pool; 0.4 GiB measured on the CPU)


def workers_for(setting: int, device: torch.device) -> int:
    """`train.compile_workers` as the number of processes `Regions` compiles in (1: this one, as
    calls come). 0 (auto): on CUDA half the CPU cores this process's share of the machine has
    (torchrun's LOCAL_WORLD_SIZE ranks share it), at most MAX_WORKERS; elsewhere 1. `flush`
    lowers it further to what the host's available and the GPU's free memory allow (`_fit`)."""
    if setting > 0:
        return setting
    if device.type != "cuda":
        return 1
    share = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(MAX_WORKERS, share // 2))


def group_of(module: nn.Module) -> str:
    """What a block's compiled graph depends on besides its arguments: its class and its
    parameters' and buffers' names, shapes, dtypes, devices and requires_grad."""
    cls = type(module)
    tensors = [(n, tuple(t.shape), str(t.dtype), t.device.type, t.requires_grad)
               for n, t in [*module.named_parameters(), *module.named_buffers()]]  # fmt: skip
    return repr((f"{cls.__module__}.{cls.__qualname__}", tensors))


def _signature(module: nn.Module, args: tuple) -> tuple:
    """The call's metadata a guard looks at, as a memo key (not a guard: a miss re-checks)."""
    meta = tuple((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)  # fmt: skip
    return meta, module.training, torch.is_grad_enabled()


class Regions:
    """The compiled variants of a UNet's regions, by group; `install` routes the blocks' bodies here."""

    def __init__(self, spatial: dict[type, tuple] | None = None, backend: str = "inductor", mode: str | None = None,
                 log: Log = print, workers: int = 1):  # fmt: skip
        self.spatial, self.backend, self.mode, self.log, self.workers = spatial or {}, backend, mode, log, workers
        self.pending: dict[tuple, tuple[nn.Module, tuple]] = {}  # workers > 1: calls recorded for `flush`
        self.variants: dict[str, list] = {}  # group → [AOTCompiledFunction]
        self.blobs: dict[str, list[bytes]] = {}  # group → their serialised bytes, in the same order
        self.homes: dict[str, str] = {}  # group → the Python module of its block class (the code's globals)
        self.fallback: dict[str, Callable] = {}  # group → torch.compile'd function (no precompile)
        self.memo: dict[tuple, object] = {}
        self.compiled = 0  # variants compiled (not loaded) by this process
        self.pool: ProcessPoolExecutor | None = None  # workers > 1: from start_workers or flush to flush's end
        self.pool_size = 0

    def install(self, regions: list[nn.Module]) -> int:
        for m in regions:
            m._forward = _Region(self, m, group_of(m))
        return len(regions)

    def call(self, module: nn.Module, group: str, args: tuple):
        if group in self.fallback:
            return self.fallback[group](module, *self._marked(module, args))
        signature = _signature(module, args)
        key = (id(module), signature)  # guards are checked once per block and call shape
        fn = self.memo.get(key)
        if fn is None:
            fn = self._accepting(module, group, args)
            if fn is None and self.workers > 1:  # recorded for flush(); meanwhile eager, as torch would
                self.pending.setdefault((group, signature), (module, args))
                return type(module)._forward(module, *args)
            fn = fn or self._compile(module, group, args)
            if fn is None:
                return self.fallback[group](module, *args)  # marked by _compile
            self.memo[key] = fn
        return fn.fn(module, *args)

    def _accepting(self, module: nn.Module, group: str, args: tuple):
        """The group's first variant whose guards pass for this call, or None."""
        return next((v for v in self.variants.get(group, ()) if v.guard_check(module, *args)), None)

    def _compile(self, module: nn.Module, group: str, args: tuple):
        """AOT-compile `type(module)._forward` at these arguments; None (and a fallback) when it cannot."""
        from torch._dynamo.aot_compile import AOTCompiledFunction

        self._marked(module, args)
        fn = type(module)._forward
        # torch (2.11, 2.13) pickles each parameter's .grad into the guard state as a placeholder
        # that fails to load ("assigned grad expected to be a Tensor"): compile with none
        grads = {p: p.grad for p in module.parameters() if p.grad is not None}
        try:  # torch 2.11 has it off by default; torch.compile reads it when it wraps `fn`
            for p in grads:
                p.grad = None
            with torch._dynamo.config.patch(enable_aot_compile=True):
                compiled = torch.compile(fn, fullgraph=True, backend=self.backend, mode=self.mode).aot_compile(
                    ((module, *args), {})
                )
            blob = AOTCompiledFunction.serialize(compiled).serialized_data
        except Exception as e:  # a graph break or an unserialisable guard: plain torch.compile for the group
            self.log(f"compile: {type(module).__name__} blocks compile without precompile ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:160] if str(e) else ''}); their tracing is repeated in every run")  # fmt: skip
            self.fallback[group] = torch.compile(fn, backend=self.backend, mode=self.mode, dynamic=None)
            return None
        finally:
            for p, g in grads.items():
                p.grad = g
        self._keep(group, type(module).__module__, compiled, blob)
        self.compiled += 1
        return compiled

    def start_workers(self) -> None:
        """Start the worker processes now (they import torch and inductor while this one loads the
        model and runs the first step); `flush` uses them, then stops them."""
        n = _fit(self.workers)
        if n > 1 and self.pool is None:
            self.pool, self.pool_size = _pool(n), n
            _submit(self.pool, _ready, range(n))

    def flush(self) -> bool:
        """Compile the calls recorded since the last flush (`workers` > 1), in up to `workers`
        processes at once (fewer where free host or GPU memory holds fewer), and add their variants;
        True when there were any. A call no worker's variant accepts compiles in this process."""
        if not self.pending:
            return False
        pending, self.pending = list(self.pending.items()), {}
        room = _fit(self.workers, next(pending[0][1][0].parameters()).device)
        n = min(room, len(pending))
        if n < 2:  # one call, or no room for worker processes: compile here
            if room < 2 <= self.workers:
                self.log(f"compile: {len(pending)} block graphs in this process (too little free memory for more)")
            self._stop_workers()
        else:
            jobs = [_job(module, group, args, signature[2], self) for (group, signature), (module, args) in pending]
            self.log(f"compile: {len(jobs)} block graphs in {n} processes")
            if self.pool is None or self.pool_size > n:
                self._stop_workers()
                self.pool, self.pool_size = _pool(n), n
            try:
                for job, future in zip(jobs, _submit(self.pool, _compile_job, jobs)):
                    try:
                        blob = future.result()
                    except Exception as e:  # a worker that died, or torch's error: this call compiles here
                        self.log(f"compile: a {job['name']} graph failed in its process ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160] if str(e) else ''}); it compiles in this one")  # fmt: skip
                        continue
                    if blob is not None:
                        self._add(job["group"], job["home"], blob)
                        self.compiled += 1
            finally:
                self._stop_workers()
        self.memo.clear()
        if (rejected := self._compile_here(pending)) and n >= 2:
            self.log(f"compile: {rejected} block graphs from the worker processes did not accept their calls; "
                     "compiled them in this one")  # fmt: skip
        return True

    def _stop_workers(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def _compile_here(self, pending: list) -> int:
        """Compile here each recorded call that no variant accepts (its worker failed, or compiled
        under other global state: it would otherwise run eagerly and go out again every step)."""
        n = 0
        for (group, _), (module, args) in pending:
            if group not in self.fallback and self._accepting(module, group, args) is None:
                self._compile(module, group, args)
                n += 1
        return n

    def _add(self, group: str, home: str, blob: bytes) -> None:
        from torch._dynamo.aot_compile import AOTCompiledFunction

        fn = AOTCompiledFunction.deserialize(blob, f_globals=vars(importlib.import_module(home)))
        self._keep(group, home, fn, blob)

    def _keep(self, group: str, home: str, fn, blob: bytes) -> None:
        self.variants.setdefault(group, []).append(fn)
        self.blobs.setdefault(group, []).append(blob)
        self.homes[group] = home

    def dims(self, module: nn.Module) -> tuple:
        """The (argument index, spatial dims) of `module`'s calls marked dynamic (`spatial`)."""
        return next((d for c, d in self.spatial.items() if isinstance(module, c)), ())

    def _marked(self, module: nn.Module, args: tuple) -> tuple:
        """`args`, their spatial dims marked dynamic (`spatial`: several buckets share one graph)."""
        return mark_dynamic(args, self.dims(module))

    def dumps(self) -> bytes:
        """Every variant, serialised (loaded ones and those compiled here)."""
        return pickle.dumps({"format": FORMAT, "torch": torch.__version__, "groups": self.blobs, "homes": self.homes})

    def loads(self, data: bytes) -> int:
        """Add the variants of `dumps()` bytes; returns how many. Raises ValueError on another
        format or torch, and whatever torch raises on a variant it cannot load."""
        state = pickle.load(io.BytesIO(data))
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("torch") != torch.__version__:
            raise ValueError("precompiled regions of another format or torch version")
        n = 0
        for group, blobs in state["groups"].items():
            for blob in blobs:
                self._add(group, state["homes"][group], blob)
                n += 1
        self.memo.clear()
        return n


class _Region:
    """A block's `_forward`, routed to its group's compiled variants."""

    def __init__(self, regions: Regions, module: nn.Module, group: str):
        self.regions, self.module, self.group = regions, module, group

    def __call__(self, *args):
        return self.regions.call(self.module, self.group, args)

    def __reduce__(self):
        """Pickled as a stub: torch pickles the block (with this attribute) into each variant's
        guard state, where the variants compiled so far must not follow."""
        return _Stub, (self.group,)


class _Stub:
    """What a `_Region` pickles to: its group's name, no route (nothing calls a copied block's body
    through it: the compiled code calls `type(block)._forward`)."""

    def __init__(self, group: str):
        self.group = group


# ---------------------------------------------------------------- compiling in other processes
# torch._functorch settings a block's graph depends on (speed.partitioner,
# compile_cache.allow_custom_autograd_functions): copied into the workers
FUNCTORCH_SETTINGS = ("activation_memory_budget", "ban_recompute_materialized_backward",
                      "autograd_cache_allow_custom_autograd_functions")


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are meta tensors (no data copied; `.grad` dropped)."""
    memo = {}
    for t in [*module.parameters(), *module.buffers()]:
        m = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(module, memo)


def _fit(n: int, device: torch.device | None = None) -> int:
    """`n` worker processes, fewer where the host's available memory (WORKER_HOST_GIB each) or the
    GPU's free memory (`device`, WORKER_GIB each) holds fewer."""
    if n < 2:
        return n
    if (available := _host_available_gib()) is not None:
        n = min(n, int(available // WORKER_HOST_GIB))
    if device is not None and device.type == "cuda":
        n = min(n, int(torch.cuda.mem_get_info(device)[0] / 2**30 // WORKER_GIB))
    return n


def _host_available_gib() -> float | None:
    """MemAvailable of /proc/meminfo in GiB (None where there is none: not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return kib / 2**20


def _spec(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), a.stride(), a.dtype, str(a.device), a.requires_grad)
    return ("value", a)


def _pool(n: int) -> ProcessPoolExecutor:
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    threads = max(1, (os.cpu_count() or 1) // n)  # inductor's own compile pool, per process
    return ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(threads,))


def _submit(pool: ProcessPoolExecutor, fn, items) -> list:
    """`pool.submit(fn, item)` for each item. With spawn, the processes start inside `submit` and
    run the parent's `__main__` script first (as `__mp_main__`): a user's training script without an
    `if __name__ == "__main__"` guard would train again in each. They see a bare `__main__` instead."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        return [pool.submit(fn, item) for item in items]
    finally:
        sys.modules["__main__"] = main


def _job(module: nn.Module, group: str, args: tuple, grad: bool, regions: Regions) -> dict:
    """What a worker needs to compile `module`'s call at `args` as this process would: the block
    on the meta device, the arguments' metadata, and the settings a graph depends on."""
    return {"module": meta_copy(module), "device": str(next(module.parameters()).device), "group": group,
            "home": type(module).__module__, "name": type(module).__name__, "args": [_spec(a) for a in args],
            "dims": regions.dims(module), "backend": regions.backend, "mode": regions.mode, "state": global_state(), "grad": grad,
            "functorch": {k: getattr(torch._functorch.config, k) for k in FUNCTORCH_SETTINGS
                          if hasattr(torch._functorch.config, k)}}  # fmt: skip


def global_state() -> dict:
    """The process-wide settings a variant's guards check (dynamo's GlobalStateGuard: TF32 and
    reduced-precision matmuls, deterministic algorithms, threads, default dtype) and cuDNN's,
    which decide the kernels: a worker compiles under the training process's (`speed.set_fast_math`)."""
    m = torch.backends.cuda.matmul
    return {"matmul_tf32": m.allow_tf32, "fp16_reduce": m.allow_fp16_reduced_precision_reduction,
            "bf16_reduce": m.allow_bf16_reduced_precision_reduction, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(), "dtype": torch.get_default_dtype()}  # fmt: skip


def set_global_state(state: dict) -> None:
    m = torch.backends.cuda.matmul
    m.allow_tf32, torch.backends.cudnn.allow_tf32 = state["matmul_tf32"], state["cudnn_tf32"]
    m.allow_fp16_reduced_precision_reduction = state["fp16_reduce"]
    m.allow_bf16_reduced_precision_reduction = state["bf16_reduce"]
    torch.backends.cudnn.benchmark = state["cudnn_benchmark"]
    torch.set_num_threads(state["threads"])
    torch.use_deterministic_algorithms(state["deterministic"], warn_only=state["warn_only"])
    torch.set_default_dtype(state["dtype"])


def _init_worker(threads: int) -> None:
    import torch._dynamo.aot_compile  # imported while the training process loads the model
    import torch._inductor.compile_fx

    torch._inductor.config.compile_threads = threads


def _ready(_) -> None:
    """A no-op job: `start_workers` submits one per process so that each starts (and imports) now."""


def _compile_job(job: dict) -> bytes | None:
    """In a worker: materialise the block (values do not matter), make arguments of the recorded
    shapes, strides and dtypes, AOT-compile; the variant's bytes (None: no precompile for it)."""
    set_global_state(job["state"])
    device = torch.device(job["device"])
    module = job["module"].to_empty(device=device)
    args = []
    for kind, *rest in job["args"]:
        if kind == "value":
            args.append(rest[0])
            continue
        shape, stride, dtype, dev, grad = rest
        t = torch.empty_strided(shape, stride, dtype=dtype, device=dev)
        t.copy_(torch.randn(shape, device=dev).to(dtype)) if dtype.is_floating_point else t.zero_()
        args.append(t.requires_grad_(grad))
    regions = Regions(spatial={type(module): job["dims"]}, backend=job["backend"], mode=job["mode"], log=lambda s: None)
    with torch._functorch.config.patch(job["functorch"]), torch.set_grad_enabled(job["grad"]):
        fn = regions._compile(module, job["group"], tuple(args))
        if fn is None:
            return None
        _run_once(fn, module, args)
    return regions.blobs[job["group"]][0]


def _run_once(fn, module: nn.Module, args: list) -> None:
    """One forward and backward of a new variant: inductor autotunes its kernels at their first
    launch and keeps the choices in this machine's cache folder, where the training process, which
    loads the same kernels, finds them (SDXL on an H200: 10 s of its first step otherwise). Only an
    optimisation: if it fails (out of memory, say) the training process times the kernels itself."""
    try:
        out = fn.fn(module, *args)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    except Exception:  # noqa: BLE001  (the compiled variant is what the job returns)
        pass
