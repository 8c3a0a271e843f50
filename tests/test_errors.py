"""Every error a user can cause is one `UserError` line from `eri`, for every command."""

import errno

import pytest

from eridiffusion import errors, faults
from eridiffusion.cli import main
from eridiffusion.tiny import demo_config, prepare


def _config_file(tmp_path, **sections):
    prepare(tmp_path, n_images=4, log=lambda s: None)
    cfg = demo_config(tmp_path, 2).replace(save={"output_dir": str(tmp_path / "out")}, sample={"every_n_steps": 0},
                                           **sections)  # fmt: skip
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    return path


def test_every_user_error_subclasses_one_base():
    from eridiffusion import checkpoint, config, data, weights
    from eridiffusion.data import dataset

    for cls in (config.ConfigError, weights.WeightNotFound, weights.ShapeMismatch, weights.NotACheckpoint,
                checkpoint.NotAModel, errors.LoRAError, faults.DiskFull, faults.OutOfMemory, dataset.DatasetError,
                errors.PipelineError):  # fmt: skip
        assert issubclass(cls, errors.UserError), cls
    assert data is not None


def test_unet_targets_matching_nothing_is_one_line(tmp_path, capsys):
    """Before: a traceback from train.py → lora.py, not caught in cli.py."""
    path = _config_file(tmp_path)
    code = main(["train", str(path), 'lora.unet_targets=["*.no_such_layer"]'])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # above it: the cache's progress bars
    assert code == 2 and "Traceback" not in err
    assert line.startswith("eri train: ") and "no_such_layer" in line, err


def test_disk_full_in_eri_cache_is_one_line(tmp_path, capsys, monkeypatch):
    """Before: `eri cache` let the OSError through."""
    from eridiffusion import io

    path = _config_file(tmp_path)

    real_write = io.atomic_write

    def full(path, write, exclusive=False):  # the disk fills while the entry is written
        def fail(tmp):
            raise OSError(errno.ENOSPC, "No space left on device", tmp)

        return real_write(path, fail, exclusive)

    monkeypatch.setattr(io, "atomic_write", full)
    code = main(["cache", str(path)])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err
    assert line.startswith("eri cache: ") and "disk full" in line, err


def test_a_bug_keeps_its_traceback(monkeypatch):
    from eridiffusion import cli

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "inspect", cli.COMMANDS["inspect"].__class__("inspect", "x", boom, ()))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect"])
