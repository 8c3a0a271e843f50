"""LoRA files: save / load / apply round trips, several files on one layer, the adapter
registry (a toy adapter type), resume tensors, on the tiny models."""

from __future__ import annotations

import contextlib
import fnmatch

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from eridiffusion import checkpoint, networks
from eridiffusion.checkpoint import tiny_components
from eridiffusion.networks import naming
from lora_helpers import FAMILIES, inject_all, max_diff, outputs, randomize

# -- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_apply_roundtrip(family, tmp_path):
    c = tiny_components(family)
    nets = inject_all(c, rank=4, alpha=3.0, conv_rank=2, conv_alpha=1.0)
    randomize(nets.values())
    trained = outputs(c)
    meta = networks.lora_metadata(family, rank=4, alpha=3.0, steps=100, epoch=2, resolution=64, num_images=5,
                                  title="cat", conv_rank=2, conv_alpha=1.0)
    path = tmp_path / "out" / "cat.safetensors"
    networks.save_lora(path, list(nets.values()), metadata=meta, dtype=torch.float32)
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

    weights, _ = networks.load_lora(path)
    assert set(weights) == names and weights[next(iter(names))].alpha in (3.0, 1.0)

    fresh = tiny_components(family)
    base = outputs(fresh)
    applied_nets = networks.apply_lora(fresh, path)
    applied = outputs(fresh)
    print(f"{family} applied file vs trained in memory: {max_diff(applied, trained):.2e}")
    assert max_diff(applied, trained) <= 1e-5
    for net in applied_nets.values():
        net.remove()
    assert max_diff(outputs(fresh), base) == 0.0

    merged = tiny_components(family)
    assert networks.apply_lora(merged, path, merge=True) == {}
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
    networks.save_lora(tmp_path / "half.safetensors", list(nets.values()))
    half = tiny_components(family)
    networks.apply_lora(half, tmp_path / "half.safetensors")
    assert 0 < max_diff(outputs(half), trained) < 2e-3


def trained_files(folder, specs) -> list:
    """One fp32 LoRA file on every part of a tiny SDXL per (seed, rank, alpha)."""
    paths = []
    for seed, rank, alpha in specs:
        nets = inject_all(tiny_components("sdxl-tiny"), rank=rank, alpha=alpha)
        randomize(nets.values(), seed=seed)
        paths.append(folder / f"l{seed}.safetensors")
        networks.save_lora(paths[-1], list(nets.values()), dtype=torch.float32)
    return paths


def test_several_files_with_scales(tmp_path):
    c = tiny_components("sdxl-tiny")
    paths = trained_files(tmp_path, ((1, 4, 1.0), (2, 2, 1.0)))
    scales = (0.7, -0.4)

    live = networks.apply_lora(c, paths, scale=scales)
    stacked = outputs(c)
    ref = tiny_components("sdxl-tiny")
    networks.apply_lora(ref, paths, scale=scales, merge=True)
    print(f"two files stacked vs merged: {max_diff(stacked, outputs(ref)):.2e}")
    assert max_diff(stacked, outputs(ref)) <= 1e-5
    # the networks' multiplier scales every file's strength
    for net in live.values():
        net.set_multiplier(2.0)
    ref2 = tiny_components("sdxl-tiny")
    networks.apply_lora(ref2, paths, scale=[2 * s for s in scales], merge=True)
    assert max_diff(outputs(c), outputs(ref2)) <= 1e-5
    assert max_diff(outputs(c), stacked) > 1e-2


def test_unmatched_keys_are_one_line_error(tmp_path):
    sd15 = tiny_components("sd15-tiny")
    networks.save_lora(tmp_path / "sd15.safetensors", list(inject_all(sd15).values()))
    with pytest.raises(networks.LoRAError) as e:
        networks.apply_lora(tiny_components("sdxl-tiny"), tmp_path / "sd15.safetensors")
    msg = str(e.value)
    assert "\n" not in msg and "sd15.safetensors" in msg and "lora_" in msg and "another base model" in msg




def test_two_files_on_one_layer_stack_as_adapters(tmp_path):
    """Each file is its own adapter on the layer: unmerged output = merged output =
    base + Σ strength · (alpha / rank) · up @ down, as the old rank concatenation gave."""
    paths = trained_files(tmp_path, ((1, 4, 2.0), (2, 2, 3.0)))
    scales = (0.7, -0.4)
    c = tiny_components("sdxl-tiny")
    layer_path = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    w0 = c.unet.get_submodule(layer_path).weight.detach().clone()
    expected = w0.clone()
    for p, s in zip(paths, scales):
        w = networks.load_lora(p)[0]["lora_unet_" + layer_path.replace(".", "_")]
        down, up = w.tensors["lora_down.weight"], w.tensors["lora_up.weight"]
        expected += s * (w.alpha / w.rank) * up @ down

    nets = networks.apply_lora(c, paths, scale=scales)
    layer = c.unet.get_submodule(layer_path)
    assert isinstance(layer, networks.AdapterStack) and len(layer.adapters) == 2
    x = torch.randn(3, 7, w0.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = layer(x)
        torch.testing.assert_close(unmerged, x @ expected.t(), rtol=0, atol=1e-5)
        nets["unet"].merge()
        torch.testing.assert_close(layer.adapters[0].weight, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)
    name = "lora_unet_" + layer_path.replace(".", "_")
    assert {name, f"{name}@2"} <= set(nets["unet"].loras)


def test_load_tensors_is_strict_and_names_the_source(tmp_path):
    c = tiny_components("sdxl-tiny")
    net = networks.inject(c.unet, "unet", 4, 2.0)
    randomize([net])
    saved = {k: v.clone() for k, v in net.state_tensors().items()}

    other = networks.inject(tiny_components("sdxl-tiny").unet, "unet", 4, 2.0)
    other.load_tensors(saved, "state-step3.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in other.state_tensors().items())

    for wrong, what in ((networks.inject(tiny_components("sdxl-tiny").unet, "unet", 2, 2.0), "lora_down.weight (2,"),
                        (networks.inject(tiny_components("sdxl-tiny").unet, "unet", 4, 4.0), "alpha 4"),
                        (networks.inject(tiny_components("sdxl-tiny").unet, "unet", 4, 2.0, targets=["*.to_q"]), "unexpected")):
        with pytest.raises(networks.LoRAError) as e:
            wrong.load_tensors(saved, "state-step3.safetensors")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("state-step3.safetensors: ") and what in msg, msg


def test_metadata_from_a_family_object():
    from eridiffusion.checkpoint import FAMILIES

    for name in ("sdxl", "sd15"):
        fam = FAMILIES[name]
        meta = networks.lora_metadata(fam, rank=4, alpha=4.0)
        assert meta["ss_base_model_version"] == fam.base_model_version
        assert meta["modelspec.architecture"] == fam.architecture + "/lora"
        assert meta["modelspec.implementation"] == fam.implementation
        by_name = networks.lora_metadata(name, rank=4, alpha=4.0)
        assert {k: v for k, v in by_name.items() if k != "modelspec.date"} == {
            k: v for k, v in meta.items() if k != "modelspec.date"}
    with pytest.raises(networks.LoRAError, match="family 'sd3' unknown"):
        networks.lora_metadata("sd3", rank=4, alpha=4.0)


def test_lycoris_files_are_named_in_the_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "loha.safetensors"
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.{s}": torch.zeros(2, 64) for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
              | {f"{name}.{s}": torch.zeros(2, 2, 3, 3) for s in ("hada_t1", "hada_t2")}
              | {f"{name}.alpha": torch.tensor(2.0)}, str(path))
    with pytest.raises(networks.LoRAError, match=r"LoHa with a Tucker core \(alpha, hada_t1.*is not supported"):
        networks.load_lora(path)
    assert checkpoint.lora_modules([f"{name}.hada_w1_a", f"{name}.alpha", "model.x.weight"]) == [name]


# -- the registry: a toy adapter type ----------------------------------------------------------


class ToyShift(networks.Adapter):
    """W' = W + s · 1 (s added to every entry): one trainable scalar per Linear, stored as
    `NAME.toy_shift`."""

    suffixes = ("toy_shift",)
    identifying = "toy_shift"
    hyper = ()

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.s = nn.Parameter(torch.zeros((), device=base.weight.device))
        self.multiplier, self.merged = 1.0, False

    def adapter_params(self):
        return [self.s]

    def delta_weight(self):
        return self.s.float() * torch.ones_like(self.weight, dtype=torch.float32)

    def update(self, x):  # (..., in) -> (..., out): s · Σ_in x
        total = x.sum(-1, keepdim=True) * (self.s * self.multiplier).to(x.dtype)
        return total.expand(*x.shape[:-1], self.weight.shape[0])

    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def state_tensors(self):
        return {"toy_shift": self.s.detach()}

    def target(self):
        return self.weight

    @classmethod
    def from_tensors(cls, base, tensors):
        if not isinstance(base, nn.Linear):
            raise networks.LoRAError("toy_shift needs a Linear")
        m = cls(base)
        with torch.no_grad():
            m.s.copy_(tensors["toy_shift"])
        return m

    @classmethod
    def check(cls, shapes):
        return (1, []) if shapes.get("toy_shift") == () else (None, ["toy_shift must be a scalar"])


@contextlib.contextmanager
def registered(cls):
    saved = dict(networks.ADAPTERS)
    networks.register_adapter(cls)
    try:
        yield
    finally:
        networks.ADAPTERS.clear()
        networks.ADAPTERS.update(saved)


def test_a_registered_toy_adapter_saves_loads_applies_and_merges(tmp_path):
    c = tiny_components("sdxl-tiny")
    base = outputs(c)
    with registered(ToyShift):
        net = networks.LoRANetwork("unet")
        chosen = [(p, m) for p, m in naming.candidates(c.unet, "unet") if fnmatch.fnmatchcase(p, "*.attn2.to_out.0")]
        for i, (path, module) in enumerate(chosen):
            adapter = ToyShift(module)
            adapter.s.data.fill_(0.05 * (i + 1))
            net.add_layer(c.unet, path, module, [adapter])
            net.add_adapter(naming.names_for("unet", path, module, c.unet, "ldm")[0], adapter)
        live = outputs(c)
        assert max_diff(live, base) > 1e-3
        toy_file = tmp_path / "toy.safetensors"
        networks.save_lora(toy_file, net, dtype=torch.float32)
        with safe_open(str(toy_file), "pt") as f:
            assert {k.rsplit(".", 1)[1] for k in f.keys()} == {"toy_shift"}
            assert checkpoint.lora_modules(f.keys()) == sorted(net.loras)
        weights, _ = networks.load_lora(toy_file)
        assert {w.cls for w in weights.values()} == {ToyShift} and set(weights) == set(net.loras)

        fresh = tiny_components("sdxl-tiny")
        applied = networks.apply_lora(fresh, toy_file)
        assert all(isinstance(m, ToyShift) for m in applied["unet"].loras.values())
        assert max_diff(outputs(fresh), live) <= 1e-6
        applied["unet"].merge()
        assert max_diff(outputs(fresh), live) <= 1e-5  # merged output == unmerged output
        merged = tiny_components("sdxl-tiny")
        assert networks.apply_lora(merged, toy_file, merge=True) == {}
        assert max_diff(outputs(merged), live) <= 1e-5

        # a LoRA file and the toy file on the same layers: an AdapterStack of two types
        work = tiny_components("sdxl-tiny")
        lora_net = networks.inject(work.unet, "unet", 4, 4.0, targets=["*.attn2.to_out.0"])
        randomize([lora_net])
        lora_file = tmp_path / "lora.safetensors"
        networks.save_lora(lora_file, lora_net, dtype=torch.float32)
        both = tiny_components("sdxl-tiny")
        networks.apply_lora(both, [lora_file, toy_file], scale=[0.5, 2.0])
        ref = tiny_components("sdxl-tiny")
        networks.apply_lora(ref, [lora_file, toy_file], scale=[0.5, 2.0], merge=True)
        assert max_diff(outputs(both), outputs(ref)) <= 1e-5
    assert "toy_shift" not in networks.ADAPTERS  # the registry is as before
    with pytest.raises(networks.LoRAError, match="no LoRA/LyCORIS key"):
        networks.load_lora(toy_file)
