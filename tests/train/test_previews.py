"""Preview prompts with kohya's options, the labelled grid, and stopping a preview (CPU, tiny SDXL layout)."""

import numpy as np
import pytest
from PIL import Image

from eridiffusion import checkpoint
from eridiffusion.config import ConfigError, SampleConfig, TrainConfig
from eridiffusion.pipeline import Pipeline
from eridiffusion.prompts import PromptSpec, parse_prompt, read_prompt_file
from eridiffusion.train.previews import PreviewStopped, Previews, Row, label_grid


def test_parse_prompt_options():
    spec = parse_prompt("a cat, sitting --n blurry, low quality --W 832 --h 1216 --s 2000 --l 5.5 --d 42 --ss k_euler_a")
    assert spec == PromptSpec("a cat, sitting", negative="blurry, low quality", width=832, height=1216, steps=1000,
                              cfg=5.5, seed=42, sampler="euler_a")  # fmt: skip
    assert parse_prompt("plain") == PromptSpec("plain")
    for bad, words in [("x --q 3", "unknown option --q"), ("x --w 100", "multiple of 8"), ("x --d seven", "not an integer"),
                       ("x --ss lms", "--ss lms is unknown"), (" --n y", "no prompt")]:  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            parse_prompt(bad)


def test_prompt_file_and_config(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# kohya prompt file\n\na dog --d 3\n  \n#skip --w 3\na bird --n cat --s 7\n", encoding="utf-8")
    assert read_prompt_file(f) == [PromptSpec("a dog", seed=3), PromptSpec("a bird", negative="cat", steps=7)]
    (tmp_path / "bad.txt").write_text("a --w x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.txt:1: --w 'x' is not an integer"):
        read_prompt_file(tmp_path / "bad.txt")
    with pytest.raises(ConfigError, match=r"sample.prompts\[1\]: unknown option --zz"):
        TrainConfig.from_dict({"sample": {"prompts": ["ok", "a --zz 1"]}})
    c = SampleConfig(negative="bad", seeds=(1, 2), steps=9, cfg=4.0, size=(64, 32))
    assert Row.of(PromptSpec("p"), c) == Row("p", "bad", (64, 32), 9, 4.0, "euler", (1, 2))
    assert Row.of(PromptSpec("p", "", 96, None, 3, 0.0, 7, "ddim"), c) == Row("p", "", (96, 32), 3, 0.0, "ddim", (7,))


def test_label_grid_is_taller_than_the_bare_grid():
    a, b = Image.new("RGB", (64, 32), "red"), Image.new("RGB", (96, 64), "blue")
    grid = label_grid([("a long prompt " * 12, [(a, "seed 1"), (a, "seed 2")]), ("short", [(b, "seed 7")])])
    assert grid.width == 128 and grid.height > 32 + 64
    dark = np.asarray(grid.convert("L")) < 80  # black text on the white label strips
    assert dark[:10].any() and dark.any(axis=1).sum() > 10


FAST = {"steps": 2}


def test_per_prompt_options_reach_the_sampler(tmp_path):
    c = checkpoint.tiny_components("sdxl-tiny", seed=0)
    cfg = SampleConfig(prompts=("a red circle --n blue --w 96 --h 64 --s 3 --d 5 --l 3 --ss euler_a", "a square"),
                       seeds=(1, 2), every_n_steps=1, size=(64, 32), **FAST)  # fmt: skip
    previews = Previews(c, cfg, tmp_path, encode_now=True)
    calls = []
    generate = previews.pipe.generate
    previews.pipe.generate = lambda *a, **k: calls.append((a[2:], k)) or generate(*a, **k)
    path = previews(3)
    assert [call[0] for call in calls] == [((5,), 3, 3.0, "euler_a", False, (96, 64)), ((1, 2), 2, 7.0, "euler", False, (64, 32))]
    with Image.open(path) as grid:
        assert grid.width == 128 and grid.height > 64 + 32  # labels above and below
        cell = np.asarray(grid.convert("RGB"))
    # the first row's image is the one the pipeline renders with the same options
    ref = Pipeline(checkpoint.tiny_components("sdxl-tiny", seed=0))("a red circle", negative="blue", steps=3, cfg=3.0,
                                                                    sampler="euler_a", seed=5, size=(96, 64))[0]  # fmt: skip
    ref = np.asarray(ref)
    rows = [y for y in range(cell.shape[0] - 64) if np.array_equal(cell[y : y + 64, :96], ref)]
    assert len(rows) == 1


class Bar:
    def __init__(self):
        self.descriptions = []

    def set_description(self, text):
        self.descriptions.append(text)


class Opt:
    import contextlib

    eval_mode = staticmethod(contextlib.nullcontext)


def test_stop_flag_ends_a_preview_at_once(tmp_path):
    c = checkpoint.tiny_components("sdxl-tiny", seed=0)
    previews = Previews(c, SampleConfig(prompts=("a", "b"), size=(64, 64), every_n_steps=1, **FAST), tmp_path, True)
    steps = []
    with pytest.raises(PreviewStopped):
        previews.render(stop=lambda: steps.append(1) or True)
    assert steps == [1]  # stopped at the first sampler step of the first prompt
    bar, logged = Bar(), []
    previews.during_training(4, Opt(), None, bar, lambda: True, logged.append)
    assert bar.descriptions == ["rendering previews", "train"] and logged == ["preview at step 4 stopped"]
    assert not (tmp_path / "samples").exists()
