"""Reliability and security of `eri train` (docs/reliability.md), on the tiny SDXL-layout model.

Bad input ends in one line on stderr and exit 2 (or a counted skip in the start summary);
faults during training (NaN loss, OOM, full disk, SIGINT / SIGTERM, kill -9 mid-save) keep
every saved file intact, and a resumed run continues bit-exactly: its losses equal an
uninterrupted run's. Real `python -m eridiffusion.cli train` subprocesses are signalled and
killed; the uninterrupted reference run is made in-process once per module.
"""

import csv
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eridiffusion import checkpoint, faults, networks
from eridiffusion.networks import files as lora_files
from eridiffusion.cli import main
from eridiffusion.config import TrainConfig
from eridiffusion.data.dataset import build_dataset
from eridiffusion.data.buckets import BucketConfig
from eridiffusion.io import atomic_write, write_text
from eridiffusion.models.unet import UNet
from eridiffusion.tiny.dataset import make_dataset
from eridiffusion.train import load_state, train

REPO = Path(__file__).resolve().parents[1]
STEPS = 16  # of the reference run; subprocesses are stopped after a few of them
EVERY = 3  # save.every_n_steps


def _config(root: Path) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "model": {"path": str(root / "tiny.safetensors"), "dtype": "fp32"},
            "data": {"dir": str(root / "data"), "resolution": 64, "bucket_step": 32, "bucket_min": 64,
                     "bucket_max": 128},
            "lora": {"rank": 4, "alpha": 4.0},
            "optim": {"unet_lr": 1e-3, "weight_decay": 0.0},
            "train": {"batch_size": 2, "max_steps": STEPS, "seed": 0, "device": "cpu"},
            "cache": {"dir": str(root / "cache")},
            "save": {"output_dir": str(root / "out"), "every_n_steps": EVERY},
            "log": {"every": 1, "tensorboard": False},
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """tiny.safetensors, data/ (4 captioned 64² images), run.toml; bad inputs made next to them."""
    root = tmp_path_factory.mktemp("rel")
    components = checkpoint.tiny_components("sdxl-tiny", seed=0)
    checkpoint.save(components, root / "tiny.safetensors")
    make_dataset(root / "data", n=4, size=64)
    (root / "run.toml").write_text(_config(root).to_toml(), encoding="utf-8")
    # bad checkpoints
    networks.save_lora(root / "a_lora.safetensors", networks.inject(components.unet, "unet", 4, 4.0))
    full = load_file(root / "tiny.safetensors")
    key = "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"
    save_file({k: v for k, v in full.items() if k != key}, root / "missing.safetensors")
    save_file({**full, key: torch.zeros(3, 3)}, root / "shape.safetensors")
    data = (root / "tiny.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(full, root / "tiny.ckpt")
    return root


@pytest.fixture(scope="module")
def reference(root):
    """The uninterrupted run: (history [[step, loss, lr]], loss.csv rows [step, loss, lr])."""
    result = train(_config(root).replace(save={"output_dir": str(root / "reference")}), log=lambda s: None,
                   progress=False)  # fmt: skip
    assert result.step == STEPS and not result.interrupted
    return _history(root / "reference"), _csv(root / "reference")


def _history(out: Path) -> list[list[float]]:
    meta = json.loads((out / "state" / "state.json").read_text())
    return [h[:3] for h in meta["history"]]  # time differs between runs


def _csv(out: Path) -> list[list[str]]:
    with open(out / "loss.csv", encoding="utf-8") as f:
        return [[r["step"], r["loss"], r["lr"]] for r in csv.DictReader(f)]


def _eri(capsys, *argv) -> tuple[int, str, str]:
    code = main(["train", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(err: str) -> str:
    """The one message line of stderr; everything else must be tqdm progress bars."""
    assert "Traceback" not in err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines and all(ln.startswith(("train:", "latents:", "text:")) for ln in lines[:-1]), err
    return lines[-1]


# ---------------------------------------------------------------- 1. bad input


def _images_dir(tmp: Path, n: int = 4) -> Path:
    make_dataset(tmp / "d", n=n, size=64)
    return tmp / "d"


def _no_usable_images(root, tmp):
    (tmp / "d").mkdir()
    (tmp / "d" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp / "d" / "notes.txt").write_text("hello")
    make_dataset(tmp / "d" / "small", n=1, size=16)
    return [f"data.dir={tmp / 'd'}", "data.upscale_small=false"]  # (upscaled by default)


def _bad_toml_key(root, tmp):
    text = (root / "run.toml").read_text().replace("max_steps =", "max_step =")
    (tmp / "bad.toml").write_text(text)
    return ["--config", tmp / "bad.toml"]


def _pickle_with_code(root, tmp):
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp / 'PWNED'}",)

    torch.save({"x": Evil()}, tmp / "evil.ckpt")
    return [f"model.path={tmp / 'evil.ckpt'}", "model.allow_pickle=true"]


BAD_INPUT = {  # case: (overrides or a builder, the one line must contain)
    "zero usable images": (_no_usable_images, "no usable images (1 not an image, 1 smaller than the smallest bucket)"),
    "unknown config key (override)": (["train.max_step=5"], "did you mean train.max_steps?"),
    "unknown config key (file)": (_bad_toml_key, "unknown key train.max_step; did you mean train.max_steps?"),
    "wrong type": (["train.batch_size=two"], 'train.batch_size expects an integer, got "two"'),
    "rank 0": (["lora.rank=0"], "lora.rank = 0 is invalid: must be > 0"),
    "negative LR": (["optim.unet_lr=-1e-4"], "optim.unet_lr = -0.0001 is invalid: must be >= 0"),
    "batch larger than the dataset": (["train.batch_size=5"], "train.batch_size = 5 is larger than the 4 samples"),
    "model path missing": (["model.path=/nonexistent/m.safetensors"], "'/nonexistent/m.safetensors' does not exist"),
    "data dir missing": (["data.dir=/nonexistent/images"], "data.dir = '/nonexistent/images' is not a folder"),
    "LoRA as base model": ("a_lora.safetensors", "is a LoRA file (132 modules), not a base model"),
    "truncated safetensors": ("truncated.safetensors", "truncated: "),
    "missing keys": ("missing.safetensors", "1 missing (model.diffusion_model.input_blocks.1.0.in_layers.0.weight)"),
    "wrong shapes": ("shape.safetensors", "has shape [3, 3], expected [32]"),
    "pickle without the flag": ("tiny.ckpt", "is a pickle file, which can run code when loaded"),
    "pickle that runs code, flag given": (_pickle_with_code, "cannot be read with weights_only=True"),
    "save.name leaves the output folder": (["save.name=../evil"], 'save.name = "../evil" is invalid'),
    "save.name with a backslash": (["save.name=..\\evil"], "save.name = "),
    "preview size not a multiple of 32": (["sample.size=[120, 120]", "sample.every_n_steps=1", "sample.prompts=[\"a cat\"]"],
                                          "size 120x120 is invalid for sdxl-tiny"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2(root, tmp_path, capsys, case):
    spec, expected = BAD_INPUT[case]
    if callable(spec):
        args = spec(root, tmp_path)
    elif isinstance(spec, str):
        args = [f"model.path={root / spec}"]
    else:
        args = spec
    config = root / "run.toml"
    if args and args[0] == "--config":
        config, args = args[1], args[2:]
    before = _tree(root.parent, root / "cache")
    code, _, err = _eri(capsys, config, *args, f"save.output_dir={tmp_path / 'out'}")
    assert code == 2, err
    assert expected in _one_line(err)
    assert not (tmp_path / "PWNED").exists()  # the pickle's code never ran
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    assert _tree(root.parent, root / "cache") == before  # nothing written anywhere (../evil included)


def _tree(folder: Path, but: Path) -> list[Path]:
    """Every path below `folder` except the content-addressed cache `but`."""
    return sorted(p for p in folder.rglob("*") if not p.is_relative_to(but))


def _missing_caption(d: Path) -> None:
    (d / "shape_001.txt").unlink()


def _empty_caption(d: Path) -> None:
    (d / "shape_001.txt").write_text("  \n")


def _non_utf8_caption(d: Path) -> None:
    (d / "shape_001.txt").write_bytes(b"a caf\xe9 in Latin-1")


def _corrupt_image(d: Path) -> None:
    data = (d / "shape_002.png").read_bytes()
    (d / "shape_002.png").write_bytes(data[: len(data) // 2])


COUNTED = {  # case: (damage, a line of the start summary)
    "missing caption": (_missing_caption, "captions: 3 caption file (.txt), 1 file stem"),
    "empty caption": (_empty_caption, "captions: 3 caption file (.txt), 1 file stem"),
    "non-UTF-8 caption": (_non_utf8_caption, "not UTF-8 (byte 5), undecodable bytes replaced"),
    "corrupt image": (_corrupt_image, "3 images used (3 samples per epoch), 1 skipped"),
}


@pytest.mark.parametrize("case", list(COUNTED))
def test_bad_item_is_counted_in_the_summary_and_training_runs(root, tmp_path, capsys, case):
    damage, expected = COUNTED[case]
    data = _images_dir(tmp_path)
    damage(data)
    code, out, err = _eri(capsys, root / "run.toml", f"data.dir={data}", f"save.output_dir={tmp_path / 'out'}",
                          "train.max_steps=1", "train.batch_size=1")  # fmt: skip
    assert code == 0 and "Traceback" not in err, err
    assert expected in out
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_pickle_checkpoint_with_the_flag_is_read_weights_only(root, tmp_path, capsys, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    code, out, err = _eri(capsys, root / "run.toml", f"model.path={root / 'tiny.ckpt'}", "model.allow_pickle=true",
                          f"save.output_dir={tmp_path / 'out'}", "train.max_steps=1")  # fmt: skip
    assert code == 0, err
    assert calls == [True]
    assert "model: sdxl-tiny" in out


# ---------------------------------------------------------------- 2. faults during training


def _patch_unet(monkeypatch, fault):
    """UNet.forward, except that call n (1-based) returns fault(n, output) or raises it."""
    real, calls = UNet.forward, [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        return fault(calls[0], real(self, *args, **kwargs))

    monkeypatch.setattr(UNet, "forward", forward)


@pytest.mark.parametrize("fused", [False, True], ids=["check-then-step", "fused-skips-on-device"])
def test_nonfinite_loss_skips_the_step_then_stops_with_a_saved_state(root, tmp_path, capsys, monkeypatch, fused):
    """Fused AdamW (the CUDA default) is told `found_inf` and skips on the device, the check after
    the update is queued; foreach AdamW (the CPU default) is checked first. Same outcome."""
    nan_calls = {2} | set(range(5, 100))  # one NaN step, two good ones, then NaN for good
    _patch_unet(monkeypatch, lambda n, out: out * float("nan") if n in nan_calls else out)
    from eridiffusion.train.step import TrainStep

    after, real_after = [], TrainStep._step_then_check
    monkeypatch.setattr(TrainStep, "_step_then_check", lambda self, *a: after.append(1) or real_after(self, *a))
    out_dir = tmp_path / "out"
    code, out, err = _eri(capsys, root / "run.toml", f"save.output_dir={out_dir}", "train.max_nonfinite=3",
                          *(["optim.args={fused = true}"] if fused else []))  # fmt: skip
    assert len(after) == (7 if fused else 0)  # 3 good steps, 4 skipped
    assert code == 1
    line = _one_line(err)
    assert "loss was NaN/inf in 3 steps in a row after step 3 (4 skipped in all)" in line
    assert "train.max_nonfinite" in line and "train.resume=true" in line
    assert "step 2: loss nan, gradient norm nan: step skipped (1 in a row, 1 in all)" in out
    meta, tensors = load_state(out_dir / "state")
    assert meta["step"] == 3 and [h[0] for h in meta["history"]] == [1, 2, 3]
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith(("lora.", "optim.")))
    steps = {float(v) for k, v in tensors.items() if k.endswith(".step")}
    assert steps == {3.0}  # AdamW stepped 3 times: the 4 skipped steps made no update
    assert (out_dir / "lora-step3.safetensors").is_file() and not (out_dir / "lora.safetensors").exists()


def test_nonfinite_from_the_first_step_does_not_promise_a_state():
    guard = faults.NonFiniteGuard(2)
    assert not guard.observe(False) and not guard.observe(False) and guard.exhausted
    line = str(guard.error(0, Path("out/state")))
    assert "after step 0 (2 skipped in all); no step completed, nothing saved:" in line
    assert line.endswith("then run again") and "resume" not in line


def test_cuda_oom_gives_one_line_advice_and_keeps_the_state(root, tmp_path, capsys, monkeypatch):
    def oom(n, out):
        if n == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return out

    _patch_unet(monkeypatch, oom)
    out_dir = tmp_path / "out"
    code, _, err = _eri(capsys, root / "run.toml", f"save.output_dir={out_dir}")
    assert code == 1
    line = _one_line(err)
    assert line.startswith("eri train: out of GPU memory in step 3: lower train.batch_size (now 2;")
    assert "train.gradient_checkpointing=true" in line and "train.resume=true" in line
    assert load_state(out_dir / "state")[0]["step"] == 2


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_files(root, tmp_path, capsys, monkeypatch):
    real, calls = lora_files.save_file, [0]

    def fill_disk(tensors, filename, metadata=None):
        calls[0] += 1
        if calls[0] == 2:  # the second LoRA save (step 6) runs out of space halfway
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(lora_files, "save_file", fill_disk)
    out_dir = tmp_path / "out"
    code, _, err = _eri(capsys, root / "run.toml", f"save.output_dir={out_dir}", "train.max_steps=8")
    assert code == 1
    line = _one_line(err)
    assert line.startswith(f"eri train: {out_dir / 'lora-step6.safetensors'}: disk full while saving (")
    assert "the previous file is kept" in line
    assert networks.load_lora(out_dir / "lora-step3.safetensors")[1]["ss_steps"] == "3"
    assert load_state(out_dir / "state")[0]["step"] == 3
    assert not (out_dir / "lora-step6.safetensors").exists()
    assert not [p for p in out_dir.rglob("*.tmp")]


def test_atomic_write_keeps_the_old_file_and_gives_normal_permissions(tmp_path):
    path = tmp_path / "x.txt"
    write_text(path, "old")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600

    def torn(tmp):
        Path(tmp).write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(faults.DiskFull, match=r"x\.txt: disk full while saving .* the previous file is kept"):
        atomic_write(path, torn)
    with pytest.raises(RuntimeError):
        atomic_write(path, lambda tmp: (_ for _ in ()).throw(RuntimeError("boom")))
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_every_output_file_gets_the_usual_permissions(root, reference):
    """LoRA, state, loss files and the cache: 0666 minus the umask (0644), readable by a ComfyUI
    running as another user; mkstemp alone would leave 0600."""
    umask = os.umask(0o022)
    os.umask(umask)
    out = root / "reference"
    files = [p for p in [*out.rglob("*"), *(root / "cache").rglob("*")] if p.is_file()]
    assert {p.name for p in out.iterdir()} >= {"lora.safetensors", "loss.csv", "loss.png", "config.toml"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


# ---------------------------------------------------------------- subprocesses: signals and kill -9


def _spawn(root, out: Path, *extra, env=None, wrapper=None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "eridiffusion.cli"]
    cmd += ["train", str(root / "run.toml"), f"save.output_dir={out}", *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, text=True,
        # the reference run's thread count: CPU sums are only bit-identical with the same split
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell job ignores it
    )  # fmt: skip


def _wait(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("the run did not get there in time")
        time.sleep(0.01)


def _rows(out: Path) -> int:
    try:
        return len((out / "loss.csv").read_text().splitlines()) - 1
    except FileNotFoundError:
        return 0


def _saved_step(out: Path) -> int:
    try:
        return json.loads((out / "state" / "state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_saves_and_resume_continues(root, reference, tmp_path, capsys, sig, code):
    out = tmp_path / "out"
    proc = _spawn(root, out)
    _wait(proc, lambda: _rows(out) >= 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    step = _saved_step(out)
    assert 2 <= step < STEPS
    assert err.strip().splitlines()[-1].startswith(f"eri train: stopped by {signal.Signals(sig).name} after step {step};")
    assert networks.load_lora(out / f"lora-step{step}.safetensors")[1]["ss_steps"] == str(step)
    assert _history(out) == reference[0][:step]
    # resuming continues exactly where it stopped
    assert _eri(capsys, root / "run.toml", f"save.output_dir={out}", "train.resume=true")[0] == 0
    assert _history(out) == reference[0] and _csv(out) == reference[1]


def test_kill_9_then_resume_equals_the_uninterrupted_run(root, reference, tmp_path):
    out = tmp_path / "out"
    proc = _spawn(root, out)
    _wait(proc, lambda: _saved_step(out) >= EVERY)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = _saved_step(out)
    assert EVERY <= saved < STEPS
    resumed = _spawn(root, out, "train.resume=true")
    log, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resumed from {out / 'state'} at step {saved}" in log
    assert _history(out) == reference[0]  # full-precision losses (JSON), bit-exact
    assert _csv(out) == reference[1]  # and loss.csv row for row


FREEZE_MID_WRITE = r"""
import os, sys, time
import safetensors.torch as st

real = st.save_file


def frozen(tensors, filename, metadata=None):  # write, tear the file in half, then hang until killed
    real(tensors, filename, metadata=metadata)
    if os.environ["ERI_TEST_BLOCK"] in os.path.basename(filename):
        os.truncate(filename, os.path.getsize(filename) // 2)
        open(os.environ["ERI_TEST_MARK"], "w").close()
        time.sleep(120)


st.save_file = frozen
from eridiffusion.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_save_keeps_the_previous_files(root, reference, tmp_path, capsys):
    out, mark = tmp_path / "out", tmp_path / "mark"
    block = f"state-step{2 * EVERY}."  # the second state save
    proc = _spawn(root, out, env={"ERI_TEST_BLOCK": block, "ERI_TEST_MARK": str(mark)}, wrapper=FREEZE_MID_WRITE)
    _wait(proc, mark.exists)
    proc.kill()
    proc.communicate(timeout=60)
    state = out / "state"
    temps = [p.name for p in state.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].startswith(f".{block}")  # the torn write, under a hidden temp name
    assert sorted(p.name for p in state.iterdir() if not p.name.endswith(".tmp")) == [
        f"state-step{EVERY}.safetensors", "state.json"]  # fmt: skip
    meta, tensors = load_state(state)  # the previous state loads
    assert meta["step"] == EVERY and len(tensors) > 0
    for s in (EVERY, 2 * EVERY):  # LoRA files are written before the state, both complete
        assert networks.load_lora(out / f"lora-step{s}.safetensors")[1]["ss_steps"] == str(s)
    code, log, err = _eri(capsys, root / "run.toml", f"save.output_dir={out}", "train.resume=true")
    assert code == 0, err
    assert f"removed {state / temps[0]}, a partial write of a killed run" in log
    assert _history(out) == reference[0]
    assert not [p for p in out.rglob("*.tmp")]


# ---------------------------------------------------------------- 4. security


def test_captions_are_data_never_code_or_paths(root, tmp_path, capsys):
    data = _images_dir(tmp_path)
    nasty = {
        "shape_000.txt": "{__import__('os').system('touch " + str(tmp_path / "PWNED") + "')}",
        "shape_001.txt": "../../etc/passwd",
        "shape_002.txt": "%s%n%x %(name)s {0} $(touch " + str(tmp_path / "PWNED2") + ")",
        "shape_003.txt": "/etc/passwd\0nul",
    }
    for name, text in nasty.items():
        (data / name).write_text(text, encoding="utf-8")
    bucket = BucketConfig(resolution=64, step=32, min_side=64, max_side=128)
    assert sorted(it.caption for it in build_dataset(data, bucket).items) == sorted(nasty.values())
    out, cache = tmp_path / "out", tmp_path / "cache"
    before = {p for p in tmp_path.rglob("*")}
    code, _, err = _eri(capsys, root / "run.toml", f"data.dir={data}", f"save.output_dir={out}",
                        f"cache.dir={cache}", "save.name=%s%n{0}", "train.max_steps=1")  # fmt: skip
    assert code == 0, err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED2").exists()
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(out) or p.is_relative_to(cache) for p in new), new
    assert (out / "%s%n{0}.safetensors").is_file()  # the name is used as given, never formatted
    texts = list((cache / "text").rglob("*.safetensors"))
    assert len(texts) == 4 and all(len(p.stem) == 64 for p in texts)  # captions reach files only as sha256 keys


def test_an_earlier_run_is_never_overwritten_without_the_flag_or_resume(root, tmp_path, capsys):
    out = tmp_path / "out"
    run = [root / "run.toml", f"save.output_dir={out}", "train.max_steps=1"]
    assert _eri(capsys, *run)[0] == 0
    first = (out / "lora.safetensors").read_bytes()
    code, _, err = _eri(capsys, *run, "optim.unet_lr=5e-3")
    assert code == 2
    assert f"save.output_dir = '{out}' already holds lora.safetensors from an earlier run: pass --overwrite" in (
        _one_line(err))  # fmt: skip
    assert (out / "lora.safetensors").read_bytes() == first
    assert _eri(capsys, *run, "train.max_steps=2", "train.resume=true")[0] == 0  # the resume flow may
    assert _saved_step(out) == 2
    resumed = (out / "lora.safetensors").read_bytes()
    assert resumed != first
    code, _, err = _eri(capsys, "--overwrite", *run, "optim.unet_lr=5e-3")
    assert code == 0, err
    assert (out / "lora.safetensors").read_bytes() not in (first, resumed) and _saved_step(out) == 1


def test_exclusive_atomic_write_never_replaces_and_leaves_no_temp(tmp_path):
    from eridiffusion.io import atomic_write

    target = tmp_path / "00000-a.png"
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"first"), exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"second"), exclusive=True)
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-a.png"]
