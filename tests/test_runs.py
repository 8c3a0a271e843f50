"""Run identity (eridiffusion/runs.py) and one-line errors of issue 20, one test per defect.

A folder holds one run: `run.json` names it, a new run into a folder of another is refused
unless --overwrite (the old files go to .replaced/<id>/ until the new run finishes), a resume
must continue the folder's own run, and the saved config carries no actions. CPU, tiny model.
"""

import errno
import json
import random
import tomllib
from pathlib import Path

import pytest
import torch

from eridiffusion import checkpoint, pipeline, runs
from eridiffusion.cli import main
from eridiffusion.config import TrainConfig
from eridiffusion.errors import ConfigError
from eridiffusion.tiny.dataset import make_dataset
from eridiffusion.train import train

QUIET = {"progress": False, "log": lambda s: None}


def _config(root: Path, out: Path, steps: int = 2, **save) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"path": str(root / "tiny.safetensors"), "dtype": "fp32"},
        "data": {"dir": str(root / "data"), "resolution": 64, "bucket_step": 32, "bucket_min": 64, "bucket_max": 128},
        "lora": {"rank": 2, "alpha": 2.0},
        "train": {"batch_size": 2, "max_steps": steps, "seed": 0, "device": "cpu"},
        "cache": {"dir": str(root / "cache")},
        "save": {"output_dir": str(out), "every_n_steps": 1, **save},
        "log": {"every": 1, "tensorboard": False},
    })  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    checkpoint.save(checkpoint.tiny_components("sdxl-tiny", seed=0), root / "tiny.safetensors")
    make_dataset(root / "data", n=4, size=64)
    (root / "run.toml").write_text(_config(root, root / "out").to_toml(), encoding="utf-8")
    return root


def _eri(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return code, err


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("eri ")]
    assert len(lines) == 1, err
    return lines[0]


def _record(out: Path) -> dict:
    return json.loads((out / runs.RECORD).read_text())


# ---------------------------------------------------------------- defects 1-5: outputs


def test_1_a_demo_never_replaces_a_real_run(root, tmp_path):
    out = tmp_path / "real"
    train(_config(root, out), **QUIET)
    lora = (out / "lora.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds lora.safetensors from an earlier run: pass --overwrite"):
        train(_config(root, out), kind="demo", **QUIET)
    with pytest.raises(ConfigError, match="already holds"):
        runs.check(out, "demo")  # what `eri demo` asks before writing its model and images
    assert (out / "lora.safetensors").read_bytes() == lora and _record(out)["kind"] == "train"
    demo = tmp_path / "demo"  # a demo folder is scratch for the next demo
    train(_config(root, demo), kind="demo", **QUIET)
    first = _record(demo)["run_id"]
    train(_config(root, demo), kind="demo", **QUIET)
    assert _record(demo)["kind"] == "demo" and _record(demo)["run_id"] != first
    assert not (demo / runs.REPLACED).exists()


def test_2_resuming_another_runs_state_into_a_run_folder_is_refused(root, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    train(_config(root, a), stop_after=1, **QUIET)
    train(_config(root, b), **QUIET)
    before = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    code, err = _eri(capsys, "train", root / "run.toml", f"save.output_dir={b}", "--resume", a / "state")
    assert code == 2
    assert f"--resume {a / 'state'}: the state belongs to run {_record(a)['run_id']} but save.output_dir = '{b}' holds " \
           f"run {_record(b)['run_id']}; pass --overwrite" in _one_line(err)  # fmt: skip
    assert {p: p.read_bytes() for p in b.rglob("*") if p.is_file()} == before
    # into a fresh folder the saved run continues there, under its own id
    c = tmp_path / "c"
    assert _eri(capsys, "train", root / "run.toml", f"save.output_dir={c}", "--resume", a / "state")[0] == 0
    assert _record(c)["run_id"] == _record(a)["run_id"] == json.loads((c / "state" / "state.json").read_text())["run_id"]


def test_3_the_saved_config_holds_no_overwrite_or_resume(root, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eri(capsys, "train", root / "run.toml", f"save.output_dir={out}")[0] == 0
    assert _eri(capsys, "train", root / "run.toml", f"save.output_dir={out}", "--overwrite")[0] == 0
    assert _eri(capsys, "train", root / "run.toml", f"save.output_dir={out}", "train.max_steps=3",
                "train.resume=true")[0] == 0  # fmt: skip
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["save"]["overwrite"] is False and saved["train"]["resume"] is False
    lora = (out / "lora.safetensors").read_bytes()
    code, err = _eri(capsys, "train", out / "config.toml")  # running the saved config again
    assert code == 2 and "already holds lora.safetensors from an earlier run" in _one_line(err)
    assert (out / "lora.safetensors").read_bytes() == lora


def test_4_overwrite_moves_every_file_of_the_old_run_aside_then_deletes_them(root, tmp_path, capsys):
    out = tmp_path / "out"
    train(_config(root, out, steps=3), **QUIET)
    (out / "samples").mkdir()
    (out / "samples" / "step000003.png").write_bytes(b"png")
    (out / "tensorboard").mkdir()
    old = _record(out)["run_id"]
    files = {p.name for p in out.iterdir()}
    assert {"lora-step1.safetensors", "lora-step2.safetensors", "lora.safetensors", "state", "loss.csv"} <= files
    # interrupted: the old run waits in .replaced/<id>/ (the new run has not finished)
    train(_config(root, out, steps=2, overwrite=True), stop_after=1, **QUIET)
    kept = out / runs.REPLACED / old
    assert {"lora.safetensors", "lora-step2.safetensors", "samples", "tensorboard", "loss.csv", "state",
            runs.RECORD} <= {p.name for p in kept.iterdir()}  # fmt: skip
    assert sorted(p.name for p in out.glob("lora*.safetensors")) == ["lora-step1.safetensors"]
    assert not (out / "samples").exists() and not (out / "tensorboard").exists()
    new = _record(out)["run_id"]
    assert new != old and json.loads((out / "state" / "state.json").read_text())["run_id"] == new
    assert _eri(capsys, "train", root / "run.toml", f"save.output_dir={out}", "--resume", out / "state")[0] == 0
    assert not (out / runs.REPLACED).exists()  # finished: the replaced run is gone
    assert [r.split(",")[0] for r in (out / "loss.csv").read_text().splitlines()[1:]] == ["1", "2"]


def test_5_output_and_dataset_folders_do_not_nest(root, tmp_path, capsys):
    code, err = _eri(capsys, "train", root / "run.toml", f"save.output_dir={root / 'data' / 'out'}")
    assert code == 2 and f"save.output_dir = '{root / 'data' / 'out'}' is inside data.dir = " in _one_line(err)
    assert not (root / "data" / "out").exists()
    out = tmp_path / "out"
    (out / "samples" / "imgs").mkdir(parents=True)
    code, err = _eri(capsys, "train", root / "run.toml", f"save.output_dir={out}", f"data.dir={out / 'samples' / 'imgs'}")
    assert code == 2 and "is inside a folder the run writes in save.output_dir" in _one_line(err)
    # the scanner skips any run folder inside a dataset
    from eridiffusion.data.dataset import IGNORE_EXCLUDED, build_dataset
    from eridiffusion.data.buckets import BucketConfig

    data = tmp_path / "data"
    make_dataset(data, n=3, size=64)
    make_dataset(data / "old_run" / "samples", n=2, size=64)
    (data / "old_run" / runs.RECORD).write_text("{}")
    ds = build_dataset(data, BucketConfig(resolution=64, step=32, min_side=64, max_side=128))
    assert len(ds) == 3 and ds.report.ignored[IGNORE_EXCLUDED] == [data / "old_run"]


# ---------------------------------------------------------------- defect 6: devices, eri sample --out


def test_6_devices_the_machine_lacks_are_one_line(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    run = ["train", root / "run.toml", f"save.output_dir={tmp_path / 'o'}"]
    code, err = _eri(capsys, *run, "train.device=mps")
    assert code == 2 and "train.device = 'mps' but this machine has no Apple MPS device: use train.device=cpu" in err
    code, err = _eri(capsys, "cache", root / "run.toml", "train.device=mps")
    assert code == 2 and "no Apple MPS device" in _one_line(err)
    code, err = _eri(capsys, "sample", "--model", root / "tiny.safetensors", "--prompt", "x", "--device", "mps",
                     "--out", tmp_path / "s")  # fmt: skip
    assert code == 2 and "--device = 'mps' but this machine has no Apple MPS device: use --device cpu" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, err = _eri(capsys, *run, "train.device=cuda:2")
    assert code == 2 and "train.device = 'cuda:2' but this machine has 2 CUDA devices" in _one_line(err)


def test_6_sample_out_that_cannot_take_files_is_one_line(root, tmp_path, capsys, monkeypatch):
    sample = ["sample", "--model", root / "tiny.safetensors", "--prompt", "a red circle", "--steps", "2",
              "--size", "64x64", "--device", "cpu"]  # fmt: skip
    afile = tmp_path / "taken.png"
    afile.write_bytes(b"x")
    code, err = _eri(capsys, *sample, "--out", afile)
    assert code == 2 and f"--out {afile}: is a file, not a folder" in _one_line(err)
    code, err = _eri(capsys, *sample, "--out", afile / "sub")
    assert code == 2 and f"--out {afile / 'sub'}: cannot write there" in _one_line(err)

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(pipeline.tempfile, "mkstemp", refuse)  # a read-only folder (tests run as root)
    code, err = _eri(capsys, *sample, "--out", tmp_path / "ro")
    assert code == 2 and "cannot write there (Permission denied); pass a folder you can write" in _one_line(err)
    monkeypatch.undo()
    out = tmp_path / "full"

    def full(self, fp, *a, **k):
        Path(fp).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.Image.Image, "save", full)
    code, err = _eri(capsys, *sample, "--out", out)
    assert code == 1 and "disk full while saving" in _one_line(err) and "pass --out on another disk" in err
    assert list(out.iterdir()) == []  # nothing half-written


# ---------------------------------------------------------------- defect 7: the other one-liners


def test_7_flags_anywhere_and_version(root, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eri(capsys, "train", root / "run.toml", f"save.output_dir={out}")[0] == 0
    code, _ = _eri(capsys, "train", root / "run.toml", "--overwrite", f"save.output_dir={out}", "train.max_steps=1")
    assert code == 0 and json.loads((out / "state" / "state.json").read_text())["step"] == 1
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("eri 0.")


def test_7_command_line_values_are_named_as_such(root, capsys):
    code, err = _eri(capsys, "train", root / "run.toml", "train.batch_size=two")
    assert code == 2 and _one_line(err) == 'eri train: command line: train.batch_size expects an integer, got "two"'
    bad = root / "bad.toml"
    bad.write_text((root / "run.toml").read_text().replace("batch_size = 2", 'batch_size = "two"'))
    code, err = _eri(capsys, "train", bad, "train.max_steps=3")
    assert code == 2 and _one_line(err).startswith(f"eri train: {bad}: train.batch_size expects an integer")


def test_7_model_folder_lora_strength_resume_hint_and_nothing_to_train(root, tmp_path, capsys):
    code, err = _eri(capsys, "train", root / "run.toml", f"model.path={root}")
    assert code == 2 and "is a folder: diffusers folders are not read; pass the single-file checkpoint" in err
    with pytest.raises(pipeline.PipelineError, match=r"^--lora F:abc: bad strength 'abc'"):
        pipeline.parse_lora("F:abc")
    assert pipeline.parse_lora("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    out = tmp_path / "out"
    assert _eri(capsys, "train", root / "run.toml", f"save.output_dir={out}")[0] == 0
    code, err = _eri(capsys, "train", root / "run.toml", f"save.output_dir={out}", "--resume", out)
    assert code == 2 and f"no training state to resume from (a run folder? pass {out / 'state'})" in _one_line(err)
    lora = (out / "lora.safetensors").read_bytes()
    code, err = _eri(capsys, "train", root / "run.toml", f"save.output_dir={out}", "--resume", out / "state")
    assert code == 2 and "the state is at step 2 and train.max_steps = 2: nothing to train" in _one_line(err)
    assert (out / "lora.safetensors").read_bytes() == lora


def test_7_the_dataset_is_checked_before_the_model_loads(root, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"not a model")
    code, err = _eri(capsys, "train", root / "run.toml", f"model.path={tmp_path / 'model.safetensors'}",
                     f"data.dir={tmp_path / 'empty'}", f"save.output_dir={tmp_path / 'o'}")  # fmt: skip
    assert code == 2 and "no usable images" in _one_line(err)


# ---------------------------------------------------------------- property: random command sequences


def _owned(folder: Path) -> dict[str, bytes]:
    found = [*folder.glob("lora*.safetensors"), folder / "state" / "state.json", folder / "loss.csv"]
    return {p.name: p.read_bytes() for p in found if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_random_command_sequences_never_mix_or_lose_runs(root, tmp_path, seed):
    """After every command each folder's LoRA files, state and loss.csv belong to the run its
    run.json names, and a finished LoRA disappears only through --overwrite."""
    rng = random.Random(seed)
    folders = [tmp_path / "a", tmp_path / "b"]
    owner: dict[Path, dict[str, tuple[str, bytes]]] = {f: {} for f in folders}  # file → (run id, bytes)
    outcomes = []
    for _ in range(10):
        out, other = rng.sample(folders, 2)
        action = rng.choice(["new", "overwrite", "resume", "resume_other", "interrupted"])
        record = runs.RunRecord.read(out)
        state = out / "state" / "state.json"
        step = json.loads(state.read_text())["step"] if state.is_file() else 0
        steps = rng.choice([2, 3]) + step * (action == "resume")
        cfg = _config(root, out, steps=steps, overwrite=action == "overwrite")
        finished = (out / "lora.safetensors").read_bytes() if (out / "lora.safetensors").is_file() else None
        before = _owned(out)
        try:
            if action == "resume":
                train(cfg, resume_dir=out / "state", **QUIET)
            elif action == "resume_other":
                train(cfg, resume_dir=other / "state", **QUIET)
            else:
                train(cfg, stop_after=1 if action == "interrupted" else None, **QUIET)
            refused = False
        except ConfigError:
            refused = True
        if action in ("new", "interrupted"):
            assert refused == (record is not None), (action, record)
        outcomes.append((action, refused))
        if refused:
            assert _owned(out) == before, action
            continue
        run_id = _record(out)["run_id"]
        now = _owned(out)
        for name, data in now.items():  # changed files are the running run's, the rest keep their owner
            if owner[out].get(name, (None, None))[1] != data:
                owner[out][name] = (run_id, data)
        owner[out] = {n: v for n, v in owner[out].items() if n in now}
        assert {n: v[0] for n, v in owner[out].items()} == {n: run_id for n in now}, (action, owner[out])
        assert json.loads((out / "state" / "state.json").read_text())["run_id"] == run_id
        steps_logged = [int(r.split(",")[0]) for r in (out / "loss.csv").read_text().splitlines()[1:]]
        assert steps_logged == list(range(1, len(steps_logged) + 1))
        if finished is not None and action != "overwrite" and (out / "lora.safetensors").read_bytes() != finished:
            assert action in ("resume", "resume_other") and run_id == record.run_id  # the same run, continued
        assert not (out / runs.REPLACED).exists() or action in ("interrupted", "overwrite")
    print(outcomes)
    assert any(r for _, r in outcomes) and sum(not r for _, r in outcomes) >= 4
