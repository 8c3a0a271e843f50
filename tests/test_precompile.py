"""Precompiled regions (eridiffusion/precompile.py): a process that loads the compile-cache file
runs the blocks without tracing or compiling anything, with eager's numbers; a call no variant
accepts compiles one more; a block that cannot be one graph falls back to torch.compile."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from eridiffusion import ops, precompile

REPO = Path(__file__).resolve().parent.parent
needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                               reason="CPU inductor needs a C++ compiler (g++)")  # fmt: skip
needs_aot = pytest.mark.skipif(not precompile.available(), reason="this torch has no AOT precompile")

# Two blocks of one structure and one of another (a LoRA'd linear, as ops.lora_linear computes it in
# compiled regions), through precompile.Regions and the compile-cache file at argv[1]; forward +
# backward at each (batch, tokens) shape of argv[2], tokens marked dynamic when argv[3] == "marked".
# Prints the outputs' and gradients' largest difference from eager, and torch's counters.
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[5])
import torch
from torch import nn
from torch._dynamo.utils import counters
from eridiffusion import precompile
from eridiffusion.compile_cache import CompileCache
from test_precompile import Block

torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = True  # as speed.set_fast_math: part of every guard's global state
blocks = nn.Sequential(Block(16), Block(16), nn.Linear(16, 24, bias=False).requires_grad_(False), Block(24))
eager = [b._forward for b in blocks if isinstance(b, Block)]
regions = precompile.Regions(spatial={Block: ((0, (1,)),)} if sys.argv[3] == "marked" else {}, workers=int(sys.argv[4]))
cache = CompileCache(sys.argv[1], {"family": "toy"}, regions=regions)
if not cache.load():
    regions.start_workers()  # workers > 1: as CompileCache.for_run does on a cold start
regions.install([b for b in blocks if isinstance(b, Block)])
diff = 0.0
for b, n in json.loads(sys.argv[2]):
    x = torch.randn(b, n, 16)
    out = blocks(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in blocks.parameters() if p.requires_grad]
    for p in blocks.parameters():  # kept allocated, as with a CUDA graph: the next compile sees them
        if p.grad is not None:
            p.grad.zero_()
    cache.after_step()
    for blk, fn in zip([b for b in blocks if isinstance(b, Block)], eager):
        blk._forward, compiled = fn, blk._forward
    ref = blocks(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [p for p in blocks.parameters() if p.requires_grad])
    for blk in [b for b in blocks if isinstance(b, Block)]:
        blk._forward = precompile._Region(regions, blk, precompile.group_of(blk))
    diff = max(diff, (out - ref).abs().max().item(), *[(g - r).abs().max().item() for g, r in zip(grads, ref_grads)])
print("RESULT " + json.dumps({"diff": diff, "compiled": regions.compiled, "fallback": len(regions.fallback),
                              "frames": dict(counters["frames"]),
                              "stats": dict(counters["stats"]), "inductor": dict(counters["inductor"])}))
"""


class Block(nn.Module):
    """A LoRA'd linear after a norm, as `ops.lora_linear` computes it in compiled regions (importable:
    worker processes unpickle it)."""

    def __init__(self, width):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(width), nn.Linear(width, width).requires_grad_(False)
        self.down, self.up = nn.Parameter(torch.randn(4, width) / 4), nn.Parameter(torch.randn(width, 4) / 4)

    def _forward(self, x):
        return x + torch.nn.functional.gelu(ops.lora_linear(self.norm(x), self.proj.weight, self.proj.bias, self.down, self.up))

    def forward(self, x):
        return self._forward(x)


def run_child(tmp_path: Path, name: str, file: Path, shapes, marked: bool = False, workers: int = 1) -> tuple[dict, str]:
    """A fresh process with an empty inductor folder of its own: what it does not compile comes from `file`."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    env.pop("TRITON_CACHE_DIR", None)
    argv = [str(file), json.dumps(shapes), "marked" if marked else "static", str(workers), str(Path(__file__).parent)]
    p = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.split("RESULT ", 1)[1]), p.stdout


@needs_cxx
@needs_aot
def test_a_second_process_runs_the_saved_graphs_without_tracing(tmp_path):
    file = tmp_path / "cache" / "toy.torchcache"
    cold, out = run_child(tmp_path, "cold", file, [[2, 8], [2, 12]], marked=True)
    assert cold["diff"] < 1e-4 and cold["fallback"] == 0
    # generic in the tokens dim: one variant per structure and input (the first block's input needs
    # no gradient, the second's does; the 24-wide block)
    assert cold["compiled"] == 3
    assert len(re.findall(r"^compile cache: saved 3 precompiled block graphs \(", out, re.M)) == 1
    warm, out = run_child(tmp_path, "warm", file, [[2, 8], [2, 12], [2, 5]], marked=True)
    assert "compile cache: loaded 3 precompiled block graphs (" in out and "compile cache: saved" not in out
    assert warm["diff"] < 1e-4 and warm["compiled"] == 0
    assert warm["frames"].get("total", 0) == 0  # dynamo traced nothing
    assert warm["inductor"].get("fxgraph_cache_miss", 0) == 0


@needs_cxx
@needs_aot
def test_a_shape_no_variant_accepts_compiles_one_more_and_saves_it(tmp_path):
    file = tmp_path / "cache" / "toy.torchcache"
    cold, out = run_child(tmp_path, "cold", file, [[2, 8]])
    assert cold["compiled"] == 3
    more, out = run_child(tmp_path, "more", file, [[2, 8], [2, 12]])  # static variants: 12 tokens is new
    assert more["compiled"] == 3 and more["diff"] < 1e-4
    assert "compile cache: saved 6 precompiled block graphs (" in out  # with the loaded ones; only these
    again, out = run_child(tmp_path, "again", file, [[2, 12], [2, 8]])
    assert again["compiled"] == 0 and again["frames"].get("total", 0) == 0


class _Breaks(nn.Module):
    """A block dynamo cannot capture as one graph (a Python branch on a tensor's value)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def _forward(self, x):
        y = self.lin(x)
        return y * 2 if float(y.sum()) > 0 else y - 1


def test_a_block_that_is_not_one_graph_falls_back_to_torch_compile():
    torch.manual_seed(0)
    block, lines = _Breaks(), []
    regions = precompile.Regions(backend="eager", log=lines.append)
    regions.install([block])
    x = torch.randn(3, 8)
    for sign in (1, -1):
        expected = _Breaks._forward(block, sign * x)
        assert torch.equal(block._forward(sign * x), expected)
    assert len(lines) == 1 and lines[0].startswith("compile: _Breaks blocks compile without precompile (")
    assert regions.compiled == 0 and list(regions.fallback) == [precompile.group_of(block)]


def test_a_routed_block_still_pickles():
    """torch pickles the block into each variant's guard state: the route must not drag the
    variants compiled before along (their guard managers do not pickle)."""
    block = _Breaks()
    regions = precompile.Regions()
    regions.variants["x"] = [object()]  # stands for a compiled variant: not picklable by reference
    regions.install([block])
    copy = pickle.loads(pickle.dumps(block))
    assert isinstance(copy._forward, precompile._Stub) and copy._forward.group == precompile.group_of(block)


def test_groups_follow_structure_not_values():
    a, b, c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 5)
    b.weight.data += 1
    assert precompile.group_of(a) == precompile.group_of(b) != precompile.group_of(c)
    b.weight.requires_grad_(False)
    assert precompile.group_of(a) != precompile.group_of(b)


def test_bytes_of_another_format_or_torch_are_refused():
    regions = precompile.Regions()
    for state in ({"format": precompile.FORMAT + 1, "torch": torch.__version__, "groups": {}, "homes": {}},
                  {"format": precompile.FORMAT, "torch": "0.1", "groups": {}, "homes": {}}):  # fmt: skip
        with pytest.raises(ValueError, match="another format or torch version"):
            regions.loads(pickle.dumps(state))


@needs_cxx
@needs_aot
def test_calls_recorded_in_a_step_compile_in_worker_processes(tmp_path):
    """workers > 1: the first step runs the blocks eagerly and records their calls; after it the
    graphs compile in worker processes, and the main process traces nothing."""
    file = tmp_path / "cache" / "toy.torchcache"
    cold, out = run_child(tmp_path, "cold", file, [[2, 8], [2, 12]], marked=True, workers=2)
    assert out.count("block graphs in") == 1 and "compile: 3 block graphs in 2 processes" in out, out
    assert "do not accept" not in out  # the workers compiled under this process's settings (TF32 here)
    assert cold["compiled"] == 3 and cold["diff"] < 1e-4 and cold["fallback"] == 0
    assert cold["frames"].get("total", 0) == 0  # no tracing here: the workers did it
    assert len(re.findall(r"^compile cache: saved 3 precompiled block graphs \(", out, re.M)) == 1
    warm, out = run_child(tmp_path, "warm", file, [[2, 8], [2, 20]], marked=True, workers=2)
    assert "compile cache: loaded 3 precompiled block graphs (" in out and "processes" not in out
    assert warm["compiled"] == 0 and warm["diff"] < 1e-4 and warm["frames"].get("total", 0) == 0


def test_auto_workers_follow_the_cores_of_this_rank_and_stay_one_off_cuda(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert precompile.workers_for(0, cuda) == 8 and precompile.workers_for(0, cpu) == 1
    assert precompile.workers_for(3, cpu) == 3  # a setting is kept as it is
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun ranks share the 16 cores
    assert precompile.workers_for(0, cuda) == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert precompile.workers_for(0, cuda) == 1


@needs_cxx
@needs_aot
def test_workers_do_not_run_a_users_unguarded_script_again(tmp_path):
    """A training script without `if __name__ == "__main__"`: multiprocessing's spawn would run it
    again in every worker (training again, claiming the output folder); it runs once."""
    script = tmp_path / "train_script.py"
    script.write_text(
        f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]\n"
        "import torch\nfrom eridiffusion import precompile\nfrom test_precompile import Block\n"
        "print('SCRIPT RAN', flush=True)\n"
        "block = Block(16)\nregions = precompile.Regions(workers=2)\nregions.install([block])\n"
        "regions.start_workers()\nshapes = [(2, 8, 16), (2, 12, 16)]  # two calls: two workers\n"
        "for s in shapes: block(torch.randn(s)).sum().backward()\nregions.flush()\n"
        "for s in shapes: block(torch.randn(s)).sum().backward()\n"
        "print('COMPILED', regions.compiled, len(regions.memo))\n"
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("SCRIPT RAN") == 1, p.stdout
    assert "COMPILED 2 2" in p.stdout, p.stdout  # the workers' variants, accepted by the second calls


def test_workers_are_fewer_where_host_memory_holds_fewer(monkeypatch):
    assert sys.platform != "linux" or precompile._host_available_gib() > 0  # read from /proc/meminfo
    monkeypatch.setattr(precompile, "_host_available_gib", lambda: 5.0)  # 2 GiB counted per worker
    assert precompile._fit(8) == 2 and precompile._fit(1) == 1
    monkeypatch.setattr(precompile, "_host_available_gib", lambda: None)  # not Linux: no limit known
    assert precompile._fit(8, torch.device("cpu")) == 8
