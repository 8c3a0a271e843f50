"""LoHa, LoKr and DoRA train the tiny SDXL-layout model (CPU), and `lora.init_from` continues a
run: from its own step-50 file plus the resumed optimizer state it reproduces the uninterrupted
100-step run bit for bit, and without that state it loads cleanly and trains on."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion import diffusion, networks
from eridiffusion.config import ConfigError
from eridiffusion.families import FAMILIES
from eridiffusion.tiny import demo_config
from eridiffusion.train import diffusion_loss, train
from eridiffusion.train.trainable import Adapters

DEMO_IMAGES = 4  # the `root` fixture's dataset (tests/conftest.py)
STEPS = 100
TYPES = {  # [lora] settings of each adapter type
    "loha": {"type": "loha", "rank": 4, "alpha": 4.0},
    "lokr": {"type": "lokr", "rank": 4, "alpha": 4.0, "factor": 4},
    "dora": {"type": "lora", "dora": True, "rank": 4, "alpha": 4.0},
}


def _cfg(root, out, steps=STEPS, lora=None, **sections):
    """64² buckets (a quarter of the demo's work per step), fp32 files (exact round trips)."""
    cfg = demo_config(root, steps)
    return cfg.replace(
        data={"resolution": 64, "bucket_min": 64, "bucket_max": 128, "flip": False, "caption_dropout": 0.0},
        optim={"unet_lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
        lora={**(lora or {})},
        save={"output_dir": str(root / out), "every_n_steps": 0, "save_dtype": "fp32", **sections.pop("save", {})},
        sample={"every_n_steps": 0}, cache={"dir": str(root / "cache")}, **sections,
    )  # fmt: skip


def _eval_loss(result, root, multiplier):
    """Plain MSE on a fixed batch (every cached 64² latent, fixed noise and timesteps), the adapters at `multiplier`."""
    latents = [load_file(p) for p in sorted((root / "cache" / "latent").rglob("*.safetensors"))]
    latents = [e for e in latents if e["mean"].shape[-1] == 8]
    texts = [load_file(p) for p in sorted((root / "cache" / "text").rglob("*.safetensors"))]
    x0 = torch.stack([e["mean"] for e in latents])
    cond = {k: torch.stack([texts[i % len(texts)][k] for i in range(len(latents))]) for k in texts[0]}
    t = torch.linspace(20, 980, len(latents)).long()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234))
    ac = diffusion.alphas_cumprod(diffusion.scaled_linear_betas())
    for net in result.networks.values():
        net.set_multiplier(multiplier)
    unet = result.components.unet.eval()
    with torch.no_grad():
        loss = diffusion_loss(FAMILIES["sdxl-tiny"], unet, x0, cond, torch.stack([e["time_ids"] for e in latents]),
                              t, noise, ac, "epsilon").item()  # fmt: skip
    for net in result.networks.values():
        net.set_multiplier(1.0)
    return loss


def quiet(**kw):
    return {"progress": False, "log": lambda s: None, **kw}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(TYPES))
def test_each_type_lowers_a_fixed_evaluation_loss(root, kind):
    result = train(_cfg(root, kind, lora=TYPES[kind]), **quiet())
    before, after = _eval_loss(result, root, 0.0), _eval_loss(result, root, 1.0)
    print(f"{kind}: eval loss before {before:.4f}, after {after:.4f}, ratio {after / before:.3f}")
    assert after < 0.8 * before
    weights, meta = networks.load_lora(result.lora_path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert {w.cls for w in weights.values()} == {type(m) for n in result.networks.values() for m in n.loras.values()}


@pytest.fixture(scope="module")
def reference(root):
    return train(_cfg(root, "full", lora=TYPES["loha"]), **quiet())


def test_init_from_plus_resumed_optimizer_equals_the_uninterrupted_run(root, reference, monkeypatch):
    cfg = _cfg(root, "cont", lora=TYPES["loha"], save={"every_n_steps": 50})
    first = train(cfg, stop_after=50, **quiet())
    assert first.step == 50
    step50 = root / "cont" / "lora-step50.safetensors"
    # the weights come from the file alone: resuming restores the optimizer, RNG and data order only
    monkeypatch.setattr(Adapters, "load_state_tensors", lambda self, tensors, source: None)
    second = train(_cfg(root, "cont", lora={**TYPES["loha"], "init_from": str(step50)}, train={"resume": True}), **quiet())
    assert second.step == STEPS and second.losses == reference.losses
    for kind, net in second.networks.items():
        ref = reference.networks[kind].state_tensors()
        for k, v in net.state_tensors().items():
            assert torch.equal(v, ref[k]), k


def test_init_from_without_state_loads_cleanly_and_trains_on(root, reference):
    step100 = reference.lora_path
    cfg = _cfg(root, "again", steps=10, lora={**TYPES["loha"], "init_from": str(step100)})
    loaded = Adapters(cfg, _fresh(root))
    ref = reference.networks["unet"].state_tensors()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.nets["unet"].state_tensors().items())
    result = train(cfg, **quiet())
    assert result.step == 10 and all(map(torch.isfinite, torch.tensor(result.losses)))
    # it starts where the reference ended: the first loss is far below the reference's first
    assert result.losses[0] < reference.losses[0]


def _fresh(root):
    from eridiffusion import checkpoint

    return checkpoint.load(root / "tiny_sdxl.safetensors")


def test_init_from_mismatch_is_one_line(root, reference):
    path = reference.lora_path
    for lora, match in (({"type": "lokr"}, r"is LoHa, the config trains LoKr"),
                        ({"rank": 2}, r"has rank 4, the config 2"),
                        ({"train_text_encoder": True}, r"modules differ from the configured targets")):  # fmt: skip
        cfg = _cfg(root, "bad", lora={**TYPES["loha"], **lora, "init_from": str(path)})
        with pytest.raises(networks.LoRAError, match=match) as e:
            Adapters(cfg, _fresh(root))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="lora.init_from = .* does not exist"):
        _cfg(root, "bad", lora={"init_from": str(root / "nope.safetensors")}).check_paths()
