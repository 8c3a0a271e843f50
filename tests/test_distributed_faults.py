"""A fault on one rank stops every rank (distributed.FaultWatch), and a two-"node" launch on
localhost equals one process, on the CPU (gloo, real torchrun processes, the tiny model)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from eridiffusion.tiny import demo_config
from eridiffusion.train import train

DEMO_IMAGES = 11  # the `root` fixture's dataset (tests/conftest.py): buckets of 6 (square) and 5 (3:2) images
REPO = Path(__file__).resolve().parent.parent
TOL = 1e-7  # as tests/test_distributed.py: 1 vs 2 processes with the same global batch, SGD

# rank FAIL_RANK raises in its FAIL_AT-th batch, as a bad image, an OOM or a bug would
FAIL_SCRIPT = """
import os, sys, torch
from eridiffusion.cli import main
from eridiffusion.errors import DatasetError
from eridiffusion.train import batches

calls, rank = [0], int(os.environ["RANK"])
original = batches.Batches.__next__

def next_batch(self):
    calls[0] += 1
    if rank == int(os.environ["FAIL_RANK"]) and calls[0] == int(os.environ["FAIL_AT"]):
        kind = os.environ["FAIL_KIND"]
        if kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if kind == "bug":
            raise ValueError("simulated bug")
        raise DatasetError("/data/cat.png: cannot be read (simulated): replace or delete it")
    return original(self)

batches.Batches.__next__ = next_batch
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(root: Path, out: str, batch: int, steps: int = 6, **train_over):
    return demo_config(root, steps).replace(
        optim={"optimizer": "sgd", "unet_lr": 0.5},
        train={"batch_size": batch, **train_over},
        cache={"dir": str(root / "cache")},
        save={"output_dir": str(root / out), "every_n_steps": 3, "save_dtype": "fp32"},
        sample={"every_n_steps": 0},
        log={"every": 1, "tensorboard": False},
    )


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


@pytest.mark.parametrize("kind, code, message", [
    ("image", 2, "rank 1: /data/cat.png: cannot be read (simulated): replace or delete it"),
    ("oom", 1, "rank 1: out of GPU memory in step 3"),
    ("bug", 1, "rank 1: ValueError: simulated bug"),
])  # fmt: skip
def test_a_fault_on_one_rank_stops_every_rank_with_its_reason(root, tmp_path, kind, code, message):
    config, script, logs = tmp_path / "run.toml", tmp_path / "fail.py", tmp_path / "logs"
    config.write_text(_cfg(root, f"fault-{kind}", 2, steps=40, max_nonfinite=0).to_toml())
    script.write_text(FAIL_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "--log-dir", str(logs), "--redirects", "3", str(script), "train", str(config)]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(FAIL_RANK="1", FAIL_AT="3", FAIL_KIND=kind), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    seconds = time.perf_counter() - t0
    print(f"{kind}: both ranks ended {seconds:.1f} s after the launch")
    assert proc.returncode != 0 and seconds < 60
    errs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert sorted(errs) == [0, 1], proc.stderr[-2000:]
    if kind != "bug":  # the failing rank's own line (a bug keeps its traceback there)
        assert message.removeprefix("rank 1: ") in errs[1].splitlines()[-1], errs[1][-2000:]
    assert errs[0].splitlines()[-1] == f"eri train: {message}" or message in errs[0].splitlines()[-1], errs[0][-3000:]
    state = root / f"fault-{kind}" / "state" / "state.json"
    assert state.is_file()  # rank 0 saved the last good state (step 2: the fault came in step 3)
    import json

    assert json.loads(state.read_text())["step"] == 2


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one_process(root, tmp_path):
    """`--nnodes 2 --rdzv-backend c10d`: two torchrun agents, one process each, batch 2 each."""
    reference = train(_cfg(root, "one", 4), progress=False, log=lambda s: None)
    assert reference.step == 6
    config = tmp_path / "nodes.toml"
    config.write_text(_cfg(root, "nodes", 2).to_toml())
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "eri-test",
           "-m", "eridiffusion.cli", "train", str(config)]  # fmt: skip
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]  # fmt: skip
    outputs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "global batch 4" in "".join(outputs)
    for name in ("lora-step3.safetensors", "lora.safetensors"):
        a, b = load_file(root / "one" / name), load_file(root / "nodes" / name)
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"two nodes {name}: max |Δ| = {diff:.3g}")
        assert a.keys() == b.keys() and diff < TOL


def test_stopping_the_watch_waits_for_a_poll_in_flight():
    """FaultWatch.stop() returns only after the watcher thread has ended: the process group
    (and the store the thread polls) is destroyed right after it."""
    import threading

    import torch

    from eridiffusion import distributed

    polling, release = threading.Event(), threading.Event()

    class SlowStore:  # a store request that takes a while (a loaded machine)
        def check(self, keys):
            polling.set()
            release.wait(2.0)
            return False

    w = distributed.World(rank=0, size=2, local_rank=0, device=torch.device("cpu"), owned=True)
    watch = distributed.FaultWatch(w, SlowStore())
    watch.POLL_S = 0.01
    distributed.FaultWatch.current = watch
    watch._thread.start()
    assert polling.wait(5.0)
    threading.Timer(0.3, release.set).start()
    distributed.FaultWatch.stop()
    assert not watch._thread.is_alive() and distributed.FaultWatch.current is None
