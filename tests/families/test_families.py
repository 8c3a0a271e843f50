"""Families carry what differs between models: a toy family defined here trains through
`train()` with no change to train/ or pipeline.py."""

import dataclasses

import pytest
import torch

from eridiffusion import checkpoint, families
from eridiffusion.families import FAMILIES, StableDiffusion
from eridiffusion.families.sd import ClipText
from eridiffusion.tiny import demo_config, make_dataset
from eridiffusion.weights import WeightLoader


@dataclasses.dataclass(frozen=True)
class ToyFamily(StableDiffusion):
    """SD1.x-tiny weights with other behaviour: the penultimate CLIP layer as context and
    timesteps only from the first half of the schedule; calls are recorded."""

    calls: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)

    def matches(self, loader) -> bool:
        return FAMILIES["sd15-tiny"].matches(loader)

    def text_encoder(self, components, max_tokens=75):
        inner, calls = ClipText(components.te1), self.calls

        def encode(prompts):
            calls["text"] = calls.get("text", 0) + 1
            return {"context": inner.te1(inner.tok1(prompts)).hidden}

        return encode

    def sample_timesteps(self, n, generator, device, low=0, high=1000):
        t = torch.randint(0, 500, (n,), generator=generator, device=device)
        self.calls.setdefault("t", []).append(t)
        return t


@pytest.fixture
def toy():
    base = FAMILIES["sd15-tiny"]
    fam = ToyFamily("toy", "Toy", base.configs, base.model_classes, base.prefixes, base_model_version="toy_v1",
                    architecture="toy-arch", implementation="tests", lora_parts={"unet": "unet", "te": "te1"},
                    unet_lora_naming="diffusers", default_size=(128, 128))  # fmt: skip
    families.register(fam)
    yield fam
    del FAMILIES["toy"]


def test_families_answer_what_differs():
    xl, sd = FAMILIES["sdxl"], FAMILIES["sd15"]
    assert (xl.bucket_multiple, sd.bucket_multiple) == (32, 64)
    assert xl.cond_keys == ("context", "pooled") and sd.cond_keys == ("context",)
    assert (xl.te2 is None, sd.te2 is None) == (False, True)
    assert xl.lora_parts == {"unet": "unet", "te1": "te1", "te2": "te2"} and sd.lora_parts == {"unet": "unet", "te": "te1"}
    assert (xl.architecture, sd.architecture) == ("stable-diffusion-xl-v1-base", "stable-diffusion-v1")
    assert torch.equal(xl.schedule(), sd.schedule())
    pooled, ids = torch.randn(2, 1280), torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    assert set(xl.denoiser_inputs({"context": torch.zeros(2, 77, 2048), "pooled": pooled}, ids)) == {"context", "y"}
    assert set(sd.denoiser_inputs({"context": torch.zeros(2, 77, 768)}, None)) == {"context"}


def test_a_toy_family_trains_through_train(toy, tmp_path):
    from eridiffusion.train import train

    comps = checkpoint.tiny_components("sd15-tiny")
    model = checkpoint.save(comps, tmp_path / "toy.safetensors")
    with WeightLoader(model) as loader:
        assert checkpoint.detect(loader).name == "sd15-tiny"  # auto detection is unchanged
    make_dataset(tmp_path / "data", n=4, size=128)
    cfg = demo_config(tmp_path, 5).replace(
        model={"path": str(model), "family": "toy"}, save={"output_dir": str(tmp_path / "out"), "every_n_steps": 0},
        data={"bucket_step": 64, "bucket_min": 64, "caption_dropout": 0.0}, sample={"every_n_steps": 0},
        lora={"conv_rank": 0, "conv_alpha": 0.0, "train_text_encoder": True}, cache={"text": False},
    )  # fmt: skip
    result = train(cfg, progress=False, log=lambda s: None)
    assert result.step == 5 and len(result.losses) == 5 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.components.family is toy
    assert toy.calls["text"] >= 5  # its text encoder ran every step (text encoder trained: not cached)
    assert len(toy.calls["t"]) == 5 and all(int(t.max()) < 500 for t in toy.calls["t"])
    from safetensors import safe_open

    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_base_model_version"] == "toy_v1" and meta["modelspec.architecture"] == "toy-arch/lora"
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_down_blocks") for k in keys)
