"""The compile cache file (eridiffusion/compile_cache.py): written by one process, loaded by the
next, which then compiles nothing; another key is another file; a damaged file is a warning."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eridiffusion import compile_cache, speed
from eridiffusion.compile_cache import MAGIC, CompileCache, cache_path, graph_key
from eridiffusion.tiny import demo_config, prepare
from eridiffusion.train import train

REPO = Path(__file__).resolve().parent.parent

# A LoRA'd block (ops.lora_linear as an autograd.Function: what fp8_matmul's linear is too), compiled
# with inductor, forward + backward at each (batch, tokens) shape in argv[3], the tokens dim symbolic
# from the first compile when argv[4] says "marked" (as `eri train` with several buckets); prints
# torch's counters.
CHILD = r"""
import json, sys
import torch
from torch import nn
from torch._dynamo.utils import counters
from eridiffusion import ops, speed
from eridiffusion.compile_cache import CompileCache, allow_custom_autograd_functions

ops.COMPILED = "function"

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(16), nn.Linear(16, 16).requires_grad_(False)
        self.down, self.up = nn.Parameter(torch.randn(4, 16) / 4), nn.Parameter(torch.zeros(16, 4))

    def _forward(self, x):
        return x + torch.nn.functional.gelu(ops.lora_linear(self.norm(x), self.proj.weight, self.proj.bias, self.down, self.up))

allow_custom_autograd_functions()
cache = CompileCache(sys.argv[1], json.loads(sys.argv[2]))
cache.load()
torch.manual_seed(0)
block = Block()
block._forward = torch.compile(block._forward, backend="inductor", dynamic=None)
if sys.argv[4] == "marked":
    block._forward = speed._SpatiallyDynamic(block._forward, ((0, (1,)),))
for b, n in json.loads(sys.argv[3]):
    block._forward(torch.randn(b, n, 16)).sum().backward()
    cache.after_step()
print("COUNTERS " + json.dumps({k: dict(counters[k]) for k in ("inductor", "aot_autograd")}))
"""


def run_child(tmp_path: Path, name: str, file: Path, key: dict, shapes, marked: bool = False) -> tuple[dict, str]:
    """One fresh process with an empty inductor cache folder of its own: hits can only come from `file`."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    env.pop("TRITON_CACHE_DIR", None)
    argv = [str(file), json.dumps(key), json.dumps(shapes), "marked" if marked else "static first"]
    p = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    counters = json.loads(p.stdout.split("COUNTERS ", 1)[1])
    return counters, p.stdout


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="CPU inductor needs a C++ compiler (g++)")
def test_a_second_process_loads_the_file_and_compiles_nothing(tmp_path):
    key, file = {"family": "toy", "shapes": "two"}, tmp_path / "cache" / "toy.torchcache"
    shapes = [[2, 8], [2, 12]]  # a second bucket: a shape-generic recompile, saved again
    cold, out = run_child(tmp_path, "cold", file, key, shapes)
    assert file.is_file() and file.read_bytes().startswith(MAGIC)
    assert cold["inductor"]["fxgraph_cache_miss"] > 0 and cold["aot_autograd"]["autograd_cache_miss"] > 0
    assert cold["aot_autograd"].get("autograd_cache_bypass", 0) == 0  # the autograd.Function does not bypass it
    assert len(re.findall(r"^compile cache: saved ", out, re.M)) == 2  # after the first shape, after the second
    warm, out = run_child(tmp_path, "warm", file, key, shapes)
    assert "compile cache: loaded" in out
    assert warm["inductor"].get("fxgraph_cache_miss", 0) == 0 and warm["inductor"]["fxgraph_cache_hit"] > 0
    assert warm["aot_autograd"].get("autograd_cache_miss", 0) == 0 and warm["aot_autograd"]["autograd_cache_hit"] > 0
    assert "compile cache: saved" not in out  # nothing new compiled: the file is left alone


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="CPU inductor needs a C++ compiler (g++)")
def test_shape_generic_graphs_serve_other_buckets_from_the_file(tmp_path):
    """With several buckets the graphs are generic in the spatial dims from their first compile, so
    a run on other buckets (another dataset) finds every graph in the first run's file."""
    key, file = {"family": "toy", "shapes": "several"}, tmp_path / "cache" / "toy.torchcache"
    cold, out = run_child(tmp_path, "cold", file, key, [[2, 8], [2, 12]], marked=True)
    assert cold["inductor"]["fxgraph_cache_miss"] > 0
    assert len(re.findall(r"^compile cache: saved ", out, re.M)) == 1  # the second shape compiled nothing
    other, out = run_child(tmp_path, "other", file, key, [[2, 20], [2, 6], [2, 9]], marked=True)
    assert other["inductor"].get("fxgraph_cache_miss", 0) == 0 and other["inductor"]["fxgraph_cache_hit"] > 0
    assert other["aot_autograd"].get("autograd_cache_miss", 0) == 0
    assert "compile cache: saved" not in out


def test_keys_change_with_what_changes_the_graphs(tmp_path):
    prepare(tmp_path, n_images=2, log=lambda s: None)
    cfg, cpu = demo_config(tmp_path, 1), torch.device("cpu")
    base = graph_key(cfg, "sdxl-tiny", cpu, [(128, 128)])
    variants = [
        graph_key(cfg, "sdxl-tiny", cpu, [(128, 128), (96, 160)]),  # another bucket
        graph_key(cfg.replace(train={"batch_size": 3}), "sdxl-tiny", cpu, [(128, 128)]),
        graph_key(cfg.replace(train={"gradient_checkpointing": not cfg.train.gradient_checkpointing}), "sdxl-tiny",
                  cpu, [(128, 128)]),  # fmt: skip
        graph_key(cfg.replace(lora={"rank": 4}), "sdxl-tiny", cpu, [(128, 128)]),
        graph_key(cfg.replace(model={"dtype": "bf16"}), "sdxl-tiny", cpu, [(128, 128)]),
        graph_key(cfg.replace(train={"memory_budget": 0.5, "compile": True}), "sdxl-tiny", cpu, [(128, 128)]),
        graph_key(cfg.replace(train={"keep_activations": True, "compile": True}), "sdxl-tiny", cpu, [(128, 128)]),
        graph_key(cfg, "sdxl-tiny", cpu, [(128, 128)], {"mode": "max-autotune"}),
        graph_key(cfg, "sd15-tiny", cpu, [(128, 128)]),
    ]
    paths = {cache_path(tmp_path, k) for k in [base, *variants]}
    assert len(paths) == 1 + len(variants)
    # several buckets, whichever (shape-generic graphs), are one key; one bucket is a key of its own
    assert graph_key(cfg, "sdxl-tiny", cpu, [(96, 160), (128, 128), (96, 160)]) == graph_key(
        cfg, "sdxl-tiny", cpu, [(64, 192), (160, 96)])  # fmt: skip
    assert graph_key(cfg, "sdxl-tiny", cpu, [(96, 160)]) != base
    assert graph_key(cfg, "sdxl-tiny", cpu, [(128, 128), (128, 128)]) == base
    assert cache_path(tmp_path, base).parent == tmp_path / "compile"


@pytest.mark.parametrize("damage", ["garbage", "cut", "flipped", "foreign", "not torch's"])
def test_a_damaged_or_foreign_file_is_a_warning_and_loads_nothing(tmp_path, damage):
    key, path = {"family": "toy", "n": 1}, tmp_path / "toy.torchcache"
    payload = b"torch artifact bytes" * 10

    def header(k, p):
        return MAGIC + json.dumps({"key": k, "size": len(p), "sha256": compile_cache.hashlib.sha256(p).hexdigest()}).encode() + b"\n"

    data = {"garbage": b"\x00\x01garbage",
            "cut": (header(key, payload) + payload)[:-5],
            "flipped": header(key, payload) + payload[:-1] + b"X",
            "foreign": header({"family": "toy", "n": 2}, payload) + payload,
            "not torch's": header(key, payload) + payload}[damage]  # fmt: skip
    path.write_bytes(data)
    lines = []
    assert CompileCache(path, key, log=lines.append).load() is False
    assert len(lines) == 1 and lines[0].startswith(f"warning: compile cache {path}: ") and "compiling from scratch" in lines[0]
    lines.clear()
    assert CompileCache(tmp_path / "absent.torchcache", key, log=lines.append).load() is False
    assert lines[0].startswith("compile cache: none yet")  # no file: no warning


def test_train_with_a_damaged_cache_file_warns_and_trains_the_same(tmp_path, monkeypatch):
    """train.compile (dynamo with the aot_eager backend: the wiring without minutes of inductor): the run
    looks for its file in <cache dir>/compile; garbage there is one warning line, the losses are
    those of a run without it; cache.compile = false looks for nothing."""
    prepare(tmp_path, n_images=2, log=lambda s: None)
    cfg = demo_config(tmp_path, 2).replace(sample={"every_n_steps": 0}, save={"every_n_steps": 0, "overwrite": True},
                                           log={"every": 1, "tensorboard": False}, train={"compile": True})  # fmt: skip
    original = speed.compile_regions
    # aot_eager, not eager: dynamo's eager graph of a checkpoint (ops.recomputed) cannot be serialised
    monkeypatch.setattr(speed, "compile_regions", lambda unet, **kw: original(unet, **{**kw, "backend": "aot_eager"}))
    lines: list[str] = []
    job = torch.compiler.config.job_id
    first = train(cfg, progress=False, log=lines.append)
    assert torch.compiler.config.job_id == job  # no automatic-dynamic profile (compile_cache.py says why)
    found = [ln for ln in lines if ln.startswith("compile cache: none yet")]
    assert len(found) == 1
    path = Path(re.search(r"\((.*)\)$", found[0]).group(1))
    assert path.parent == Path(cfg.cache_dir) / "compile" and path.name.startswith("sdxl-tiny-")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a cache file")
    lines.clear()
    second = train(cfg, progress=False, log=lines.append)
    found = [ln for ln in lines if "compile cache" in ln]
    assert found[0] == f"warning: compile cache {path}: not a compile-cache file; compiling from scratch (the file is rewritten)"
    assert len(found) == 2 and found[1].startswith("compile cache: saved ") and found[1].endswith(f" to {path}")
    assert second.losses == first.losses and second.step == 2
    lines.clear()
    train(cfg.replace(cache={"compile": False}), progress=False, log=lines.append)
    assert not [ln for ln in lines if "compile cache" in ln]
