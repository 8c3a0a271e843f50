"""`eri lora merge` (a single-file checkpoint with the adapters folded in, every other tensor
byte-identical) and `eri lora resize` (SVD per module, kept energy reported)."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eridiffusion import checkpoint, networks
from eridiffusion.cli import main
from lora_helpers import inject_all, max_diff, outputs, randomize
from test_lycoris import SPECS, inject_spec
from test_lycoris import randomize as randomize_any


def tiny_checkpoint(tmp_path, family="sdxl-tiny"):
    """A tiny single file in the original layout, fp16 UNet weights (a cast back must keep the dtype),
    plus an ignored key and metadata that merge must copy."""
    c = checkpoint.tiny_components(family)
    path = checkpoint.save(c, tmp_path / "model.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v.half() if k.startswith("model.diffusion_model.") else v for k, v in tensors.items()}
    tensors["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    save_file(tensors, str(path), metadata={"format": "pt", "note": "kept"})
    return path


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_merge_equals_base_plus_adapters_and_keeps_other_tensors(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path)
    c = checkpoint.tiny_components("sdxl-tiny")
    nets = inject_all(c, conv_rank=2)
    randomize(nets.values())
    lora = tmp_path / "lora.safetensors"
    networks.save_lora(lora, list(nets.values()), dtype=torch.float32)
    c2 = checkpoint.tiny_components("sdxl-tiny")
    loha_nets = inject_spec(c2, SPECS["dora-loha"])
    randomize_any(loha_nets)
    loha = tmp_path / "loha.safetensors"
    networks.save_lora(loha, list(loha_nets.values()), dtype=torch.float32)

    out = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", str(ckpt), f"{lora}:0.8", str(loha), "--out", str(out)]) == 0
    assert "weights changed" in capsys.readouterr().out

    expected = checkpoint.load(ckpt)  # base (the fp16 UNet upcast) + both adapters, live
    networks.apply_lora(expected, [lora, loha], [0.8, 1.0])
    merged = checkpoint.load(out)
    d, effect = max_diff(outputs(merged), outputs(expected)), max_diff(outputs(checkpoint.load(ckpt)), outputs(expected))
    print(f"merged file vs base + adapters {d:.1e} (adapter effect {effect:.1e})")
    # the merged UNet weights are rounded to the file's fp16; te1/te2 (fp32) are exact
    assert max_diff({k: v for k, v in outputs(merged).items() if k != "unet"}, outputs(expected)) <= 1e-5
    assert d <= 2e-2 * effect

    before, meta_before = read(ckpt)
    after, meta_after = read(out)
    assert after.keys() == before.keys() and meta_after == meta_before
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert all(after[k].dtype == before[k].dtype for k in before)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in changed  # te2 q/k/v
    untouched = [k for k in before if k not in changed]
    assert "conditioner.embedders.1.model.logit_scale" in untouched and len(untouched) > len(changed)
    with safe_open(str(ckpt), "pt") as f0, safe_open(str(out), "pt") as f1:
        for k in untouched:
            a, b = f0.get_tensor(k), f1.get_tensor(k)
            assert a.dtype == b.dtype and a.shape == b.shape and a.view(-1).view(torch.uint8).equal(b.view(-1).view(torch.uint8)), k


def test_merge_fp32_equals_base_plus_lora(tmp_path):
    c = checkpoint.tiny_components("sdxl-tiny")
    ckpt = checkpoint.save(c, tmp_path / "model.safetensors")
    nets = inject_all(c, conv_rank=2)
    randomize(nets.values())
    lora = tmp_path / "lora.safetensors"
    networks.save_lora(lora, list(nets.values()), dtype=torch.float32)
    out = tmp_path / "merged.safetensors"
    networks.tools.merge_into_checkpoint(ckpt, [(lora, 1.0)], out)
    d = max_diff(outputs(checkpoint.load(out)), outputs(c))
    print(f"fp32 merged file vs base + LoRA {d:.1e}")
    assert d <= 1e-5


def test_resize_reports_energy_and_loads(tmp_path, capsys):
    c = checkpoint.tiny_components("sdxl-tiny")
    nets = inject_all(c, rank=8, alpha=4.0, conv_rank=4)
    randomize(nets.values())
    src, out = tmp_path / "lora.safetensors", tmp_path / "small.safetensors"
    networks.save_lora(src, list(nets.values()), metadata=networks.lora_metadata("sdxl-tiny", 8, 4.0, conv_rank=4),
                       dtype=torch.float32)  # fmt: skip
    assert main(["lora", "resize", str(src), "--rank", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "kept energy" in text and "lowest kept energy" in text
    weights, meta = networks.load_lora(out)
    assert {w.rank for w in weights.values()} == {2} and meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == "1.0" and '"conv_dim": "2"' in meta["ss_network_args"]
    report = networks.tools.resize(src, 8, tmp_path / "same.safetensors", dtype=torch.float32)
    assert all(abs(e - 1.0) < 1e-6 for _, _, e in report.values())  # full rank keeps everything
    fresh, same = checkpoint.tiny_components("sdxl-tiny"), checkpoint.tiny_components("sdxl-tiny")
    networks.apply_lora(same, tmp_path / "same.safetensors")
    assert max_diff(outputs(same), outputs(c)) <= 1e-5  # the SVD round trip is the same LoRA
    networks.apply_lora(fresh, out)  # the resized file loads and applies
    assert max_diff(outputs(fresh), outputs(c)) > 0
