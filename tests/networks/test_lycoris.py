"""LoHa, LoKr and DoRA: each module's ΔW from our file equals the `lycoris-lora` package's and
ComfyUI's rule, every key maps to a weight by ComfyUI's key mapping, merged = unmerged, and the
files round-trip through `lora.init_from`'s `load_into`.

ComfyUI's rule is re-implemented here from comfyanonymous/ComfyUI `comfy/weight_adapter/loha.py`
@183b377, `lokr.py` @e8f3bc5, `lora.py`, and `base.py` `weight_decompose` @9c0cf36 (the
`calculate_weight` maths, without ComfyUI itself: it is not a pip package).
"""

from __future__ import annotations


import pytest
import torch
from safetensors import safe_open
from torch import nn

from eridiffusion import networks
from eridiffusion.checkpoint import tiny_components
from eridiffusion.networks import naming as names
from eridiffusion.networks.network import qkv_rows
from lora_helpers import max_diff, outputs
from test_lora import comfy_key_map, comfy_state

SPECS = {  # name -> inject settings
    "loha": dict(algo="loha"),
    "lokr": dict(algo="lokr"),
    "lokr-lowrank": dict(algo="lokr", options={"factor": -1, "decompose_both": True}),
    "dora": dict(algo="lora", dora=True),
    "dora-loha": dict(algo="loha", dora=True),
}


def inject_spec(c, spec, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0):
    nets = {"unet": networks.inject(c.unet, "unet", rank, alpha, conv_rank=conv_rank, conv_alpha=conv_alpha, **spec)}
    nets["te1"] = networks.inject(c.te1, "te1", rank, alpha, **spec)
    nets["te2"] = networks.inject(c.te2, "te2", rank, alpha, **spec)
    return nets


@torch.no_grad()
def randomize(nets, seed=1):
    """Parameters as training leaves them: every factor non-zero, dora_scale off ‖W‖ by ~10 %."""
    g = torch.Generator().manual_seed(seed)
    for net in nets.values():
        for m in net.loras.values():
            for name, t in m.state_tensors().items():
                noise = torch.randn(t.shape, generator=g)
                if name == "dora_scale":
                    t.mul_(1 + 0.1 * noise)
                elif name != "alpha":
                    t.copy_(noise * (0.3 if name.startswith("hada") else 0.1))


def trained_file(tmp_path, spec, family="sdxl-tiny", rank=4):
    c = tiny_components(family)
    nets = inject_spec(c, spec, rank=rank)
    randomize(nets)
    path = tmp_path / "adapter.safetensors"
    networks.save_lora(path, list(nets.values()), metadata=networks.lora_metadata(
        family, rank, 2.0, conv_rank=2, conv_alpha=1.0, **spec), dtype=torch.float32)  # fmt: skip
    return c, nets, path


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# -- ComfyUI's calculate_weight, re-implemented ------------------------------------------------


def comfy_weight_decompose(dora_scale, weight, lora_diff, alpha, strength):
    """comfy/weight_adapter/base.py `weight_decompose` @9c0cf36 (intermediate dtype fp32)."""
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:  # wd_on_output_axis: ComfyUI divides by ‖W‖ here
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))  # fmt: skip
    else:
        weight_norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                       .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))  # fmt: skip
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / weight_norm)
    return weight + strength * (weight_calc - weight)


def comfy_patch(weight, t, strength=1.0):
    """The patched weight ComfyUI computes from one module's tensors `t` ({suffix: tensor})."""
    dim = None
    if "lora_down.weight" in t:  # lora.py: alpha / mat2.shape[0]
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        dim, diff = down.shape[0], (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    elif "hada_w1_a" in t:  # loha.py: alpha / w1b.shape[0]
        dim = t["hada_w1_b"].shape[0]
        diff = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(weight.shape)
    else:  # lokr.py: dim from whichever factor is low-rank (w2's last)
        w1, w2 = t.get("lokr_w1"), t.get("lokr_w2")
        if w1 is None:
            dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
        if w2 is None:
            dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        diff = torch.kron(w1, w2).reshape(weight.shape)
    alpha = t["alpha"].item() / dim if "alpha" in t and dim is not None else 1.0
    if "dora_scale" in t:
        return comfy_weight_decompose(t["dora_scale"], weight, diff, alpha, strength)
    return weight + strength * alpha * diff


# -- the lycoris-lora package ----------------------------------------------------------------


@torch.no_grad()
def lycoris_delta(weight, t):
    """ΔW (W' − W) of the `lycoris-lora` package's module built from the same tensors, as its
    `forward` forms it: LoHa / LoKr `get_weight` (alpha/r applied once), LoCon `get_diff_weight`,
    then `apply_weight_decompose` for DoRA. (Its LoHa / LoKr `get_diff_weight` multiplies
    `get_weight`, already scaled, by alpha/r again: lycoris-lora 4.1.3 and LyCORIS@f49d30d.)"""
    from lycoris.modules import LoConModule, LohaModule, LokrModule

    if weight.dim() == 4:
        orig = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False)
    else:
        orig = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    orig.weight.data.copy_(weight)
    alpha = t.get("alpha")
    if "hada_w1_a" in t:
        mod = LohaModule.make_module_from_state_dict(
            "m", orig, t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], None, None, alpha, None)
    elif "lora_down.weight" in t:
        mod = LoConModule.make_module_from_state_dict("m", orig, t["lora_up.weight"], t["lora_down.weight"], None, alpha, None)
    else:
        g = t.get
        mod = LokrModule.make_module_from_state_dict(
            "m", orig, g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"), g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"),
            None, None, alpha, None)  # fmt: skip
    if "dora_scale" in t:  # LyCORIS wd_on_output=False: our layout
        mod.wd, mod.wd_on_out, mod.dora_norm_dims = True, False, weight.dim() - 1
        mod.dora_scale = nn.Parameter(t["dora_scale"].clone())
    if "lora_down.weight" in t:
        diff = mod.get_diff_weight(shape=weight.shape)[0]
    else:
        diff = mod.get_weight(weight.shape)
    merged = mod.apply_weight_decompose(weight + diff) if "dora_scale" in t else weight + diff
    return merged - weight


# -- tests -------------------------------------------------------------------------------------


def layer_weight(c, kind, name):
    """The weight (or q/k/v row block) that kohya module `name` adapts, and that layer."""
    model = {"unet": c.unet, "te1": c.te1, "te2": c.te2}[kind]
    _, module, idx = names.name_map(model, kind)[name]
    base = module if idx is None else qkv_rows(module, idx)
    return (base.get() if idx is not None else base.weight).detach().clone(), base


@pytest.mark.parametrize("spec", list(SPECS))
def test_delta_equals_lycoris_and_comfyui(spec, tmp_path):
    _, _, path = trained_file(tmp_path, SPECS[spec])
    fresh = tiny_components("sdxl-tiny")
    weights, meta = networks.load_lora(path)
    worst_ly = worst_comfy = 0.0
    for name, w in weights.items():
        kind = names.kind_of(name)
        weight, base = layer_weight(fresh, kind, name)
        ours = w.cls.from_tensors(base, w.tensors).delta_weight()
        assert ours.abs().max() > 1e-4, name  # a real update
        worst_ly = max(worst_ly, (ours - lycoris_delta(weight, w.tensors)).abs().max().item())
        worst_comfy = max(worst_comfy, (ours - (comfy_patch(weight, w.tensors) - weight)).abs().max().item())
    print(f"{spec}: {len(weights)} modules, max |ΔW ours − lycoris| {worst_ly:.1e}, − ComfyUI {worst_comfy:.1e}")
    assert worst_ly <= 1e-6 and worst_comfy <= 1e-6
    assert meta["ss_network_module"] == "lycoris.kohya"


def test_file_layouts_and_metadata(tmp_path):
    keys = set()
    for spec in ("lokr", "lokr-lowrank"):
        keys |= {k.rsplit(".", 1)[-1] for k in read(trained_file(tmp_path, SPECS[spec])[2])[0]}
    assert {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"} <= keys  # whole and low-rank factors both exercised
    tensors, meta = read(trained_file(tmp_path, SPECS["dora"])[2])
    assert meta["ss_network_args"] == ('{"conv_dim": "2", "conv_alpha": "1.0", "algo": "lora", "dora_wd": "True", '
                                       '"wd_on_output": "False"}')  # fmt: skip
    scale = tensors["lora_unet_input_blocks_1_0_in_layers_2.dora_scale"]
    assert scale.shape == (1, 32, 1, 1)  # per input column, the layout ComfyUI and LyCORIS merge alike
    meta = read(trained_file(tmp_path, SPECS["lokr-lowrank"])[2])[1]
    assert meta["ss_network_args"] == ('{"conv_dim": "2", "conv_alpha": "1.0", "algo": "lokr", "factor": "-1", '
                                       '"decompose_both": "True"}')  # fmt: skip


@pytest.mark.parametrize("spec", list(SPECS))
def test_comfyui_maps_every_key(spec, tmp_path):
    c, _, path = trained_file(tmp_path, SPECS[spec])
    file, _ = read(path)
    ours = outputs(c)
    fresh = tiny_components("sdxl-tiny")
    sd = comfy_state(fresh)
    key_map = comfy_key_map(fresh, set(sd))
    modules, unknown = networks.base.group_keys(file)
    assert unknown == []
    unmapped = sorted(n for n in modules if n not in key_map or key_map[n] not in sd)
    assert unmapped == []  # ComfyUI would log "lora key not loaded" for these
    # the patched te2 q/k/v weights and the UNet ones give our outputs (te1 checked the same way)
    for name, suffixes in modules.items():
        sd[key_map[name]] = comfy_patch(sd[key_map[name]], {s: file[f"{name}.{s}"] for s in suffixes})
    fresh.unet.load_state_dict({k[len("diffusion_model."):]: v for k, v in sd.items() if k.startswith("diffusion_model.")})
    fresh.te1.load_state_dict({k[len("clip_l.transformer."):]: v for k, v in sd.items() if k.startswith("clip_l.")})
    got = outputs(fresh)
    d = max(max_diff({"unet": got["unet"]}, ours), max_diff({"te1": got["te1"]}, ours))
    print(f"{spec}: ComfyUI-patched UNet/te1 vs our adapters {d:.2e}")
    assert d <= 1e-5


@pytest.mark.parametrize("spec", list(SPECS))
def test_merged_equals_unmerged_and_unmerge_restores(spec, tmp_path):
    _, _, path = trained_file(tmp_path, SPECS[spec])
    c = tiny_components("sdxl-tiny")
    base_sd = {k: v.clone() for k, v in c.unet.state_dict().items()}
    base = outputs(c)
    nets = networks.apply_lora(c, path, scale=0.7)
    live = outputs(c)
    for net in nets.values():
        net.merge()
    merged = outputs(c)
    for net in nets.values():
        net.unmerge()
    restored = {k: v for k, v in c.unet.state_dict().items() if k in base_sd}
    d, effect = max_diff(merged, live), max_diff(live, base)
    print(f"{spec}: merged vs unmerged {d:.1e} (adapter effect {effect:.1e})")
    assert d <= 1e-5 and effect > 1e-3
    assert max((restored[k] - base_sd[k]).abs().max().item() for k in base_sd) <= 1e-6


@pytest.mark.parametrize("spec", list(SPECS))
def test_inject_is_identity_and_load_into_round_trips(spec, tmp_path):
    c0 = tiny_components("sdxl-tiny")
    base = outputs(c0)
    _, nets, path = trained_file(tmp_path, SPECS[spec])
    c = tiny_components("sdxl-tiny")
    fresh = inject_spec(c, SPECS[spec])
    assert max_diff(outputs(c), base) <= 1e-6  # ΔW = 0 at step 0 (DoRA: up to eps)
    assert networks.load_into(fresh, path) == sum(len(n.loras) for n in nets.values())
    for kind, net in fresh.items():
        for k, v in net.state_tensors().items():
            assert torch.equal(v, nets[kind].state_tensors()[k]), k
    other = inject_spec(tiny_components("sdxl-tiny"), SPECS["loha" if spec != "loha" else "lokr"])
    with pytest.raises(networks.LoRAError, match=r"adapter\.safetensors: .* is \w+, the config trains \w+"):
        networks.load_into(other, path)
    smaller = inject_spec(tiny_components("sdxl-tiny"), SPECS[spec], rank=2)
    with pytest.raises(networks.LoRAError, match=r"has rank 4, the config 2|has .*; the network has"):
        networks.load_into(smaller, path)


def test_each_type_trains_through_the_adapters_gradients():
    """One backward: every adapter parameter of every type gets a gradient (none is dead)."""
    for spec in SPECS.values():
        c = tiny_components("sdxl-tiny")
        nets = inject_spec(c, spec)
        randomize(nets)
        from lora_helpers import unet_inputs

        c.unet(*unet_inputs(c.unet.cfg)[0]).square().mean().backward()
        params = nets["unet"].adapter_params()
        assert params and all(p.grad is not None and p.grad.abs().max() > 0 for p in params), spec
