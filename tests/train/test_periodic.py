"""Saves, kohya metadata, validation loss and previews of a run (CPU, tiny demo model).

One 8-step run (module fixture) with a held-out quarter, validation every 2 steps, saves every
3 steps and every epoch (4 steps: two buckets of 3 images, batch 2) with keep_last = 2, and a
step-0 grid; a second run without
previews must give the same validation losses.
"""

import csv
import json
import signal
import sys
from collections import Counter

import pytest
from safetensors import safe_open

from eridiffusion.config import ConfigError
from eridiffusion.data.dataset import build_datasets
from eridiffusion.tiny import demo_config
from eridiffusion.train import train
from eridiffusion.config import TrainConfig
from eridiffusion.train.metadata import dataset_metadata
from eridiffusion.train.previews import Previews
from eridiffusion.train.validation import split_validation, validation_timesteps

STEPS = 8


def _cfg(root, out, previews=True, **sections):
    sample = {"prompts": ["a red circle --d 3 --s 2"], "size": [64, 64], "steps": 2, "every_n_steps": 4,
              "at_start": True} if previews else {"prompts": [], "every_n_steps": 0}  # fmt: skip
    base = {"data": {"validation_split": 0.25}, "sample": sample, "cache": {"dir": str(root / "cache")},
            "save": {"output_dir": str(root / out), "every_n_steps": 3, "every_n_epochs": 1, "keep_last": 2},
            "log": {"every": 2, "validation_every_n_steps": 2}}  # fmt: skip
    return demo_config(root, STEPS).replace(**{k: {**base.get(k, {}), **sections.get(k, {})} for k in {*base, *sections}})


@pytest.fixture(scope="module")
def run(root):
    logged = []
    result = train(_cfg(root, "a"), progress=False, log=logged.append)
    return result, logged


def _loss_csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_keep_last_and_every_n_epochs(run):
    result, logged = run
    out = result.output_dir
    assert sorted(p.name for p in out.glob("lora-step*.safetensors")) == ["lora-step4.safetensors", "lora-step6.safetensors"]
    # saved at 3, 4 (the end of epoch 1) and 6; 8 is the final file
    deleted = [line for line in logged if "save.keep_last" in line]
    assert [d.rsplit("/", 1)[1] for d in deleted] == ["lora-step3.safetensors"]
    assert (out / "lora.safetensors").is_file()


def test_validation_loss_in_loss_csv_and_deterministic(root, run):
    rows = _loss_csv(run[0].output_dir / "loss.csv")
    assert list(rows[0])[:4] == ["step", "loss", "lr", "time"] and list(rows[0])[4] == "val_loss"
    measured = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    assert sorted(measured) == [2, 4, 6, 8]
    again = train(_cfg(root, "b", previews=False), progress=False, log=lambda s: None)
    rows_b = _loss_csv(again.output_dir / "loss.csv")
    assert {int(r["step"]): float(r["val_loss"]) for r in rows_b if r["val_loss"]} == measured  # previews draw nothing
    assert [r["loss"] for r in rows_b] == [r["loss"] for r in rows]


def test_previews_at_start_and_labelled(run):
    samples = run[0].output_dir / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == ["step000000.png", "step000004.png", "step000008.png"]


def test_kohya_metadata(root, run):
    with safe_open(str(run[0].lora_path), "pt") as f:
        meta = f.metadata()
    dataset = build_datasets(_cfg(root, "a").data)
    train_ds, val_ds = split_validation(dataset, 0.25, 0)
    tags = Counter(t.strip().lower() for item in train_ds.items for t in item.caption.split(",") if t.strip())
    assert json.loads(meta["ss_tag_frequency"]) == {"data": dict(tags)}  # kohya counts the training images
    assert json.loads(meta["ss_dataset_dirs"]) == {"data": {"n_repeats": 1, "img_count": 6}}
    expected = {"ss_num_train_images": "6", "ss_num_validation_images": "2", "ss_learning_rate": "0.002",
                "ss_unet_lr": "0.002", "ss_text_encoder_lr": "None", "ss_lr_scheduler": "cosine",
                "ss_max_train_steps": "8", "ss_seed": "0", "ss_output_name": "lora", "ss_resolution": "(128, 128)",
                "ss_sd_model_name": "tiny_sdxl.safetensors", "ss_noise_offset": "None", "ss_steps": "8",
                "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.0,betas=(0.9, 0.999),eps=1e-08)",
                "ss_num_batches_per_epoch": "4", "ss_validation_split": "0.25"}  # fmt: skip
    assert {k: meta[k] for k in expected} == expected
    assert float(meta["ss_training_started_at"]) > 1.7e9


def test_validation_split_is_kohyas(root):
    dataset = build_datasets(_cfg(root, "a").data)
    a, va = split_validation(dataset, 0.25, 0)
    b, vb = split_validation(dataset, 0.25, 0)
    assert [i.path for i in va.items] == [i.path for i in vb.items] and len(va) == 2 and len(a) == 6
    _, other = split_validation(dataset, 0.25, 1)
    assert [i.path for i in other.items] != [i.path for i in va.items]
    with pytest.raises(ConfigError, match="holds out 0 of 8 images"):
        split_validation(dataset, 0.01, 0)
    assert validation_timesteps() == [200, 400, 600, 800]


def test_keyboard_interrupt_in_a_preview_saves_the_state(root, monkeypatch):
    def interrupted(self, step, writer=None, stop=None):
        if step == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(Previews, "__call__", interrupted)
    cfg = _cfg(root, "c", sample={"prompts": ["x"], "every_n_steps": 2, "at_start": False},
               save={"every_n_steps": 2, "every_n_epochs": 0})
    result = train(cfg, progress=False, log=lambda s: None)
    assert result.interrupted and result.step == 2 and result.stop_signal == signal.SIGINT
    assert (result.output_dir / "state").is_dir() and (result.output_dir / "lora-step2.safetensors").is_file()


def test_wandb_missing_is_one_line(root, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"^log.wandb = true needs wandb: pip install 'eridiffusion\[log\]'"):
        train(_cfg(root, "d", log={"wandb": True}), progress=False, log=lambda s: None)


def test_tag_frequency_and_dirs_as_kohya(tmp_path):
    from PIL import Image

    captions = {"10_alice/a": "1girl, Red hair,smile", "10_alice/b": "1girl, red hair, 1girl", "10_alice/c": "",
                "3_bob/d": "1boy, smile", "reg/1_person/e": "a person"}  # fmt: skip
    for stem, caption in captions.items():
        (tmp_path / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), "gray").save(tmp_path / f"{stem}.png")
        if caption:
            (tmp_path / f"{stem}.txt").write_text(caption, encoding="utf-8")
    data = {"dir": str(tmp_path / "train"), "resolution": 64, "bucket_step": 32, "bucket_min": 64, "bucket_max": 64,
            "subsets": [{"dir": str(tmp_path / "reg"), "is_reg": True}]}  # fmt: skip
    (tmp_path / "train").mkdir()
    for d in ("10_alice", "3_bob"):
        (tmp_path / d).rename(tmp_path / "train" / d)
    meta = dataset_metadata(build_datasets(TrainConfig.from_dict({"data": data}).data))
    # kohya's set_tag_frequency: split on ",", stripped, lower-cased, every occurrence; "" has none
    # (c has no caption file: the N_name folder's name "alice" is its caption)
    assert json.loads(meta["ss_tag_frequency"]) == {"10_alice": {"1girl": 3, "red hair": 2, "smile": 1, "alice": 1},
                                                    "3_bob": {"1boy": 1, "smile": 1}, "1_person": {"a person": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_alice": {"n_repeats": 10, "img_count": 3},
                                                   "3_bob": {"n_repeats": 3, "img_count": 1}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 33, "img_count": 1}}
    assert meta["ss_num_train_images"] == 33 and meta["ss_num_reg_images"] == 33
