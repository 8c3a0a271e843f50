"""End-to-end benchmark: what a user waits for, from a checkpoint on disk to a trained LoRA.

    a. write a random-weight SDXL single file in the real layout (fp16, ~6.9 GB)
    b. read it once in 16 MiB chunks (the disk bound), cold after posix_fadvise(DONTNEED)
    c. checkpoint.load(..., bf16, cuda) cold and warm, vs safetensors.torch.load_file (the bound)
    d. `eri train` in a fresh process on 8 noise images (1024² and 1216×832) for 50 steps,
       timed from process start: start-up, load, cache, time to first step, s/step, save.

    python bench/e2e.py --out bench/results/e2e.json              # CUDA, full SDXL shapes
    python bench/e2e.py --tiny --workdir /tmp/e2e_tiny --out x.json # CPU smoke test (tiny models)

One JSON row per measurement on stdout, a table at the end, all rows in --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import (  # noqa: I001 (also puts the repo root on sys.path)
    REPO, cache_state, drop_page_cache, emit, environment, filesystem, free, peak_gib, print_table, random_components,
    reset_peak, resident_fraction, resolve_device, sync, write_json,
)
from eridiffusion import checkpoint
from eridiffusion.config import ConfigError, TrainConfig

CHUNK = 16 << 20
TARGET_S = 300.0  # 50 steps at 1024², start-up included, should take under 5 minutes

# The `eri train` process: the real CLI entry point, plus the peak GPU memory written at exit.
TRAIN_WRAPPER = """
import json, sys
from eridiffusion.cli import main
rc = main(sys.argv[2:])
import torch
info = {"rc": rc}
if torch.cuda.is_available() and torch.cuda.is_initialized():
    info["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    info["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
with open(sys.argv[1], "w") as f:
    json.dump(info, f)
sys.exit(rc)
"""


# ---------------------------------------------------------------- a. write
def write_checkpoint(path: Path, family: checkpoint.Family, device: torch.device, seed: int) -> dict:
    t0 = time.perf_counter()
    comps = random_components(family, device, torch.float16, seed=seed)
    sync(device)
    build_s = time.perf_counter() - t0
    n = sum(len(m.state_dict()) for _, m in comps.items())
    t0 = time.perf_counter()
    checkpoint.save(comps, path)  # to CPU, safetensors, fsync, rename
    write_s = time.perf_counter() - t0
    del comps
    free(device)
    size = path.stat().st_size
    return {"stage": "write", "family": family.name, "tensors": n, "file_gb": size / 1e9, "build_s": build_s,
            "s": write_s, "gb_per_s": size / 1e9 / write_s, "fs": filesystem(path)}


# ---------------------------------------------------------------- b. read
def read_once(path: Path, cold: bool) -> dict:
    """Read the whole file once into one reused 16 MiB buffer (no parsing): the disk's bound."""
    dropped = drop_page_cache(path) if cold else False
    before = resident_fraction(path)
    view = memoryview(bytearray(CHUNK))
    total, t0 = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    s = time.perf_counter() - t0
    return {"stage": "read", "impl": "readinto 16 MiB", "cache": cache_state(before), "fadvise_dontneed": dropped,
            "resident_before": before, "s": s, "gb_per_s": total / 1e9 / s, "fs": filesystem(path)}


# ---------------------------------------------------------------- c. load
def load_once(path: Path, impl: str, cold: bool, device: torch.device, dtype: torch.dtype) -> dict:
    dropped = drop_page_cache(path) if cold else False
    before = resident_fraction(path)
    free(device)
    reset_peak(device)
    t0 = time.perf_counter()
    if impl == "eridiffusion":
        loaded = checkpoint.load(path, dtype=dtype, device=device)
    else:
        import safetensors.torch

        loaded = safetensors.torch.load_file(path, device=str(device))
    sync(device)
    s = time.perf_counter() - t0
    row = {"stage": "load", "impl": "checkpoint.load" if impl == "eridiffusion" else "safetensors.load_file",
           "dtype": str(dtype).removeprefix("torch.") if impl == "eridiffusion" else "as stored (fp16)",
           "cache": cache_state(before), "fadvise_dontneed": dropped, "resident_before": before, "s": s,
           "gb_per_s": path.stat().st_size / 1e9 / s, "peak_gib": peak_gib(device)}
    del loaded
    free(device)
    return row


# ---------------------------------------------------------------- d. train
def make_noise_dataset(folder: Path, n: int, sizes: list[tuple[int, int]], seed: int = 0) -> None:
    """`n` smooth-noise images (coarse colour noise upscaled, plus fine grain), cycling through
    `sizes` (width, height), each with a same-stem .txt caption."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"noise_{i:03d}.png", compress_level=1)
        (folder / f"noise_{i:03d}.txt").write_text(f"a colourful noise texture, sample {i}")


def _markers(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Times (s since process start) of the log lines train.py prints at each phase."""
    found: dict[str, float] = {}
    patterns = {"load_start": r"^loading ", "loaded": r"^model: ", "lora": r"^lora: ", "train_start": r"^training \d+ steps",
                "saved": r"^saved "}
    for t, line in lines:
        for name, pat in patterns.items():
            if name not in found and re.search(pat, line):
                found[name] = t
    return found


def run_train(args, ckpt: Path, device: torch.device, batch: int) -> dict:
    work = Path(args.workdir)
    data = work / "data"
    out = work / f"run_b{batch}"
    shutil.rmtree(out, ignore_errors=True)  # fresh cache: encoding latents / text is part of the timing
    steps = args.steps
    log_every = 10 if steps >= 30 else max(1, steps // 3)
    overrides = [
        f"model.path={ckpt}", f"data.dir={data}", f"save.output_dir={out}", f"train.device={device}",
        f"train.batch_size={batch}", f"train.max_steps={steps}", "train.epochs=0", "train.grad_accum=1",
        "lora.rank=16", "lora.alpha=16", "optim.optimizer=adamw", "save.every_n_steps=0",
        "sample.every_n_steps=0", f"log.every={log_every}",
    ]  # fmt: skip
    if args.tiny:
        overrides += ["model.dtype=fp32", "data.resolution=128", "data.bucket_step=32", "data.bucket_min=64",
                      "data.bucket_max=256", "log.tensorboard=false"]  # fmt: skip
    else:
        overrides += ["model.dtype=bf16", "data.resolution=1024"]
    overrides += args.set
    stats = work / f"train_b{batch}_stats.json"
    stats.unlink(missing_ok=True)
    log_path = work / f"train_b{batch}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-c", TRAIN_WRAPPER, str(stats), "train", str(args.config), *overrides]

    dropped = drop_page_cache(ckpt) if args.train_cache == "cold" else False
    checkpoint_cache = cache_state(resident_fraction(ckpt))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_chunks: list[str] = []
    drain = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()
    lines = [(time.perf_counter() - t0, line.rstrip("\n")) for line in proc.stdout]
    rc = proc.wait()
    total = time.perf_counter() - t0
    drain.join()
    stderr = "".join(err_chunks)
    log_path.write_text("".join(f"[{t:8.2f}s] {ln}\n" for t, ln in lines) + "\n--- stderr ---\n" + stderr)

    row = {"stage": "train", "batch": batch, "steps": steps, "cmd": "eri train " + " ".join([str(args.config), *overrides]),
           "rc": rc, "total_s": total, "checkpoint_cache": checkpoint_cache, "fadvise_dontneed": dropped,
           "log": str(log_path)}
    if rc != 0:
        tail = (stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {**row, "error": tail[:300]}
    m = _markers(lines)
    with open(out / "loss.csv", newline="") as f:
        hist = [(int(r["step"]), float(r["loss"]), float(r["time"])) for r in csv.DictReader(f)]
    times = {s: t for s, _, t in hist}
    losses = [v for _, v, _ in hist]
    last = hist[-1][0]
    first = log_every if last > log_every else 1  # steady state: between flushes (each flush syncs)
    steady = (times[last] - times[first]) / max(1, last - first)
    info = json.loads(stats.read_text()) if stats.is_file() else {}
    used = _used_config(out)
    train_start = m.get("train_start")
    mem = re.findall(r"mem=([\d.]+)G", stderr)
    row.update({
        "startup_s": m.get("load_start"),
        "load_s": m["loaded"] - m["load_start"] if {"loaded", "load_start"} <= m.keys() else None,
        "cache_and_setup_s": m["train_start"] - m["loaded"] if {"train_start", "loaded"} <= m.keys() else None,
        "time_to_first_step_s": train_start + times[hist[0][0]] if train_start is not None else None,
        "loop_s": times[last],
        "save_and_exit_s": total - (train_start + times[last]) if train_start is not None else None,
        "steady_s_per_step": steady,
        "img_per_s": batch / steady,
        "peak_gib": info.get("peak_allocated_gib", peak_from_bar(mem)),
        "peak_reserved_gib": info.get("peak_reserved_gib"),
        "gradient_checkpointing": used.train.gradient_checkpointing if used else None,
        "model_dtype": used.model.dtype if used else None,
        "loss_first": losses[0], "loss_last": losses[-1],
        "loss_mean_first10": float(np.mean(losses[:10])), "loss_mean_last10": float(np.mean(losses[-10:])),
        "losses": losses,
        "target_s": TARGET_S if not args.tiny else None,
        "under_target": total < TARGET_S if not args.tiny else None,
        "lora_file": str(out / "lora.safetensors"),
        "lora_written": (out / "lora.safetensors").is_file(),
    })  # fmt: skip
    return row


def peak_from_bar(mem: list[str]) -> float | None:
    """Fallback peak from the progress bar's `mem=…G` postfix (0.1 GiB resolution)."""
    return max(map(float, mem)) if mem else None


def _used_config(out: Path) -> TrainConfig | None:
    """The config the run wrote next to its outputs (what it really used)."""
    try:
        return TrainConfig.from_toml(out / "config.toml")
    except ConfigError:
        return None


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny SDXL-layout models and 128² images (CPU smoke test)")
    ap.add_argument("--device", default="auto", help="auto = cuda (cpu with --tiny)")
    ap.add_argument("--workdir", default="/tmp/e2e", help="checkpoint, dataset and runs go here")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    ap.add_argument("--stages", default="write,read,load,train", help="any of write,read,load,train")
    ap.add_argument("--reuse", action="store_true", help="keep an existing checkpoint in --workdir instead of writing")
    ap.add_argument("--config", default=str(REPO / "configs" / "sdxl_lora.toml"))
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 50; 6 with --tiny)")
    ap.add_argument("--batch", default="1", help="batch sizes to train with, comma-separated, e.g. 1,4")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--train-cache", default="cold", choices=("cold", "warm"),
                    help="drop the checkpoint from the page cache before `eri train` (cold, default) or not")
    ap.add_argument("--set", action="append", default=[], metavar="section.field=value",
                    help="extra `eri train` override, e.g. train.gradient_checkpointing=false; repeatable")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.steps = args.steps or (6 if args.tiny else 50)
    stages = set(args.stages.split(","))
    device = resolve_device(args.device, args.tiny)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    family = checkpoint.FAMILIES["sdxl-tiny" if args.tiny else "sdxl"]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"random_{family.name}_fp16.safetensors"
    env = {**environment(device), "workdir": str(work), "fs": filesystem(work), "family": family.name}
    print(json.dumps({"env": env}), flush=True)
    rows: list[dict] = []

    if "write" in stages and not (args.reuse and ckpt.is_file()):
        emit(write_checkpoint(ckpt, family, device, args.seed), rows)
    if not ckpt.is_file():
        raise SystemExit(f"{ckpt}: no checkpoint; run with the write stage (--stages write,...)")
    if "read" in stages:
        for cold in (True, False):
            emit(read_once(ckpt, cold), rows)
    if "load" in stages:
        dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
        for impl in ("eridiffusion", "safetensors"):
            for cold in (True, False):
                emit(load_once(ckpt, impl, cold, device, dtype), rows)
    if "train" in stages:
        sizes = [(128, 128), (192, 128)] if args.tiny else [(1024, 1024), (1216, 832)]
        make_noise_dataset(work / "data", args.images, sizes, seed=args.seed)
        for b in (int(x) for x in args.batch.split(",")):
            emit(run_train(args, ckpt, device, b), rows)

    write_json(args.out, env, rows)
    print()
    print_table([r for r in rows if r["stage"] != "train"],
                [("stage", 6), ("impl", 22), ("cache", 8), ("s", 8), ("gb_per_s", 8), ("peak_gib", 8)])
    train_rows = [r for r in rows if r["stage"] == "train"]
    if train_rows:
        print()
        print_table(train_rows, [("batch", 5), ("total_s", 8), ("startup_s", 9), ("load_s", 7),
                                 ("cache_and_setup_s", 17), ("time_to_first_step_s", 20), ("steady_s_per_step", 17),
                                 ("img_per_s", 9), ("peak_gib", 8), ("loss_first", 10), ("loss_last", 9)])
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
