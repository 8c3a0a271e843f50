"""Time to the first step of `eri train` with train.compile + train.cuda_graph: cold, then warm.

    python3 bench/first_step.py --out bench/results/first_step_h200.json   # CUDA, full SDXL shapes
    python3 bench/first_step.py --tiny --workdir /tmp/fs_tiny --out x.json   # CPU smoke test (tiny models)

A random-weight SDXL checkpoint (bench/e2e.py `write_checkpoint`, reused when present) and noise
images in two buckets (e2e `make_noise_dataset`), latents cached first (`eri cache`, untimed), then
`eri train` (batch 1, checkpointing, compile + CUDA graph) in a fresh process per phase:

    cold:   an empty TORCHINDUCTOR_CACHE_DIR, no compile-cache file (<cache dir>/compile emptied)
    warm:   another empty TORCHINDUCTOR_CACHE_DIR, the file the cold run saved (a second run on a
            fresh machine: only eridiffusion's file carries the compiled code)
    local:  the cold run's TORCHINDUCTOR_CACHE_DIR kept, and the file (a second run on one machine)

Each row: seconds from process start to the first step and its parts (start-up, model load, setup,
the first step itself), and inside the steps torch's compile time (dynamo + AOTAutograd + inductor
forward, the lazy backward compiles), the CUDA-graph warm-up and capture time, cache hits/misses
and the compile-cache lines. One JSON row per phase on stdout, a table, all rows in --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from common import REPO, emit, environment, filesystem, print_table, resolve_device, write_json  # noqa: I001
from e2e import _markers, make_noise_dataset, write_checkpoint
from eridiffusion import checkpoint

PHASES = ("cold", "warm", "local")
STEADY_FROM = 10  # steady step time: the median over the steps after this many (with --steps > it)
TIMERS = ("_compile.compile_inner", "backward._backward_impl", "bytecode_tracing", "create_aot_dispatcher_function",
          "fx_codegen_and_compile", "async_compile.wait", "PyCodeCache.load_by_key_path")  # fmt: skip


def write_bytecode() -> float:
    """compileall over torch's site-packages and eridiffusion; returns the seconds it took."""
    t0 = time.perf_counter()
    dirs = [str(Path(torch.__file__).parents[1]), str(REPO / "eridiffusion")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs], stdout=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the `eri train` child
def child(stats_path: str, argv: list[str]) -> int:
    """`eri train argv` in this process, with torch's compile timers, the cache counters and the
    CUDA-graph warm-up / capture seconds written to `stats_path` at exit."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    from eridiffusion import speed
    from eridiffusion.cli import main

    graphs = {"warmup_s": 0.0, "capture_s": 0.0, "captures": 0, "prepare_s": 0.0}
    warm_up, capture = speed._warm_up, speed._capture

    def timed(fn, seconds: str):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            graphs[seconds] += time.perf_counter() - t0
            return out

        return run

    def timed_warm_up(fn, args, kwargs, warmup, prepare=None):  # the first call compiles (cold) or loads (warm)
        timed(warm_up, "warmup_s")(fn, args, kwargs, warmup, prepare and timed(prepare, "prepare_s"))

    def timed_capture(*args, **kwargs):  # speed._capture: its time less the warm-ups' is the capture's
        before = graphs["warmup_s"]
        out = timed(capture, "capture_s")(*args, **kwargs)
        graphs["capture_s"] -= graphs["warmup_s"] - before
        graphs["captures"] += 1
        return out

    speed._warm_up, speed._capture = timed_warm_up, timed_capture
    profile = os.environ.get("ERI_FIRST_STEP_PROFILE")  # --profile: cProfile of the whole run, to this file
    if profile:
        import cProfile

        prof = cProfile.Profile()
        rc = prof.runcall(main, argv)
        prof.dump_stats(profile)
    else:
        rc = main(argv)
    info = {"rc": rc, **graphs, "timers_s": {k: sum(v) for k, v in compilation_time_metrics.items()},
            "counters": {k: dict(counters[k]) for k in ("inductor", "aot_autograd", "frames", "stats")}}  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        info["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(stats_path).write_text(json.dumps(info))
    return rc


# ---------------------------------------------------------------- one phase
def overrides(args, work: Path, ckpt: Path, out: Path, device: torch.device) -> list[str]:
    sets = [f"model.path={ckpt}", f"data.dir={work / 'data'}", f"save.output_dir={out}", f"cache.dir={work / 'cache'}",
            f"train.device={device}", "train.batch_size=1", f"train.max_steps={args.steps}", "train.epochs=0",
            "train.grad_accum=1", "lora.rank=16", "lora.alpha=16", "optim.optimizer=adamw", "save.every_n_steps=0",
            "sample.every_n_steps=0", "log.every=1", "log.tensorboard=false", "save.overwrite=true"]  # fmt: skip
    if args.tiny:
        sets += ["model.dtype=fp32", "data.resolution=128", "data.bucket_step=32", "data.bucket_min=64",
                 "data.bucket_max=256", "train.cuda_graph=false"]  # fmt: skip
    else:
        sets += ["model.dtype=bf16", "data.resolution=1024", "train.cuda_graph=true"]
    return sets + ["train.compile=true", "train.gradient_checkpointing=true"] + args.set


def run_phase(args, phase: str, work: Path, ckpt: Path, device: torch.device, profile: bool = False) -> dict:
    out, inductor = work / f"run_{phase}", work / f"inductor_{phase}"
    shutil.rmtree(out, ignore_errors=True)
    compiled = work / "cache" / "compile"
    if phase == "cold":
        shutil.rmtree(compiled, ignore_errors=True)
    if phase == "local":
        shutil.copytree(work / "inductor_cold", inductor, dirs_exist_ok=True)  # the cold run's folder, a copy
    else:
        shutil.rmtree(inductor, ignore_errors=True)
    files = sorted(compiled.glob("*.torchcache")) if compiled.is_dir() else []
    if phase != "cold" and not files:
        return {"phase": phase, "error": f"no compile-cache file in {compiled}: run the cold phase first"}
    stats = work / f"stats_{phase}.json"
    stats.unlink(missing_ok=True)
    argv = ["train", str(args.config), *overrides(args, work, ckpt, out, device)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(inductor),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    env.pop("TRITON_CACHE_DIR", None)  # inductor keeps Triton's kernels under its own folder then
    if profile:
        env["ERI_FIRST_STEP_PROFILE"] = str(work / f"profile_{phase}.prof")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(stats), *argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    drain.start()
    lines = []
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        print(f"  [{phase} {lines[-1][0]:7.1f}s] {lines[-1][1]}", flush=True)
    rc = proc.wait()
    total = time.perf_counter() - t0
    drain.join()
    log = work / f"train_{phase}.log"
    log.write_text("".join(f"[{t:8.2f}s] {ln}\n" for t, ln in lines) + "\n--- stderr ---\n" + "".join(err))
    row = {"phase": phase, "rc": rc, "total_s": total, "compile_cache_files": [f.name for f in files],
           "cmd": "eri " + " ".join(argv), "log": str(log)}  # fmt: skip
    if rc != 0:
        return {**row, "error": (("".join(err).strip().splitlines() or ["(no stderr)"])[-1])[:300]}
    m = _markers(lines)
    with open(out / "loss.csv", newline="") as f:
        times = [float(r["time"]) for r in csv.DictReader(f)]  # seconds since the loop began, per step
    steady = sorted(b - a for a, b in zip(times[STEADY_FROM - 1 :], times[STEADY_FROM:]))
    batch = int([a for a in argv if a.startswith("train.batch_size=")][-1].split("=", 1)[1])
    info = json.loads(stats.read_text())
    timers, c = info["timers_s"], info["counters"]
    start = m["train_start"]
    cache_lines = [(round(t - start, 2), ln) for t, ln in lines if "compile cache" in ln]
    row.update({
        "time_to_first_step_s": start + times[0],
        "startup_s": m.get("load_start"), "load_s": m["loaded"] - m["load_start"],
        "setup_s": start - m["loaded"],  # dataset, cached latents / text, LoRA, compile-cache load, optimizer
        "first_step_s": times[0],
        "step_s": [round(b - a, 3) for a, b in zip([0.0] + times, times)],  # a second bucket's first step compiles
        "compile_forward_s": timers.get("_compile.compile_inner"),  # dynamo + AOTAutograd + inductor forward
        "compile_backward_s": timers.get("backward._backward_impl"),  # the lazy backward compiles
        **{f"t_{k}": timers.get(k) for k in TIMERS[2:]},
        "graph_warmup_s": info["warmup_s"], "graph_capture_s": info["capture_s"], "graph_captures": info["captures"],
        "parallel_compile_s": info.get("prepare_s"),  # inside graph_warmup_s: precompile.Regions.flush
        "frames_compiled": c["frames"].get("ok"),
        "fxgraph_hit": c["inductor"].get("fxgraph_cache_hit", 0), "fxgraph_miss": c["inductor"].get("fxgraph_cache_miss", 0),
        "autograd_hit": c["aot_autograd"].get("autograd_cache_hit", 0),
        "autograd_miss": c["aot_autograd"].get("autograd_cache_miss", 0),
        "autograd_bypass": c["aot_autograd"].get("autograd_cache_bypass", 0),
        # steps from STEADY_FROM on: both buckets compiled and captured (the loop's host clock, one sync a step)
        "steady_s_per_step": steady[len(steady) // 2] if steady else None,
        "steady_img_per_s": batch / steady[len(steady) // 2] if steady else None,
        "compile_cache_lines": cache_lines,  # (seconds since the loop began, line)
        "peak_gib": info.get("peak_allocated_gib"), "timers_all_s": timers,
    })  # fmt: skip
    return row


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny SDXL-layout models and 128² images (CPU smoke test)")
    ap.add_argument("--device", default="auto", help="auto = cuda (cpu with --tiny)")
    ap.add_argument("--workdir", default="/tmp/first_step", help="checkpoint, dataset, cache and runs go here")
    ap.add_argument("--out", default=None, help="write all rows as JSON here")
    ap.add_argument("--phases", default="cold,warm", help=f"any of {','.join(PHASES)}, in this order")
    ap.add_argument("--config", default=str(REPO / "configs" / "sdxl_lora.toml"))
    ap.add_argument("--steps", type=int, default=4, help="training steps per run (a second bucket compiles in them)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--profile", action="store_true", help="run the last phase under cProfile "
                    "(<workdir>/profile_<phase>.prof; slows Python-heavy parts such as tracing)")
    ap.add_argument("--set", action="append", default=[], metavar="section.field=value", help="extra override")
    ap.add_argument("--bytecode", action="store_true", help="first write the .pyc files of torch's site-packages "
                    "and eridiffusion (compileall), as pip does at install; for a Python that has none and writes "
                    "none (PYTHONDONTWRITEBYTECODE), where every run compiles what it imports from source")
    args = ap.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    if unknown := set(phases) - set(PHASES):
        ap.error(f"--phases: {sorted(unknown)} unknown; use {PHASES}")
    device = resolve_device(args.device, args.tiny)
    family = checkpoint.FAMILIES["sdxl-tiny" if args.tiny else "sdxl"]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"random_{family.name}_fp16.safetensors"
    env = {**environment(device), "workdir": str(work), "fs": filesystem(work), "family": family.name,
           "cpus": os.cpu_count(), "compile_threads": None}  # fmt: skip
    try:
        import torch._inductor.config as inductor_config

        env["compile_threads"] = inductor_config.compile_threads
    except ImportError:
        pass
    if args.bytecode:
        env["bytecode_s"] = write_bytecode()
    print(json.dumps({"env": env}), flush=True)
    rows: list[dict] = []
    if not ckpt.is_file():
        emit(write_checkpoint(ckpt, family, device, seed=0), rows)
    sizes = [(128, 128), (192, 128)] if args.tiny else [(1024, 1024), (1216, 832)]
    if not (work / "data").is_dir():
        make_noise_dataset(work / "data", args.images, sizes)
    t0 = time.perf_counter()  # latents and text cached once, outside the timed runs
    cache_argv = ["cache", str(args.config), *overrides(args, work, ckpt, work / "run_cache", device)]
    subprocess.run([sys.executable, "-m", "eridiffusion.cli", *cache_argv], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)  # fmt: skip
    emit({"stage": "cache", "s": time.perf_counter() - t0}, rows)
    for i, phase in enumerate(phases):  # a phase named twice runs twice (warm twice: the second reads the first's file)
        profile = args.profile and i == len(phases) - 1
        row = emit({"stage": "train", "profiled": profile, **run_phase(args, phase, work, ckpt, device, profile)}, rows)
        print(f"{phase}: {row.get('time_to_first_step_s', float('nan')):.1f} s to the first step", flush=True)
    write_json(args.out, env, rows)
    print()
    print_table([r for r in rows if r["stage"] == "train"],
                [("phase", 6), ("time_to_first_step_s", 20), ("startup_s", 9), ("load_s", 7), ("setup_s", 8),
                 ("first_step_s", 12), ("compile_forward_s", 17), ("compile_backward_s", 18), ("graph_warmup_s", 14),
                 ("graph_capture_s", 15), ("fxgraph_hit", 11), ("fxgraph_miss", 12), ("autograd_miss", 13),
                 ("steady_img_per_s", 16)])  # fmt: skip
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
