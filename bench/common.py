"""Shared pieces of the end-to-end benchmarks (bench/e2e.py, bench/vae_sample.py).

Random weights at the real shapes (small-std normal init, so bf16/fp16 activations stay
finite through 30 sampling steps), timing (CUDA events on the GPU, perf_counter on the
CPU), peak memory, page-cache control for cold reads, and the JSON rows / table output.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from eridiffusion import checkpoint  # noqa: E402

INIT_STD = 0.02  # of every weight matrix / conv kernel; biases and norms keep PyTorch's init


# ---------------------------------------------------------------- environment and output
def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    return env


def emit(row: dict, rows: list[dict]) -> dict:
    """Keep `row` and print it as one JSON line (flushed, so a killed run still shows it)."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    return row


def write_json(path: str | os.PathLike | None, env: dict, rows: list[dict]) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")


def fmt(v, width: int, digits: int = 3) -> str:
    if isinstance(v, bool) or v is None:
        return f"{'-' if v is None else str(v):>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.{digits}f}"
    return f"{str(v):>{width}}"


def print_table(rows: list[dict], columns: list[tuple[str, int]]) -> None:
    """A fixed-width table of `columns` (key, width); absent values show as '-'."""
    print(" ".join(f"{k:>{w}}" for k, w in columns))
    for r in rows:
        print(" ".join(fmt(r.get(k), w) for k, w in columns))


# ---------------------------------------------------------------- devices, timing, memory
def resolve_device(name: str, tiny: bool) -> torch.device:
    if name == "auto":
        name = "cpu" if tiny else "cuda"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device here; run with --tiny --device cpu for the CPU smoke test")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since `reset_peak`; on the CPU the process's max RSS (all run)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_calls(fn: Callable[[], object], device: torch.device, iters: int) -> list[float]:
    """Seconds of each of `iters` calls: CUDA events around each call on the GPU, wall clock on the CPU."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------- random weights
@torch.no_grad()
def random_init_(module: nn.Module, seed: int = 0, std: float = INIT_STD) -> nn.Module:
    """Every ≥2-D parameter ~ N(0, std²), drawn on its own device (fast on the GPU)."""
    for p in module.parameters():
        if p.ndim >= 2 and p.is_floating_point():
            g = torch.Generator(p.device).manual_seed(seed)
            p.normal_(0.0, std, generator=g)
            seed += 1
    return module


def random_part(family: checkpoint.Family, part: str, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> nn.Module:  # fmt: skip
    """One part of `family` with random weights, built on `device` in fp32 then cast; eval, frozen."""
    model = random_init_(family.build(part, device), seed=seed)
    return model.to(dtype).eval().requires_grad_(False)


def random_components(family: checkpoint.Family, device: torch.device, dtype: torch.dtype,
                      seed: int = 0) -> checkpoint.Components:  # fmt: skip
    out = checkpoint.Components(family)
    for i, part in enumerate(family.parts):
        setattr(out, part, random_part(family, part, device, dtype, seed=seed + 1000 * i))
        free(device)  # the fp32 build of the previous part
    return out


# ---------------------------------------------------------------- page cache
def drop_page_cache(path: str | os.PathLike) -> bool:
    """Ask the kernel to forget the file's cached pages (posix_fadvise DONTNEED); False if unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def resident_fraction(path: str | os.PathLike) -> float | None:
    """Share of the file's pages in the page cache (mincore(2) on a read-only mapping); None if unknown."""
    if not sys.platform.startswith("linux"):
        return None
    size = os.path.getsize(path)
    if size == 0:
        return None
    try:
        import numpy as np

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        page = os.sysconf("SC_PAGE_SIZE")
        pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        finally:
            os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return float((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) / pages
        finally:
            libc.munmap(addr, size)
    except (OSError, AttributeError):
        return None


def cache_state(fraction: float | None) -> str:
    if fraction is None:
        return "unknown"
    return "cold" if fraction < 0.05 else "warm" if fraction > 0.95 else f"partial ({fraction:.0%})"


def filesystem(path: str | os.PathLike) -> str | None:
    """Type of the filesystem holding `path` (longest matching mount point in /proc/mounts)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    real, best = os.path.realpath(path), ("", None)
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")):
            if len(parts[1]) > len(best[0]):
                best = (parts[1], parts[2])
    return best[1]
