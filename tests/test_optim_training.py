"""Every optimizer whose library runs on the CPU trains the tiny demo model's LoRA through the real
trainer (issue 21's proof): 100 steps lower the fixed evaluation loss below 0.8× the base model's,
and a run stopped at step 50 and resumed from its state repeats the 100 losses and weights bit for bit.

Runs at 64² (a quarter of the demo's work per step) on 4 images, one cache for every run. Each
optimizer's LR and arguments are a sensible setting for a 100-step LoRA run (see CASES); the
eval ratios they reach are in the comments (torch 2.13 CPU).

Left out: torchao's `adamw8bit` (backend torchao) and `adamw4bit`. torchao compiles its step per
parameter shape: a cold 100-step run took 127 s (8-bit) and 108 s (4-bit) on a 2-core CPU, ~30 s
once the inductor cache is warm. Their exact state round trip is tests/test_optim.py
(`test_state_round_trips_bit_exactly[adamw8bit]` / `[adamw4bit]`,
`test_low_bit_states_stay_quantized_after_loading`); they train on the GPU as `-m gpu` tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from eridiffusion.tiny import demo_config
from eridiffusion.train import train

STEPS, STOP = 100, 50
DEMO_IMAGES = 4  # the `root` fixture's dataset (tests/conftest.py)
RESOLUTION = 64
ONE_LR = {"unet_lr": 1.0, "text_encoder_lr": 1.0}  # Prodigy: the LR multiplies its own estimate d
KOHYA_ADAFACTOR = {"scale_parameter": False, "relative_step": False, "warmup_init": False}

# name → [optim] section over the demo's (AdamW, LR 2e-3, cosine, 5 warmup steps, no weight decay)
CASES = {
    "adamw": {},  # 0.51
    "adam": {"optimizer": "adam"},  # 0.51
    "sgd": {"optimizer": "sgd", "unet_lr": 1.0},  # 0.38 (0.5: 0.54; plain SGD's steps are gradient-sized)
    # bitsandbytes keeps 32-bit states for tensors under min_8bit_size (4096): every tiny LoRA matrix
    # but a few. 0 quantizes them all, so this is the 8-bit path. 0.51
    "adamw8bit": {"optimizer": "adamw8bit", "args": {"backend": "bitsandbytes", "min_8bit_size": 0}},
    # d starts at 1e-6 and grows ~7000× in the first ~40 steps; the cosine decay keeps the late steps
    # in check (schedule "constant": 0.90, the loss bounces back up from 0.60 at step 40).
    # kohya's recipe (d_coef 2, use_bias_correction, safeguard_warmup) keeps d near 1e-6 for these
    # 100 steps: 1.00. 0.34 (d_coef 1: 0.37)
    "prodigy": {"optimizer": "prodigy", **ONE_LR, "args": {"d_coef": 0.5}},
    # torch's Adafactor scales its step by max(1e-3, RMS(weight)), and the LoRA up matrices start at
    # zero: its documented LR 1e-2 barely moves them (1.00 after 100 steps). 0.62 (0.3: 0.24)
    "adafactor": {"optimizer": "adafactor", "unet_lr": 0.1},
    # kohya's recipe: transformers' rule at a fixed LR. 0.53
    "adafactor_kohya": {"optimizer": "adafactor", "unet_lr": 1e-3, "schedule": "constant", "args": KOHYA_ADAFACTOR},
    # Lion's sign steps: half AdamW's LR here (1/3, 6e-4: 0.81; 3e-4: 0.94 in 100 steps). 0.64
    "lion": {"optimizer": "lion", "unet_lr": 1e-3},
    "schedulefree_adamw": {"optimizer": "schedulefree_adamw", "schedule": "constant"},  # 0.45
    "came": {"optimizer": "came", "unet_lr": 2e-4},  # 0.34
}


def _cfg(root, out, optim):
    cfg = demo_config(root, STEPS)
    return cfg.replace(
        data={"resolution": RESOLUTION, "bucket_min": 64, "bucket_max": 128, "flip": False, "caption_dropout": 0.0},
        optim=optim,
        save={"output_dir": str(root / out), "every_n_steps": 0},
        sample={"every_n_steps": 0},
        cache={"dir": str(root / "cache")},
    )  # fmt: skip


def _lora_weights(result):
    return {f"{part}.{k}": v for part, net in result.networks.items() for k, v in net.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_optimizer_trains_the_lora_and_resumes_bit_exactly(root, name, eval_loss):
    quiet = {"progress": False, "log": lambda s: None}
    reference = train(_cfg(root, f"{name}/full", CASES[name]), **quiet)
    before = eval_loss(reference, root, 0.0, RESOLUTION)  # multiplier 0: the base model
    after = eval_loss(reference, root, 1.0, RESOLUTION)
    print(f"{name}: eval loss before {before:.4f}, after {after:.4f}, ratio {after / before:.3f}")
    assert len(reference.losses) == STEPS and all(map(math.isfinite, reference.losses))
    assert after < 0.8 * before, name

    cfg = _cfg(root, f"{name}/resumed", CASES[name])
    first = train(cfg, stop_after=STOP, **quiet)
    assert first.interrupted and first.step == STOP
    second = train(cfg, resume_dir=root / name / "resumed" / "state", **quiet)
    assert second.step == STEPS and not second.interrupted
    assert second.losses == reference.losses, name  # the saved 50 and the resumed 50, bit for bit
    ref, got = _lora_weights(reference), _lora_weights(second)
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        assert torch.equal(got[k], v), (name, k)
