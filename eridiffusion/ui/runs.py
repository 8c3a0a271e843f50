"""The Runs and Live pages: run folders under the root, their files, and live metrics.

A run folder is one the trainer wrote: it holds `config.toml` or `loss.csv` (columns
step,loss,lr,time). Live metrics are read back from those files and from the log of the
child process (`ui-train.log`), so the UI follows a run it did not start just as well.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from eridiffusion import checkpoint
from eridiffusion.config import ConfigError, TrainConfig
from eridiffusion.ui.paths import Root
from eridiffusion.weights import WeightLoader

LOG_NAME = "ui-train.log"  # stdout + stderr of a run the UI started
CONFIG_NAME = "ui-train.toml"  # the config the UI started it with
EMA = 0.95  # the trainer's smoothing of the progress-bar loss
NOT_RUNS = {"state", "cache", "samples", "tensorboard", "data"}  # folders a run writes, never runs themselves


def is_run(folder: Path) -> bool:
    return (folder / "config.toml").is_file() or (folder / "loss.csv").is_file()


def list_runs(root: Root, max_depth: int = 4) -> list[dict]:
    """Run folders under the root, newest first."""
    runs = []
    for dirpath, dirnames, _ in os.walk(root.path):
        here = Path(dirpath)
        depth = len(here.relative_to(root.path).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in NOT_RUNS and depth < max_depth)
        if is_run(here):
            runs.append(summary(root, here))
    return sorted(runs, key=lambda r: -r["mtime"])


def summary(root: Root, folder: Path) -> dict:
    rows = read_loss(folder / "loss.csv")
    cfg = run_config(folder)
    return {
        "dir": root.relative(folder),
        "step": int(rows[-1][0]) if rows else 0,
        "total": cfg.train.max_steps if cfg else None,
        "loss": rows[-1][1] if rows else None,
        "loras": len(lora_files(folder)),
        "state": state_step(folder),
        "mtime": max((p.stat().st_mtime for p in folder.iterdir() if p.is_file()), default=folder.stat().st_mtime),
    }


def read_loss(path: Path, skip: int = 0) -> list[list[float]]:
    """Rows of loss.csv as [step, loss, lr, time]; a partly written last line is left out."""
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[1:-1]  # header; the text after the last newline may be partial
    for line in lines[skip:]:
        try:
            step, loss, lr, t = (float(x) for x in line.split(",")[:4])  # then val_loss (may be empty)
        except ValueError:
            continue
        rows.append([step, loss, lr, t])
    return rows


def run_config(folder: Path) -> TrainConfig | None:
    for name in ("config.toml", CONFIG_NAME):
        if (folder / name).is_file():
            try:
                return TrainConfig.from_toml(folder / name)
            except ConfigError:
                return None
    return None


def state_step(folder: Path) -> int | None:
    """The step of the run's resumable state, or None."""
    try:
        return int(json.loads((folder / "state" / "state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lora_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)


def weight_details(path: Path) -> dict:
    """What `eri inspect` says of a LoRA file (the same report functions); models get the file facts."""
    from eridiffusion.cli import _lora_report

    with WeightLoader(path) as loader:
        head = {"file": path.name, "format": loader.format, "tensors": len(loader), "size": loader.file_size}
        modules = checkpoint.lora_modules(loader.keys())
        return {**head, **(_lora_report(loader, modules) if modules else {"kind": "model"})}


def details(root: Root, folder_name: str) -> dict:
    """One run: its config, loss plot, LoRA files with their inspect report, samples, state, log."""
    folder = root.resolve(folder_name, must_exist=True)
    if not is_run(folder):
        raise FileNotFoundError(f"{folder_name}: not a run folder (no config.toml or loss.csv)")
    config = folder / "config.toml"
    samples = sorted((folder / "samples").glob("*.png")) if (folder / "samples").is_dir() else []
    return {
        **summary(root, folder),
        "config": config.read_text(encoding="utf-8") if config.is_file() else "",
        "loss_png": root.relative(folder / "loss.png") if (folder / "loss.png").is_file() else None,
        "loras": [{"path": root.relative(p), **weight_details(p)} for p in lora_files(folder)],
        "samples": [root.relative(p) for p in samples],
        "log": log_tail(folder / LOG_NAME),
    }


# ---------------------------------------------------------------- live metrics


def log_tail(path: Path, lines: int = 30, max_bytes: int = 65536) -> str:
    """The last lines of a log as a terminal shows them: of `\\r`-rewritten progress bars, the last."""
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        text = f.read().decode("utf-8", errors="replace")
    shown = [next((s for s in reversed(line.split("\r")) if s.strip()), "") for line in text.split("\n")]
    return "\n".join(shown[-lines:]).strip("\n")


def memory(log: str) -> str | None:
    """GPU memory from the progress bar's `mem=` (the trainer shows it on CUDA)."""
    found = re.findall(r"mem=([\d.]+\s*[KMGT]?i?B?)", log)
    return found[-1] if found else None


def newest_sample(folder: Path, since: float = 0.0) -> Path | None:
    pngs = [p for p in (folder / "samples").glob("*.png") if p.stat().st_mtime >= since]
    return max(pngs, key=lambda p: p.stat().st_mtime, default=None)


def metrics(rows: list[list[float]], total: int | None) -> dict:
    """step, loss, EMA-smoothed loss, lr, it/s over the last 20 rows, ETA in seconds."""
    if not rows:
        return {"step": 0, "total": total, "loss": None, "smooth": None, "lr": None, "its": None, "eta": None}
    ema = None
    for r in rows:
        ema = r[1] if ema is None else EMA * ema + (1 - EMA) * r[1]
    a, b = rows[max(0, len(rows) - 21)], rows[-1]
    its = (b[0] - a[0]) / (b[3] - a[3]) if b[3] > a[3] else None
    eta = (total - b[0]) / its if its and total else None
    return {"step": int(b[0]), "total": total, "loss": b[1], "smooth": ema, "lr": b[2], "its": its, "eta": eta}


class LiveTail:
    """Follows one run folder: each `poll()` gives the loss rows added since the last one."""

    def __init__(self, root: Root, folder: Path, since: float = 0.0):
        self.root, self.folder, self.since = root, folder, since
        self.rows: list[list[float]] | None = None  # None: nothing sent yet

    def poll(self, job: dict | None = None) -> dict:
        csv = self.folder / "loss.csv"
        fresh = csv.is_file() and csv.stat().st_mtime >= self.since
        rows = read_loss(csv) if fresh else []
        sent = self.rows or []
        reset = self.rows is None or rows[: len(sent)] != sent  # first poll, or a new run in the folder
        new = rows if reset else rows[len(sent) :]
        self.rows = rows
        cfg = run_config(self.folder)
        log = log_tail(self.folder / LOG_NAME)
        sample = newest_sample(self.folder, self.since)
        return {
            "dir": self.root.relative(self.folder),
            "job": job,
            "reset": reset,
            "rows": new,
            **metrics(rows, cfg.train.max_steps if cfg else None),
            "mem": memory(log),
            "sample": self.root.relative(sample) if sample else None,
            "sample_mtime": sample.stat().st_mtime if sample else None,
            "state": state_step(self.folder),
            "log": log,
        }
