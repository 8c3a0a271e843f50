"""TrainConfig: TOML loading, overrides, and one-line errors for every kind of mistake."""

import dataclasses
import os
import sys

import pytest

from eridiffusion.config import SECTIONS, ConfigError, TrainConfig, apply_overrides

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, text):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return str(path)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_toml_round_trip_and_types(tmp_path):
    path = _write(
        tmp_path,
        """
[model]
path = "m.safetensors"
dtype = "fp16"
[optim]
unet_lr = 1        # an integer is accepted for a float field
betas = [0.8, 0.95]
[sample]
prompts = ["a cat", "a dog"]
size = [832, 1216]
""",
    )
    cfg = TrainConfig.from_toml(path)
    assert cfg.model.dtype == "fp16"
    assert cfg.optim.unet_lr == 1.0 and isinstance(cfg.optim.unet_lr, float)
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.sample.prompts == ("a cat", "a dog") and cfg.sample.size == (832, 1216)
    assert cfg.lora == TrainConfig().lora  # untouched sections keep their defaults
    again = TrainConfig.from_dict(tomllib.loads(cfg.to_toml()))
    assert again == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora.rank = 4


def test_overrides_use_toml_values_and_bare_strings(tmp_path):
    path = _write(tmp_path, "[train]\nmax_steps = 10\n")
    cfg = TrainConfig.from_toml(
        path,
        [
            "train.max_steps=500",
            "train.gradient_checkpointing=true",
            "optim.unet_lr=3e-4",
            "optim.betas=[0.9, 0.99]",
            "model.path=/models/sd_xl_base_1.0.safetensors",  # bare word: a string
            "data.default_caption=a photo of sks",
            "save.name=123",  # a string field keeps the text even when it parses as a number
            'sample.negative="blurry"',
        ],
    )
    assert cfg.train.max_steps == 500 and cfg.train.gradient_checkpointing is True
    assert cfg.optim.unet_lr == 3e-4 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.model.path == "/models/sd_xl_base_1.0.safetensors"
    assert cfg.data.default_caption == "a photo of sks"
    assert cfg.save.name == "123" and cfg.sample.negative == "blurry"
    assert apply_overrides({"train": {"seed": 1}}, ["train.seed=2"]) == {"train": {"seed": 2}}


def test_unknown_key_names_the_nearest(tmp_path):
    msg = _error(TrainConfig.from_toml, _write(tmp_path, "[lora]\nrnak = 4\n"))
    assert "cfg.toml" in msg and "lora.rnak" in msg and "did you mean lora.rank?" in msg
    msg = _error(TrainConfig.from_dict, {"optimm": {}})
    assert "[optimm]" in msg and "did you mean optim?" in msg
    msg = _error(apply_overrides, {}, ["train.max_step=3"])
    assert "train.max_step" in msg and "did you mean train.max_steps?" in msg
    msg = _error(apply_overrides, {}, ["max_steps=3"])
    assert "section.field=value" in msg


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"lora": {"rank": "4"}}, 'lora.rank expects an integer, got "4"'),
        ({"lora": {"rank": 4.0}}, "lora.rank expects an integer, got 4.0"),
        ({"train": {"gradient_checkpointing": 1}}, "train.gradient_checkpointing expects true or false, got 1"),
        ({"model": {"dtype": "int8"}}, "model.dtype expects one of 'bf16', 'fp16', 'fp32', 'fp8', 'fp8_e4m3', 'fp8_e5m2', got \"int8\""),
        ({"optim": {"betas": [0.9]}}, "optim.betas expects a list of 2 numbers, got [0.9]"),
        ({"sample": {"prompts": "a cat"}}, 'sample.prompts expects a list of strings, got "a cat"'),
        ({"data": {"resolution": True}}, "data.resolution expects an integer, got true"),
    ],
)
def test_wrong_type_is_one_line(raw, expected):
    assert _error(TrainConfig.from_dict, raw, source="my.toml") == f"my.toml: {expected}"


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"lora": {"rank": 0}}, "lora.rank = 0"),
        ({"lora": {"alpha": -1}}, "lora.alpha = -1.0"),
        ({"optim": {"unet_lr": -1e-4}}, "optim.unet_lr = -0.0001"),
        ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas = [0.9, 1.0]"),
        ({"train": {"batch_size": 0}}, "train.batch_size = 0"),
        ({"train": {"grad_accum": -2}}, "train.grad_accum = -2"),
        ({"train": {"max_steps": 0, "epochs": 0}}, "train.max_steps = 0"),
        ({"train": {"device": "tpu"}}, 'train.device = "tpu"'),
        ({"train": {"device": "cuda:x"}}, 'train.device = "cuda:x"'),  # torch.device would raise a traceback
        ({"train": {"device": "cpu:"}}, 'train.device = "cpu:"'),
        ({"data": {"caption_dropout": 1.5}}, "data.caption_dropout = 1.5"),
        ({"data": {"resolution": 1004}}, "data.resolution = 1004"),
        ({"data": {"bucket_min": 96}}, "data.bucket_min = 96"),
        ({"data": {"bucket_max": 256}}, "data.bucket_max = 256"),
        ({"log": {"every": 0}}, "log.every = 0"),
        ({"train": {"compile_workers": -1}}, "train.compile_workers = -1"),
    ],
)
def test_impossible_value_names_the_field(raw, key):
    msg = _error(TrainConfig.from_dict, raw)
    assert msg.startswith(f"config: {key} is invalid: must be"), msg


def test_missing_paths_name_the_field(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    cfg = TrainConfig.from_dict({"model": {"path": str(model)}, "data": {"dir": str(tmp_path)}})
    cfg.check_paths()  # both exist
    msg = _error(cfg.replace(model={"path": str(tmp_path / "nope.safetensors")}).check_paths)
    assert msg.startswith("model.path = ") and "nope.safetensors" in msg and "does not exist" in msg
    msg = _error(cfg.replace(data={"dir": str(tmp_path / "no_images")}).check_paths)
    assert msg.startswith("data.dir = ") and "no_images" in msg
    assert _error(TrainConfig().check_paths).startswith("model.path is empty")
    msg = _error(TrainConfig.from_toml, str(tmp_path / "missing.toml"))
    assert "missing.toml" in msg and "not found" in msg
    msg = _error(TrainConfig.from_toml, _write(tmp_path, "[lora\nrank = 4"))
    assert "not valid TOML" in msg


@pytest.mark.parametrize("name", ["sdxl_lora.toml", "sd15_lora.toml", "demo.toml"])
def test_shipped_configs_load(name):
    cfg = TrainConfig.from_toml(os.path.join(ROOT, "configs", name))
    assert cfg.lora.rank > 0


def test_docs_list_every_field():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as f:
        doc = f.read()
    for section, cls in SECTIONS.items():
        assert f"[{section}]" in doc, section
        for fld in dataclasses.fields(cls):
            assert f"`{fld.name}`" in doc, f"{section}.{fld.name} is not documented"


def test_demo_toml_is_the_demo_config():
    from eridiffusion.tiny import demo_config

    assert TrainConfig.from_toml(os.path.join(ROOT, "configs", "demo.toml")) == demo_config("runs/demo")
