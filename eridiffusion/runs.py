"""Run identity: which run an output folder belongs to, and when another run may write there.

Every output folder holds `run.json` (run id, kind, config hash, start time, `save.name`),
written atomically by the run that claims the folder. A run that would write into a folder
holding another run's record (or the outputs of a run from before records existed) is
refused with one line, unless

- it resumes that very run (`--resume` of a state whose run id is the folder's), or
- `--overwrite`: the old run's files are first moved into `OUTPUT_DIR/.replaced/<run id>/`,
  kept until the new run finishes (`finish`), then deleted. A demo replaces an earlier demo
  the same way without the flag (its folder is scratch).

So a folder never mixes two runs' LoRA files, state, loss.csv, samples or logs. The cache is
not a run's output (content-addressed, shared by runs) and stays; so do files the run does
not write (a dataset or model beside them, the UI's log).

    check(out, kind, overwrite=..., resume=...)  # at start: refuses, writes nothing
    claim(out, kind, cfg_hash, ...)             # before the first write: moves aside, records
    finish(out)                                  # after the final save: drops .replaced/
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from eridiffusion.errors import ConfigError
from eridiffusion.io import atomic_write, fsync_dir

RECORD = "run.json"
REPLACED = ".replaced"
KINDS = ("train", "demo")
SCRATCH_KINDS = ("demo",)  # a new run of the same kind replaces these without --overwrite
# what a run writes in its folder besides `{name}.safetensors` / `{name}-step*.safetensors`
RUN_FILES = ("config.toml", "dataset_report.txt", "loss.csv", "loss.png", "state", "samples", "tensorboard")


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    kind: str
    config_hash: str
    started: str  # local time, ISO 8601
    name: str = "lora"  # save.name: which LoRA files are this run's

    @classmethod
    def read(cls, folder: str | os.PathLike) -> RunRecord | None:
        """The record in `folder`, or None when there is none."""
        path = Path(folder) / RECORD
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{k: raw[k] for k in ("run_id", "kind", "config_hash", "started")}, name=raw.get("name", "lora"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a readable run record ({type(e).__name__}); "
                              "it marks the folder's run: restore it or move the folder's files away") from None  # fmt: skip


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def config_hash(cfg) -> str:
    """A TrainConfig's identity without the actions (`save.overwrite`, `train.resume`)."""
    raw = cfg.to_dict()
    raw["save"]["overwrite"], raw["train"]["resume"] = False, False
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def saved_config(cfg):
    """`cfg` as a run saves it in config.toml: overwrite / resume are actions, not settings."""
    return cfg.replace(save={"overwrite": False}, train={"resume": False})


def run_files(folder: Path, name: str) -> list[Path]:
    """The files and folders of a run named `name` present in `folder` (its record excluded)."""
    if not folder.is_dir():
        return []
    found = [folder / f"{name}.safetensors", *(folder / n for n in RUN_FILES)]
    found = [p for p in found if p.exists()] + sorted(folder.glob(f"{name}-step*.safetensors"))
    return found


def _earlier_outputs(folder: Path, name: str) -> list[Path]:
    """Outputs in a folder without a record (runs from before records existed)."""
    found = [folder / f"{name}.safetensors", folder / "state" / "state.json", folder / "loss.csv"]
    return [p for p in found if p.is_file()] + sorted(folder.glob(f"{name}-step*.safetensors"))


def state_run_id(state_dir: Path) -> str | None:
    """The run a saved state belongs to: `run_id` in state.json, else the record beside the
    state folder, else None (a state from before records)."""
    meta = state_dir / "state.json"
    if not meta.is_file():
        hint = f" (a run folder? pass {state_dir / 'state'})" if (state_dir / "state" / "state.json").is_file() else ""
        raise ConfigError(f"{meta}: no training state to resume from{hint}; train without train.resume first")
    try:
        run_id = json.loads(meta.read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError):
        return None  # load_state names the problem
    if run_id:
        return run_id
    beside = RunRecord.read(state_dir.parent)
    return beside.run_id if beside else None


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


@dataclass(frozen=True)
class Plan:
    """What claiming a folder will do: `action` new / continue / replace; `old` the record
    there (None: none); `run_id` the id to record (None: a new one)."""

    action: str
    old: RunRecord | None
    run_id: str | None
    name: str


def check(out_dir: str | os.PathLike, kind: str = "train", *, overwrite: bool = False,
          resume: str | os.PathLike | None = None, name: str = "lora") -> Plan:  # fmt: skip
    """Whether a run of `kind` may write into `out_dir` (one-line `ConfigError` if not);
    `resume` is the state folder it continues. Writes nothing."""
    if kind not in KINDS:
        raise ValueError(f"run kind {kind!r} is not one of {KINDS}")
    out = Path(out_dir)
    old = RunRecord.read(out)
    earlier = [] if old else _earlier_outputs(out, name)
    here = f"save.output_dir = {str(out)!r}"
    if resume is not None:
        resume = Path(resume)
        sid = state_run_id(resume)
        if old is None and not earlier:
            return Plan("continue", None, sid, name)  # a new folder continues the saved run
        if old is None:
            if _inside(resume, out):  # the folder's own state, saved before records existed
                return Plan("continue", None, sid, name)
            mine = f"outputs of an earlier run ({earlier[0].relative_to(out)})"
        elif old.run_id == sid or (sid is None and _inside(resume, out)):
            return Plan("continue", old, old.run_id, name)
        else:
            mine = f"run {old.run_id}"
        if overwrite and not _inside(resume, out):
            return Plan("replace", old, sid, name)
        raise ConfigError(f"--resume {resume}: the state belongs to run {sid or '(unrecorded)'} but {here} holds "
                          f"{mine}; pass --overwrite to replace that run, or resume into the state's own folder "
                          f"{resume.parent}")  # fmt: skip
    if old is None and not earlier:
        return Plan("new", None, None, name)
    if overwrite or (old is not None and old.kind == kind and kind in SCRATCH_KINDS):
        return Plan("replace", old, None, name)
    if old is None:
        what = earlier[0].relative_to(out)
    else:
        saved = _earlier_outputs(out, old.name)
        what = saved[0].relative_to(out) if saved else f"{RECORD} (run {old.run_id}, nothing saved yet)"
    raise ConfigError(f"{here} already holds {what} from an earlier run: pass --overwrite to replace it, "
                      f"--resume {out / 'state'} to continue it, or choose another save.output_dir")  # fmt: skip


def claim(out_dir: str | os.PathLike, kind: str, cfg_hash: str, *, overwrite: bool = False,
          resume: str | os.PathLike | None = None, name: str = "lora") -> RunRecord:  # fmt: skip
    """Make `out_dir` this run's: `check`, move a replaced run's files into
    `.replaced/<run id>/`, then write the record (kept as it is when continuing a run)."""
    out = Path(out_dir)
    plan = check(out, kind, overwrite=overwrite, resume=resume, name=name)
    if plan.action == "continue" and plan.old is not None:
        return plan.old
    out.mkdir(parents=True, exist_ok=True)
    if plan.action == "replace":
        move_aside(out, plan.old, name)
    record = RunRecord(plan.run_id or new_id(), kind, cfg_hash, time.strftime("%Y-%m-%dT%H:%M:%S%z"), name)
    text = json.dumps(asdict(record), indent=1) + "\n"
    try:
        atomic_write(out / RECORD, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), exclusive=True)
    except FileExistsError:
        raise ConfigError(f"save.output_dir = {str(out)!r}: another run claimed this folder meanwhile; "
                          "choose another save.output_dir") from None  # fmt: skip
    return record


def move_aside(out: Path, old: RunRecord | None, name: str) -> Path:
    """Move a run's files (its record last) into `out/.replaced/<run id>/`; returns that folder."""
    run_id = old.run_id if old else "unrecorded-" + new_id()
    dest = out / REPLACED / run_id
    dest.mkdir(parents=True, exist_ok=True)
    for path in run_files(out, old.name if old else name):
        target = dest / path.name
        if target.is_dir() and not target.is_symlink():  # left by an interrupted move of the same run
            shutil.rmtree(target)
        os.replace(path, target)
    if old is not None:
        os.replace(out / RECORD, dest / RECORD)
    fsync_dir(out)
    return dest


def finish(out_dir: str | os.PathLike) -> None:
    """The run in `out_dir` is done: delete the runs it replaced."""
    shutil.rmtree(Path(out_dir) / REPLACED, ignore_errors=True)


def holds_run(folder: str | os.PathLike) -> bool:
    """Whether `folder` is some run's output folder (the dataset scanner skips those)."""
    return (Path(folder) / RECORD).is_file()


def check_layout(cfg) -> None:
    """Output and dataset folders must not nest where one run would read or move the other's
    files: an output folder inside (or equal to) a data folder is refused (the next run would
    train on its samples and plots), and so is a data folder inside a folder the run writes or
    moves (the output folder itself, its samples/, state/, cache/, ...). A dataset in its own
    subfolder of the output folder (the demo's layout) is never touched and is allowed."""
    out = Path(cfg.save.output_dir).resolve()
    written = [out / n for n in (*RUN_FILES, REPLACED)] + [Path(cfg.cache_dir).resolve()]
    folders = [("data.dir", cfg.data.dir)] + [(f"data.subsets[{j}].dir", s.dir) for j, s in enumerate(cfg.data.subsets)]
    for key, folder in folders:
        if not folder:
            continue
        data = Path(folder).resolve()
        if _inside(out, data):
            raise ConfigError(f"save.output_dir = {cfg.save.output_dir!r} is inside {key} = {folder!r}: the next run "
                              "would train on this run's samples and plots; choose an output folder outside the dataset")  # fmt: skip
        if any(_inside(data, w) for w in written):
            raise ConfigError(f"{key} = {folder!r} is inside a folder the run writes in save.output_dir = "
                              f"{cfg.save.output_dir!r}: move the images to their own folder")  # fmt: skip
