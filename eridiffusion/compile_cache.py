"""Compiled code kept across runs: one file beside the latent cache.

With `train.compile` the first step compiles every distinct UNet block graph (forward and
backward; SDXL: 15), minutes on a GPU. Two things can be kept:

- the blocks' precompiled graphs (`cache.precompile`, default; `precompile.Regions`): each one
  whole (dynamo's trace and guards, AOTAutograd's forward and backward, inductor's code with its
  Triton kernels), so the next process neither traces nor compiles (SDXL, H200: 11.7 s to the
  first step instead of 25.6 s);
- torch's mega-cache (`torch.compiler.save_cache_artifacts()`: inductor's FX-graph entries with
  their kernels, AOTAutograd entries, autotuning results), which `load_cache_artifacts` puts back
  into inductor's on-disk caches, so dynamo still traces but AOTAutograd and inductor answer from
  the cache. Written only when some block has no precompiled graph (precompile off, FSDP, a torch
  without it, a block that is not one graph): a precompiled graph carries its own kernels.

The file is `<cache dir>/compile/<family>-<digest>.torchcache`, the digest of `graph_key`: what
changes the graphs (torch / Python / GPU, family, dtype, compile options, checkpointing, the
adapters, batch size and bucket shapes, precompile). It is a header line (JSON: the key, the
payload's length and sha256, the mega-cache part's length) and the payload (mega-cache bytes, then
the precompiled graphs). A missing file compiles cold; an unreadable, damaged or foreign one is a
warning line and a cold compile, never an error. Saved (atomically) after a step that compiled
something, so after the first step and after a new bucket's first step; a run that only loaded
writes nothing. Rank 0 writes; every rank loads.

AOTAutograd's cache must accept graphs holding an `autograd.Function` (`fp8_matmul`'s linear,
`ops.lora_linear` with `ops.COMPILED = "function"`; off by default, so each run traced and
partitioned every such block again). A run and the next must compile the same graphs: with
several buckets the regions are shape-generic in H and W from the first compile
(`speed.compile_regions(spatial_dynamic=True)`), in every run, whichever the buckets (so they
share one file: each cached graph's guards are checked when it is looked up, and a graph whose
guards fail is compiled and added). No
`torch.compiler.config.job_id` is set: its automatic-dynamic profile made the second run
compile graphs the first had not (H200, SDXL: 2 inductor and 1 AOTAutograd miss, 11 s of codegen).

Inductor's own cache folder (`TORCHINDUCTOR_CACHE_DIR`, default `/tmp/torchinductor_<user>`) is
left where the user has it: the file refills it on a fresh machine, and a folder that outlived
the last run only adds hits.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from eridiffusion import precompile
from eridiffusion.io import write_bytes
from eridiffusion.speed import several_shapes

MAGIC = b"eridiffusion-compile-cache 2\n"
FAMILY_MAGIC = b"eridiffusion-compile-cache "
SUFFIX = ".torchcache"
Log = Callable[[str], None]


def device_key(device: torch.device) -> dict:
    """The compiler's target: GPU name and compute capability (CUDA), or the CPU's architecture."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
                "cuda": torch.version.cuda}  # fmt: skip
    return {"device": device.type, "machine": platform.machine()}


def graph_key(cfg, family: str, device: torch.device, buckets, compile_options: dict | None = None) -> dict:
    """Everything a compiled UNet block graph depends on (a `config.TrainConfig` run on `device`;
    `buckets`: the dataset's (h, w) pixel sizes). Equal keys, equal graphs. One bucket compiles
    graphs for its shape; several compile graphs generic in height and width, which serve any set
    of several buckets, so the key holds the bucket itself or only that there are several: a
    second dataset with other buckets starts from the first one's file."""
    t, lora, several = cfg.train, cfg.lora, several_shapes(buckets)
    return {
        "torch": torch.__version__, "python": list(sys.version_info[:2]), **device_key(device),
        "family": family, "dtype": cfg.model.dtype, "fp8_matmul": getattr(t, "fp8_matmul", False),
        "compile": {"scope": "blocks", "dynamic": None, "mode": None, "fused_qkv": True,
                    "spatial_dynamic": several, **(compile_options or {})},
        "memory_budget": t.memory_budget, "keep_activations": t.keep_activations,
        "gradient_checkpointing": t.gradient_checkpointing, "mode": t.mode,
        "lora": None if t.mode != "lora" else {"type": lora.type, "rank": lora.rank, "conv_rank": lora.conv_rank,
                                               "dropout": lora.dropout, "targets": list(lora.unet_targets),
                                               "dora": lora.dora, "factor": lora.factor,
                                               "decompose_both": lora.decompose_both, "dtype": t.lora_dtype},
        "batch_size": t.batch_size, "max_tokens": cfg.data.max_tokens,
        "buckets": "several" if several else sorted([int(h), int(w)] for h, w in set(buckets)),
    }  # fmt: skip


def cache_path(folder: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / "compile" / f"{key['family']}-{digest}{SUFFIX}"


def allow_custom_autograd_functions() -> None:
    """Let AOTAutograd cache graphs holding an `autograd.Function` (`fp8_matmul`'s linear in every
    transformer block with `train.fp8_matmul`): off by default in torch, and then such a block
    bypasses that cache and is traced and partitioned again in each run. The function's forward
    and backward are traced into the graph, so the cache key covers them."""
    cfg = torch._functorch.config
    if hasattr(cfg, "autograd_cache_allow_custom_autograd_functions"):
        cfg.autograd_cache_allow_custom_autograd_functions = True


def _serialize() -> tuple[bytes, object] | None:
    """`torch.compiler.save_cache_artifacts()` of every artifact this process recorded, as one
    chunk per kind. Called twice, torch appends a second chunk per kind, and its loader (a dict of
    the chunks) keeps only the last one, dropping the first step's graphs; so the chunks are
    rebuilt from the recorded artifacts first (torch internals: skipped if they moved)."""
    try:
        from torch.compiler._cache import CacheArtifactManager as m

        seen = list(m._seen_artifacts)
        m._serializer.clear()
        m._cache_info.clear()
        m._new_cache_artifacts.clear()
        for a in seen:
            m._new_cache_artifacts[a.type()].append(a)
    except (ImportError, AttributeError):
        pass
    return torch.compiler.save_cache_artifacts()


def _misses() -> int:
    """Compiles this process did not find in a cache (each one adds artifacts worth saving)."""
    return counters["inductor"]["fxgraph_cache_miss"] + counters["aot_autograd"]["autograd_cache_miss"]


class CompileCache:
    """The cache file of one key: `load()` before the first compiled call, `after_step()` after
    each optimizer step (saves when something compiled since the last save)."""

    def __init__(self, path: str | Path, key: dict, log: Log = print, write: bool = True,
                 regions: precompile.Regions | None = None):  # fmt: skip
        self.path, self.key, self.log, self.write, self.regions = Path(path), key, log, write, regions
        self.saved_misses = _misses()  # compiles before this point (the VAE's) are not ours to save
        self.saved_variants = 0
        self.loaded = False

    @classmethod
    def for_run(cls, cfg, family: str, device: torch.device, buckets, log: Log = print, write: bool = True):
        """The run's cache, loaded; None without `train.compile` or with `cache.compile` off. With
        `cache.precompile` (and a torch that has it; not with FSDP) it carries the regions'
        precompiled graphs too: `regions`, for `speed.compile_regions(precompiled=...)`."""
        if not (cfg.train.compile and getattr(cfg.cache, "compile", True)):
            return None
        allow_custom_autograd_functions()
        key = graph_key(cfg, family, device, buckets)
        use = getattr(cfg.cache, "precompile", True) and not cfg.train.fsdp and precompile.available()
        key["precompile"] = use
        workers = precompile.workers_for(cfg.train.compile_workers, device)
        cache = cls(cache_path(cfg.cache_dir, key), key, log, write,
                    precompile.Regions(log=log, workers=workers) if use else None)  # fmt: skip
        if not cache.load() and cache.regions is not None:  # cold: the workers start while the model loads
            cache.regions.start_workers()
        return cache

    def _warn(self, what: str) -> None:
        self.log(f"warning: compile cache {self.path}: {what}; compiling from scratch (the file is rewritten)")

    def load(self) -> bool:
        """Put the file's artifacts into torch's caches; False (after a warning, unless there is
        no file) when nothing was loaded."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            self.log(f"compile cache: none yet for this configuration, the first steps compile ({self.path})")
            return False
        except OSError as e:
            self._warn(f"unreadable ({e.strerror or e})")
            return False
        try:
            payload = self._payload(data)
        except ValueError as e:
            self._warn(str(e))
            return False
        artifacts, regions = payload
        loaded = []
        if artifacts:
            try:
                info = torch.compiler.load_cache_artifacts(artifacts)
            except Exception as e:  # torch's own format or version check
                self._warn(f"torch could not load it ({type(e).__name__}: {e})")
                return False
            if info is None:
                self._warn("torch could not read its artifacts")
                return False
            loaded.append(f"{len(info.inductor_artifacts)} inductor and {len(info.aot_autograd_artifacts)} autograd graphs")
        self.loaded = True
        if self.regions is not None and regions:
            try:  # after the artifacts: a fallback block's kernels come from inductor's cache
                loaded.append(f"{self.regions.loads(regions)} precompiled block graphs")
            except Exception as e:
                self.log(f"warning: compile cache {self.path}: its precompiled block graphs did not load "
                         f"({type(e).__name__}: {str(e)[:200]}); the blocks are traced again")  # fmt: skip
        self.log(f"compile cache: loaded {' and '.join(loaded) or 'nothing'} ({len(data) / 2**20:.1f} MiB) "
                 f"from {self.path}")  # fmt: skip
        return True

    def _payload(self, data: bytes) -> tuple[bytes, bytes]:
        """(inductor's artifact bytes, the precompiled regions' bytes) after checking the header;
        ValueError (one line) when they do not fit."""
        if not data.startswith(MAGIC):
            raise ValueError("written by another eridiffusion version" if data.startswith(FAMILY_MAGIC)
                             else "not a compile-cache file")  # fmt: skip
        end = data.find(b"\n", len(MAGIC))
        try:
            header = json.loads(data[len(MAGIC) : end])
        except (ValueError, UnicodeDecodeError):
            raise ValueError("damaged header") from None
        payload = data[end + 1 :]
        if not isinstance(header, dict) or header.get("size") != len(payload):
            raise ValueError("cut short or damaged")
        if header.get("sha256") != hashlib.sha256(payload).hexdigest():
            raise ValueError("damaged (checksum mismatch)")
        if header.get("key") != self.key:
            raise ValueError("written for another configuration")
        n = header.get("artifacts")
        if not isinstance(n, int) or not 0 <= n <= len(payload):
            raise ValueError("damaged header")
        return payload[:n], payload[n:]

    def save(self) -> bool:
        """Write every artifact this process compiled or loaded (atomically); False when there
        was nothing to write or writing failed (a warning: the run goes on)."""
        self.saved_misses = _misses()
        self.saved_variants = self._variants()
        if not self.write:
            return False
        parts, artifacts, regions = [], b"", b""
        if self.regions is None or self.regions.fallback or not self.regions.blobs:
            result = _serialize()  # a precompiled graph carries its own kernels: then these are not needed
            if result is None:
                return False
            artifacts, info = result
            parts.append(f"{len(info.inductor_artifacts)} inductor and {len(info.aot_autograd_artifacts)} autograd graphs")
        if self.regions is not None and self.regions.blobs:
            regions = self.regions.dumps()
            parts.append(f"{sum(map(len, self.regions.blobs.values()))} precompiled block graphs")
        payload = artifacts + regions
        header = json.dumps({"key": self.key, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                             "artifacts": len(artifacts)})  # fmt: skip
        try:
            write_bytes(self.path, MAGIC + header.encode() + b"\n" + payload)
        except Exception as e:  # a full disk or read-only cache folder costs the next run a compile, not this run
            self.log(f"warning: compile cache {self.path} not written: {e}")
            return False
        self.log(f"compile cache: saved {' and '.join(parts)} ({(len(payload) + len(header)) / 2**20:.1f} MiB) "
                 f"to {self.path}")  # fmt: skip
        return True

    def _variants(self) -> int:
        return 0 if self.regions is None else self.regions.compiled

    def prepare(self) -> bool:
        """Compile the block graphs the regions recorded (in parallel: `precompile.Regions.flush`);
        True when there were any. The CUDA-graph path calls it before a capture, `after_step` after
        an eager step."""
        return self.regions is not None and self.regions.flush()

    def after_step(self) -> bool:
        """Compile what the step recorded; save when a compile since the last save missed the
        cache (the first step, a new bucket)."""
        self.prepare()
        return self.save() if _misses() > self.saved_misses or self._variants() > self.saved_variants else False
