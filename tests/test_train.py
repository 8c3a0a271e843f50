"""The training loop end to end on the tiny SDXL-layout model (CPU).

One 100-step run (module fixture) is the reference: it must lower a fixed evaluation loss,
change only LoRA weights, and be reproduced bit-exactly by a run that is stopped at step 50
and resumed in a fresh `train()` call while the encoders are patched to fail (cache only).
"""

import csv
import json
import os
import signal

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from eridiffusion import checkpoint, diffusion, faults
from eridiffusion.cli import main
from eridiffusion.config import ConfigError
from eridiffusion.data.cache import TensorCache
from eridiffusion.families import FAMILIES
from eridiffusion.models.clip import CLIPTextModel, OpenCLIPTextModel
from eridiffusion.models.unet import UNet, UNetConfig, sdxl_vector
from eridiffusion.models.vae import AutoencoderKL
from eridiffusion.tiny import demo_config, make_dataset, prepare
from eridiffusion.train import build_cache, diffusion_loss, load_state, lr_factor, train

STEPS = 100


def _cfg(root, out, steps=STEPS, **sections):
    cfg = demo_config(root, steps)
    sections.setdefault("save", {})
    sections["save"] = {"output_dir": str(root / out), "every_n_steps": 0, **sections["save"]}
    sections.setdefault("sample", {"every_n_steps": 0})
    return cfg.replace(cache={"dir": str(root / "cache")}, **sections)


@pytest.fixture(scope="module")
def reference(root):
    """The uninterrupted run, and the evaluation loss of its LoRA before/after training."""
    result = train(_cfg(root, "full"), progress=False, log=lambda s: None)
    return result


def test_lr_schedule():
    assert [lr_factor(s, 10, 4, "constant") for s in (0, 3, 4, 9)] == [0.2, 0.8, 1.0, 1.0]
    assert lr_factor(4, 10, 4, "linear") == 1.0 and lr_factor(7, 10, 4, "linear") == 0.5
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, 0, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_training_lowers_a_fixed_evaluation_loss(root, reference, eval_loss):
    before = eval_loss(reference, root, 0.0)  # multiplier 0 = the base model
    after = eval_loss(reference, root, 1.0)
    print(f"eval loss before {before:.4f}, after {after:.4f}, ratio {after / before:.3f}")
    assert after < 0.8 * before
    assert len(reference.losses) == STEPS and all(map(torch.isfinite, torch.tensor(reference.losses)))


def test_only_lora_weights_change(root, reference):
    fresh = checkpoint.load(root / "tiny_sdxl.safetensors")
    trained = {k: v for k, v in reference.components.unet.state_dict().items() if "lora_" not in k}
    base = fresh.unet.state_dict()
    assert trained.keys() == base.keys()
    for k, v in base.items():
        assert torch.equal(trained[k], v), k
    ups = [m.lora_up.weight for m in reference.networks["unet"].loras.values()]
    assert all(bool(u.abs().max() > 0) for u in ups)  # every up matrix left its zero init
    with safe_open(str(reference.lora_path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys) and len(keys) == 3 * len(ups)
    assert meta["ss_steps"] == str(STEPS) and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_network_dim"] == "8" and meta["ss_num_train_images"] == "8"


def test_resume_is_bit_exact_and_uses_only_the_cache(root, reference, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran although everything is cached")

    monkeypatch.setattr(AutoencoderKL, "encode", refuse)
    monkeypatch.setattr(CLIPTextModel, "forward", refuse)
    monkeypatch.setattr(OpenCLIPTextModel, "forward", refuse)
    cfg = _cfg(root, "resumed")
    first = train(cfg, stop_after=50, progress=False, log=lambda s: None)
    assert first.interrupted and first.step == 50
    assert first.losses == reference.losses[:50]  # read from the cache: the same numbers
    second = train(cfg.replace(train={"resume": True}), progress=False, log=lambda s: None)
    assert second.step == STEPS and not second.interrupted
    assert second.losses == reference.losses  # bit-exact, all 100 steps
    for name, m in second.networks["unet"].loras.items():
        ref = reference.networks["unet"].loras[name]
        assert torch.equal(m.lora_up.weight, ref.lora_up.weight), name
    with open(root / "resumed" / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    state = json.loads((root / "resumed" / "state" / "state.json").read_text())
    assert state["step"] == STEPS and state["tensors"] == f"state-step{STEPS}.safetensors"
    files = sorted(p.name for p in (root / "resumed" / "state").iterdir())
    assert files == [f"state-step{STEPS}.safetensors", "state.json"]  # no pickle, old tensor files removed
    assert Image.open(root / "resumed" / "loss.png").size == (720, 400)


def test_build_cache_alone_then_hits(tmp_path):
    prepare(tmp_path, n_images=4, log=lambda s: None)
    cfg = demo_config(tmp_path, 1)
    first = build_cache(cfg, log=lambda s: None, progress=False)
    assert first.stats.writes == 4 * 2 + 4 + 1  # 4 images × 2 flips, 4 captions + the empty one
    again = build_cache(cfg, log=lambda s: None, progress=False)
    assert again.stats.writes == 0


def test_sd15_and_text_encoder_training(tmp_path):
    """SD1.5 conditioning (no pooled / time_ids) and SDXL te1/te2 LoRAs with encoders in the loop."""
    make_dataset(tmp_path / "data", n=4, seed=1)
    checkpoint.save(checkpoint.tiny_components("sd15-tiny", seed=1), tmp_path / "sd15.safetensors")
    cfg = demo_config(tmp_path, 3).replace(
        model={"path": str(tmp_path / "sd15.safetensors")},
        data={"bucket_step": 64, "bucket_min": 64, "flip": False, "repeats": 2},
        train={"prediction": "v_prediction", "min_snr_gamma": 5.0, "noise_offset": 0.05},
        save={"output_dir": str(tmp_path / "sd15")},
        sample={"every_n_steps": 0},
    )
    result = train(cfg, progress=False, log=lambda s: None)
    assert result.components.family.name == "sd15-tiny" and len(result.losses) == 3
    assert all(0 < v < 10 for v in result.losses)
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.prediction_type"] == "v_prediction"
    assert meta["ss_epoch"] == "0"  # 4 images × 2 repeats = 4 batches per epoch: still in the first after 3 steps

    checkpoint.save(checkpoint.tiny_components("sdxl-tiny", seed=1), tmp_path / "sdxl.safetensors")
    cfg = demo_config(tmp_path, 2).replace(
        model={"path": str(tmp_path / "sdxl.safetensors")},
        lora={"train_text_encoder": True},
        train={"grad_accum": 2},
        save={"output_dir": str(tmp_path / "te")},
        sample={"every_n_steps": 0},
    )
    result = train(cfg, progress=False, log=lambda s: None)
    with safe_open(str(result.lora_path), "pt") as f:
        prefixes = {k.split("_")[1] for k in f.keys()}
    assert prefixes == {"unet", "te1", "te2"}
    te1_ups = [m.lora_up.weight for m in result.networks["te1"].loras.values()]
    assert any(bool(u.abs().max() > 0) for u in te1_ups)


def test_eri_demo_smoke(tmp_path, capsys):
    """The whole `eri demo` path on the shipped shapes model, 4 steps (tests/tiny checks the scores)."""
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "lora.safetensors" in out.split("demo: concept")[0]  # the trainer's "saved ..." line
    assert 'demo: concept "a bar": ' in out and " before → " in out and "; controls: " in out
    for name in ("lora.safetensors", "loss.csv", "loss.png", "config.toml", "demo.json", "samples/before.png",
                 "samples/after.png", "data/concept/shape_000.png", "data/prior/shape_000.txt"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert main(["train", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: config file not found" in capsys.readouterr().err


def test_size_conditioning_is_embedded_in_fp32_whatever_the_text_dtype():
    """Live bf16 text encoders give a bf16 pooled; the time_ids must not be rounded to bf16
    before the sinusoid (orig_h 1237 would become 1240), as with cached fp32 text and at inference."""

    class Recorder(nn.Module):
        cfg = UNetConfig.tiny()

        def forward(self, x, t, context, y=None):
            self.y = y
            return x

    unet, g = Recorder(), torch.Generator().manual_seed(0)
    pooled = torch.randn(2, 64, generator=g).bfloat16()
    time_ids = torch.tensor([[1237.0, 901.0, 3.0, 5.0, 1024.0, 832.0]] * 2)  # (B, 6)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ac = diffusion.alphas_cumprod(diffusion.scaled_linear_betas())
    cond = {"context": torch.randn(2, 77, 96, generator=g).bfloat16(), "pooled": pooled}
    diffusion_loss(FAMILIES["sdxl-tiny"], unet, x0, cond, time_ids, torch.tensor([10, 500]), noise, ac, "epsilon")
    assert torch.equal(unet.y, sdxl_vector(pooled, time_ids, 32))


def _small(tmp_path, steps, **sections):
    prepare(tmp_path, n_images=4, log=lambda s: None)
    sections.setdefault("sample", {"every_n_steps": 0})
    return demo_config(tmp_path, steps).replace(save={"every_n_steps": 0}, **sections)


def test_a_stop_signal_during_the_last_step_still_writes_the_final_lora(tmp_path, monkeypatch):
    """The run is complete: the final LoRA is written and nothing is left to resume."""
    real, calls = UNet.forward, [0]

    def forward(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # step 3 of 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", forward)
    result = train(_small(tmp_path, 3), progress=False, log=lambda s: None)
    assert calls[0] == 3 and result.step == 3
    assert not result.interrupted and result.stop_signal == 0
    assert result.lora_path == tmp_path / "lora.safetensors" and result.lora_path.is_file()


def test_resume_takes_the_optim_settings_of_the_current_config(root):
    """The NaN advice says "lower optim.unet_lr, then resume": the lowered LR must be used
    (the saved param groups must not bring the old one back)."""
    cfg = _cfg(root, "relr", steps=4)
    first = train(cfg, stop_after=2, progress=False, log=lambda s: None)
    at_2 = {k: m.lora_up.weight.clone() for k, m in first.networks["unet"].loras.items()}
    second = train(cfg.replace(train={"resume": True}, optim={"unet_lr": 0.0}), progress=False, log=lambda s: None)
    assert second.step == 4
    for k, m in second.networks["unet"].loras.items():
        assert torch.equal(m.lora_up.weight, at_2[k]), k  # lr 0: AdamW moves nothing
    meta, _ = load_state(root / "relr" / "state")
    assert [g["base_lr"] for g in meta["optimizer"]["param_groups"]] == [0.0]
    # what cannot change on resume is one line naming the key
    with pytest.raises(ConfigError, match=r"train.seed = 7 .*saved run used 0"):
        train(cfg.replace(train={"resume": True, "seed": 7}), progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match=r"optim.optimizer = \"sgd\" .*saved run used \"adamw\""):
        train(cfg.replace(train={"resume": True}, optim={"optimizer": "sgd"}), progress=False, log=lambda s: None)


def test_resume_on_another_device_type_is_one_line(root):
    """A CUDA generator's state (16 bytes, Philox) cannot seed a CPU one: say so, no traceback."""
    from safetensors.torch import load_file, save_file

    cfg = _cfg(root, "devtype", steps=4)
    train(cfg, stop_after=2, progress=False, log=lambda s: None)
    (state,) = (root / "devtype" / "state").glob("state-step*.safetensors")
    tensors = load_file(state)
    names = [k for k in tensors if k.startswith("rng.gen.")]
    assert names
    tensors[names[0]] = torch.zeros(16, dtype=torch.uint8)  # what a CUDA run saves
    save_file(tensors, state)
    with pytest.raises(ConfigError, match="another device type than cpu"):
        train(cfg.replace(train={"resume": True}), progress=False, log=lambda s: None)


def test_text_encoder_lora_dropout_stays_on_after_a_preview(tmp_path):
    """Previews put the trained text encoders back in the mode they had: training mode."""
    cfg = _small(tmp_path, 2, lora={"train_text_encoder": True, "dropout": 0.1},
                 sample={"every_n_steps": 1, "steps": 2, "size": [64, 64], "seeds": [0]})  # fmt: skip
    result = train(cfg, progress=False, log=lambda s: None)
    assert (tmp_path / "samples" / "step000001.png").is_file()
    drops = [m for te in (result.components.te1, result.components.te2) for m in te.modules()
             if isinstance(m, nn.Dropout)]  # fmt: skip
    assert drops and all(m.training for m in drops)


def test_a_lost_cache_entry_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(TensorCache, "get", lambda self, kind, key: None)
    with pytest.raises(faults.FaultError) as info:
        train(_small(tmp_path, 2), progress=False, log=lambda s: None)
    message = str(info.value)
    assert "\n" not in message and "unreadable or missing" in message and "cache" in message


@pytest.mark.gpu
def test_cuda_bf16_with_checkpointing(tmp_path, eval_loss):
    """bf16 frozen weights, fp32 LoRA, fused AdamW, gradient checkpointing, CUDA generators."""
    prepare(tmp_path, n_images=4, log=lambda s: None)
    cfg = demo_config(tmp_path, 60).replace(
        model={"dtype": "bf16"}, cache={"dir": str(tmp_path / "cache")},
        train={"device": "cuda", "gradient_checkpointing": True, "min_snr_gamma": 5.0, "noise_offset": 0.05},
        sample={"every_n_steps": 0},
    )  # fmt: skip
    result = train(cfg, progress=False, log=lambda s: None)
    unet = result.components.unet
    assert next(unet.parameters()).dtype == torch.bfloat16 and unet.gradient_checkpointing
    assert all(p.dtype == torch.float32 and p.is_cuda for p in result.networks["unet"].lora_parameters())
    assert all(0 < v < 10 for v in result.losses)
    before = eval_loss(result, tmp_path, 0.0)  # the base model
    after = eval_loss(result, tmp_path, 1.0)
    print(f"CUDA bf16: eval loss before {before:.4f}, after {after:.4f}; losses {result.losses}")
    assert after < 0.9 * before
    resumed = train(cfg.replace(train={"resume": True, "max_steps": 65}), progress=False, log=lambda s: None)
    assert resumed.step == 65 and resumed.losses[:60] == result.losses


def test_cuda_graph_needs_cuda_one_process_and_frozen_text_encoders(tmp_path):
    with pytest.raises(ConfigError, match=r"train.cuda_graph = true needs a CUDA device, and this run is on cpu"):
        train(_small(tmp_path, 2, train={"cuda_graph": True, "device": "cpu"}), progress=False, log=lambda s: None)
    assert not (tmp_path / "lora.safetensors").exists()


@pytest.mark.gpu
def test_cuda_graph_run_equals_the_eager_run(tmp_path):
    """Replayed forward + backward (several buckets, gradient accumulation, min-SNR, offset
    noise) gives the eager run's losses and LoRA; resuming a graphed run continues it."""
    prepare(tmp_path, n_images=8, log=lambda s: None)  # 8 images in several aspect buckets
    base = demo_config(tmp_path, 12).replace(
        model={"dtype": "bf16"}, sample={"every_n_steps": 0},
        train={"device": "cuda", "batch_size": 2, "grad_accum": 2, "min_snr_gamma": 5.0, "noise_offset": 0.05},
    )  # fmt: skip
    runs = {}
    for graph in (False, True):
        cfg = base.replace(save={"output_dir": str(tmp_path / f"graph{graph}")}, train={"cuda_graph": graph})
        runs[graph] = train(cfg, progress=False, log=lambda s: None)
    eager, graphed = runs[False], runs[True]
    print("graph vs eager losses", graphed.losses, eager.losses)
    # same kernels in the same process: equal up to atomics in attention backward
    torch.testing.assert_close(torch.tensor(graphed.losses), torch.tensor(eager.losses), rtol=1e-3, atol=1e-4)
    for name, m in eager.networks["unet"].loras.items():
        torch.testing.assert_close(graphed.networks["unet"].loras[name].lora_up.weight, m.lora_up.weight,
                                   rtol=1e-3, atol=1e-4)  # fmt: skip
    cfg = base.replace(save={"output_dir": str(tmp_path / "graphTrue")}, train={"cuda_graph": True})
    resumed = train(cfg.replace(train={"resume": True, "max_steps": 14}), progress=False, log=lambda s: None)
    assert resumed.step == 14 and resumed.losses[:12] == graphed.losses
