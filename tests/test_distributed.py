"""Multi-process training on the CPU (gloo, 2 real processes) on the tiny SDXL-layout model.

Reference: one process, batch 4, 6 steps (module fixture). Two processes with batch 2 each
(global batch 4) must give the same LoRA at step 3 to float tolerance (per-rank slices of
the same global batch and of the same noise draws; the gradient all-reduce only changes
the summation order; SGD, see `_cfg`), with only rank 0 writing files; a 1-process run resumed from the
2-process state must reach the reference's step-6 LoRA. The 11-image dataset has buckets of
6 and 5 images, so the global batches are 4, 2, 4, 1: an even split, and a last batch of 1
that rank 1 runs with loss weight 0 (`slice_weights`). FSDP2 is tested through
`torchrun -m eridiffusion.cli train` with train.fsdp=true.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from eridiffusion import distributed
from eridiffusion.data.buckets import BucketBatchSampler
from eridiffusion.tiny import demo_config
from eridiffusion.train import train

DEMO_IMAGES = 11  # the `root` fixture's dataset (tests/conftest.py): buckets of 6 (square) and 5 (3:2) images
REPO = Path(__file__).resolve().parent.parent
STEPS = 6
TOL = 1e-7  # measured max |Δ| of the LoRA weights (up to 0.1) between 1 and 2 processes: 9e-9


def _cfg(root: Path, out: str, batch: int, **train_over):
    cfg = demo_config(root, STEPS)
    return cfg.replace(
        # SGD: Adam's first steps are m/√v ≈ sign(g), which turns float noise in near-zero
        # gradients into ±lr (measured 6e-5 after 3 AdamW steps at lr 1e-3): not a useful check
        optim={"optimizer": "sgd", "unet_lr": 0.5},
        train={"batch_size": batch, **train_over},
        cache={"dir": str(root / "cache")},  # filled by the first (2-process) run, split over its ranks
        save={"output_dir": str(root / out), "every_n_steps": 3, "save_dtype": "fp32"},
        sample={"every_n_steps": 0},
        log={"every": 1, "tensorboard": False},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfgs: list, stop_after: int | None) -> None:
    """One torchrun-like rank: the environment torchrun would set, then `train()`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    train(cfgs[rank], stop_after=stop_after, progress=False, log=lambda s: None)


def _spawn(cfgs: list, stop_after: int | None = None) -> None:
    mp.start_processes(_worker, args=(len(cfgs), _free_port(), cfgs, stop_after), nprocs=len(cfgs),
                       join=True, start_method="spawn")  # fmt: skip


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_procs(root):
    """Two processes, batch 2 each, stopped after step 3; rank 1 is pointed at another folder.
    Runs first: the ranks encode the cache between them (a missing entry would fail later runs)."""
    cfg = _cfg(root, "two", 2)
    _spawn([cfg, cfg.replace(save={"output_dir": str(root / "two-rank1")})], stop_after=3)
    return root / "two"


@pytest.fixture(scope="module")
def reference(root, two_procs):
    """One process, batch 4: LoRA files at step 3 and 6."""
    result = train(_cfg(root, "one", 4), progress=False, log=lambda s: None)
    assert result.step == STEPS
    return result


# ---------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_slices_cover_the_global_batch_and_weights_give_its_mean(world):
    g = torch.Generator().manual_seed(0)
    for n in range(1, 10):
        losses = torch.rand(n, generator=g, dtype=torch.float64)
        rows = [distributed.slice_weights(n, r, world) for r in range(world)]
        covered = sorted(i for r in range(world) for i in range(n)[distributed.batch_slice(n, r, world)])
        assert covered == list(range(n))  # every sample on exactly one rank
        # DDP averages the ranks' gradients: mean over ranks of scale · mean(rows) = global mean
        ddp_mean = sum(scale * losses[s].mean() for s, scale in rows) / world
        assert abs(float(ddp_mean - losses.mean())) < 1e-12, (n, world)


def test_auto_device_is_this_ranks_gpu_under_torchrun(monkeypatch):
    """train.device=auto (the default) and cuda both mean cuda:LOCAL_RANK; too few GPUs is one line."""
    from eridiffusion.config import ConfigError
    from eridiffusion.devices import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^LOCAL_RANK=1 but this host has 1 CUDA devices"):
        resolve_device("auto")


def test_sampler_state_resumes_across_global_batch_sizes():
    buckets = [0] * 9 + [1] * 7
    a = BucketBatchSampler(buckets, 4, seed=3)
    it = iter(a)
    consumed = [next(it) for _ in range(3)]
    state = distributed.sampler_state(a)
    assert state["global_batch"] == 4 and state["samples"] == sum(map(len, consumed))
    same = BucketBatchSampler(buckets, 4, seed=3)
    assert distributed.restore_sampler(same, json.loads(json.dumps(state)))  # exact
    assert next(iter(same)) == next(it)
    other = BucketBatchSampler(buckets, 2, seed=3)
    assert not distributed.restore_sampler(other, state)
    done = sum(map(len, other._epoch_batches(other.epoch)[: other.position]))
    assert other.epoch == a.epoch and state["samples"] <= done < state["samples"] + 2


# ---------------------------------------------------------------- two real processes


def test_two_processes_match_one_with_the_same_global_batch(root, reference, two_procs):
    ref = load_file(root / "one" / "lora-step3.safetensors")
    got = load_file(two_procs / "lora-step3.safetensors")
    diff = _max_diff(ref, got)
    print(f"max |LoRA(2 procs × 2) - LoRA(1 proc × 4)| at step 3 = {diff:.3g}")
    assert diff < TOL
    assert max(float(v.abs().max()) for k, v in got.items() if "lora_up" in k) > 1e-4  # it trained
    rows = (two_procs / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3]  # one row per step: rank 1 wrote none
    assert losses == pytest.approx(reference.losses[:3], rel=1e-5)  # the global batch's loss
    assert not (root / "two-rank1").exists()  # rank 1 wrote no LoRA, state, log or config
    state = json.loads((two_procs / "state" / "state.json").read_text())
    assert state["step"] == 3 and state["sampler"]["global_batch"] == 4


def test_one_process_resumes_a_two_process_state(root, reference, two_procs):
    cfg = _cfg(root, "two", 4, resume=True)
    result = train(cfg, progress=False, log=lambda s: None)
    assert result.step == STEPS and not result.interrupted
    diff = _max_diff(load_file(root / "one" / "lora.safetensors"), load_file(two_procs / "lora.safetensors"))
    print(f"max |LoRA(2 procs → resumed 1 proc) - LoRA(1 proc)| at step 6 = {diff:.3g}")
    assert diff < TOL
    assert result.losses == pytest.approx(reference.losses, rel=1e-5)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_fsdp_through_torchrun_cli_matches(root, reference, tmp_path):
    config = tmp_path / "fsdp.toml"
    config.write_text(_cfg(root, "fsdp", 2).to_toml())
    proc = _torchrun("-m", "eridiffusion.cli", "train", str(config), "train.fsdp=true")
    assert "global batch 4" in proc.stdout + proc.stderr  # logged once, by rank 0
    for name in ("lora-step3.safetensors", "lora.safetensors"):
        diff = _max_diff(load_file(root / "one" / name), load_file(root / "fsdp" / name))
        print(f"fsdp {name}: max |Δ| = {diff:.3g}")
        assert diff < TOL


def test_bench_ddp_step_tiny(tmp_path):
    out = tmp_path / "ddp.json"
    proc = _torchrun(str(REPO / "bench" / "ddp_step.py"), "--tiny", "--batch", "2", "--warmup", "1",
                     "--iters", "2", "--out", str(out))  # fmt: skip
    row = json.loads(out.read_text())["rows"][0]
    assert row["mode"] == "ddp" and row["world"] == 2 and row["global_batch"] == 4
    assert len(row["per_rank"]) == 2 and row["img_per_s_total"] > 0 and row["img_per_s_per_rank"] > 0
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("{")] != []


def _agree_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    w = distributed.init(torch.device("cpu"))
    seen = 15 if rank == 1 else 0  # SIGTERM seen by rank 1 only
    Path(out, f"rank{rank}").write_text(str(distributed.agree_max(seen, torch.device("cpu"))))
    distributed.cleanup(w)


def test_a_stop_signal_on_one_rank_stops_every_rank(tmp_path):
    mp.start_processes(_agree_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")  # fmt: skip
    assert [Path(tmp_path, f"rank{r}").read_text() for r in (0, 1)] == ["15", "15"]
