"""LoRA files: save / load / apply round trips, several files on one layer, the adapter
registry (a toy adapter type), resume tensors, on the tiny models."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from eridiffusion import networks as lora
from eridiffusion.checkpoint import tiny_components
from lora_helpers import FAMILIES, inject_all, max_diff, outputs, randomize

# -- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_apply_roundtrip(family, tmp_path):
    c = tiny_components(family)
    nets = inject_all(c, rank=4, alpha=3.0, conv_rank=2, conv_alpha=1.0)
    randomize(nets.values())
    trained = outputs(c)
    meta = lora.lora_metadata(family, rank=4, alpha=3.0, steps=100, epoch=2, resolution=64, num_images=5,
                              title="cat", conv_rank=2, conv_alpha=1.0)
    path = tmp_path / "out" / "cat.safetensors"
    lora.save_lora(path, list(nets.values()), metadata=meta, dtype=torch.float32)
    assert [p.name for p in path.parent.iterdir()] == ["cat.safetensors"]  # no temp file left

    with safe_open(str(path), "pt") as f:
        keys, header = set(f.keys()), f.metadata()
    names = {n for net in nets.values() for n in net.loras}
    assert keys == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    sdxl = family.startswith("sdxl")
    assert header["ss_network_module"] == "networks.lora" and header["ss_network_dim"] == "4"
    assert header["ss_network_alpha"] == "3.0" and header["ss_v2"] == "False"
    assert header["ss_base_model_version"] == ("sdxl_base_v1-0" if sdxl else "sd_v1")
    assert header["modelspec.architecture"] == ("stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora")
    assert header["modelspec.sai_model_spec"] == "1.0.0" and header["modelspec.resolution"] == "64x64"
    assert header["modelspec.prediction_type"] == "epsilon" and header["modelspec.title"] == "cat"
    assert header["ss_steps"] == "100" and header["ss_num_train_images"] == "5" and "modelspec.date" in header

    weights, _ = lora.load_lora(path)
    assert set(weights) == names and weights[next(iter(names))].alpha in (3.0, 1.0)

    fresh = tiny_components(family)
    base = outputs(fresh)
    applied_nets = lora.apply_lora(fresh, path)
    applied = outputs(fresh)
    print(f"{family} applied file vs trained in memory: {max_diff(applied, trained):.2e}")
    assert max_diff(applied, trained) <= 1e-5
    for net in applied_nets.values():
        net.remove()
    assert max_diff(outputs(fresh), base) == 0.0

    merged = tiny_components(family)
    assert lora.apply_lora(merged, path, merge=True) == {}
    print(f"{family} merged file vs trained in memory: {max_diff(outputs(merged), trained):.2e}")
    assert max_diff(outputs(merged), trained) <= 1e-5

    # resume: a second network with the same settings picks up the exact tensors
    again = tiny_components(family)
    nets2 = inject_all(again, rank=4, alpha=3.0, conv_rank=2, conv_alpha=1.0)
    tensors = load_file(path)
    for net in nets2.values():
        net.load_tensors(tensors, str(path))  # each network takes the keys of its prefix
    assert max_diff(outputs(again), trained) == 0.0

    # fp16 default: half the size, outputs within fp16 rounding of the trained ones
    lora.save_lora(tmp_path / "half.safetensors", list(nets.values()))
    half = tiny_components(family)
    lora.apply_lora(half, tmp_path / "half.safetensors")
    assert 0 < max_diff(outputs(half), trained) < 2e-3


def test_several_files_with_scales(tmp_path):
    c = tiny_components("sdxl-tiny")
    paths = []
    for seed, rank in ((1, 4), (2, 2)):
        work = tiny_components("sdxl-tiny")
        nets = inject_all(work, rank=rank, alpha=1.0)
        randomize(nets.values(), seed=seed)
        paths.append(tmp_path / f"l{seed}.safetensors")
        lora.save_lora(paths[-1], list(nets.values()), dtype=torch.float32)
    scales = (0.7, -0.4)

    live = lora.apply_lora(c, paths, scale=scales)
    stacked = outputs(c)
    ref = tiny_components("sdxl-tiny")
    lora.apply_lora(ref, paths, scale=scales, merge=True)
    print(f"two files stacked vs merged: {max_diff(stacked, outputs(ref)):.2e}")
    assert max_diff(stacked, outputs(ref)) <= 1e-5
    # the networks' multiplier scales every file's strength
    for net in live.values():
        net.set_multiplier(2.0)
    ref2 = tiny_components("sdxl-tiny")
    lora.apply_lora(ref2, paths, scale=[2 * s for s in scales], merge=True)
    assert max_diff(outputs(c), outputs(ref2)) <= 1e-5
    assert max_diff(outputs(c), stacked) > 1e-2


def test_unmatched_keys_are_one_line_error(tmp_path):
    sd15 = tiny_components("sd15-tiny")
    lora.save_lora(tmp_path / "sd15.safetensors", list(inject_all(sd15).values()))
    with pytest.raises(lora.LoRAError) as e:
        lora.apply_lora(tiny_components("sdxl-tiny"), tmp_path / "sd15.safetensors")
    msg = str(e.value)
    assert "\n" not in msg and "sd15.safetensors" in msg and "lora_" in msg and "another base model" in msg


