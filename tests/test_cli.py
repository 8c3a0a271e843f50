"""`eri inspect` through main([...]) and as a subprocess; WeightError handling for every sub-command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from eridiffusion import cli
from eridiffusion.checkpoint import save, tiny_components
from eridiffusion.weights import WeightNotFound

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    comps = tiny_components("sd15-tiny", seed=0)
    path = save(comps, tmp_path_factory.mktemp("cli") / "tiny15.safetensors", dtype=torch.float16)
    return comps, path


@pytest.fixture
def lora_file(tmp_path):
    state = {}
    for name, rank, alpha in [
        ("lora_unet_input_blocks_1_1_proj_in", 8, 4.0),
        ("lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k", 8, 4.0),
        ("lora_unet_middle_block_0_in_layers_2", 4, 1.0),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 8, None),
    ]:
        state[f"{name}.lora_down.weight"] = torch.zeros(rank, 32)
        state[f"{name}.lora_up.weight"] = torch.zeros(32, rank)
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    meta = {"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_base_model_version": "sd_v1"}
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file(state, str(path), metadata=meta)
    return path, meta


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_model_json(model_file, capsys):
    comps, path = model_file
    rc, out, err = _run(capsys, "inspect", str(path), "--json")
    assert rc == 0 and err == ""
    r = json.loads(out)
    assert r["kind"] == "model" and r["family"] == "sd15-tiny" and r["base_model_version"] == "sd_v1"
    assert r["format"] == "safetensors" and r["size"] == os.path.getsize(path)
    assert r["tensors"] == sum(len(m.state_dict()) for _, m in comps.items())
    assert set(r["components"]) == {"unet", "vae", "te1"}
    for part, m in comps.items():
        c = r["components"][part]
        assert c["parameters"] == sum(p.numel() for p in m.parameters())
        assert c["tensors"] == len(m.state_dict())
        assert c["dtypes"] == {"float16": len(m.state_dict())}
    assert r["problems"] == [] and r["ignored"] == []


def test_inspect_model_text(model_file, capsys):
    comps, path = model_file
    rc, out, _ = _run(capsys, "inspect", str(path))
    assert rc == 0
    assert "family:    sd15-tiny (ss_base_model_version sd_v1, epsilon)" in out
    unet_params = sum(p.numel() for p in comps.unet.parameters())
    line = next(x for x in out.splitlines() if x.strip().startswith("unet"))
    assert "model.diffusion_model." in line and f"{unet_params:,} params" in line and "float16" in line
    assert "problems:  none" in out


def test_inspect_reports_problems(model_file, tmp_path, capsys):
    _, path = model_file
    state = safetensors.torch.load_file(str(path))
    del state["model.diffusion_model.out.2.bias"]
    state["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(state, str(bad))
    rc, out, _ = _run(capsys, "inspect", str(bad), "--json")
    assert rc == 0
    r = json.loads(out)
    assert r["problems"] == [
        "missing model.diffusion_model.out.2.bias",
        "unexpected model.diffusion_model.extra.weight",
        "shape first_stage_model.quant_conv.weight: file [8, 8, 3, 3], model [8, 8, 1, 1]",
    ]
    assert r["ignored"] == ["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    rc, out, _ = _run(capsys, "inspect", str(bad))
    assert "problems:  3" in out and "  missing model.diffusion_model.out.2.bias" in out


def test_inspect_lora(lora_file, capsys):
    path, meta = lora_file
    rc, out, _ = _run(capsys, "inspect", str(path), "--json")
    assert rc == 0
    r = json.loads(out)
    assert r["kind"] == "lora" and r["modules"] == 4
    assert r["components"] == {"te": 1, "unet": 3}
    assert r["ranks"] == {"4": 1, "8": 3}
    assert r["alphas"] == {"1": 1, "4": 2}
    assert r["metadata"] == meta
    no_alpha = "lora_te_text_model_encoder_layers_0_self_attn_q_proj: no .alpha (read as scale 1.0 by ComfyUI/A1111)"
    assert r["problems"] == [no_alpha]
    rc, out, _ = _run(capsys, "inspect", str(path))
    assert "LoRA:      4 modules (te 1, unet 3)" in out
    assert "rank:      4 ×1, 8 ×3" in out and "alpha:     1 ×1, 4 ×2" in out
    assert "  ss_network_dim = 8" in out


@pytest.mark.parametrize(
    "content, name, expect",
    [
        (b"", "empty.safetensors", "is empty (0 bytes)"),
        (bytes(range(9, 200)), "noise.safetensors", "not a safetensors file"),
        (None, "model.ckpt", "is a pickle file, which can run code when loaded"),
        (None, "missing.safetensors", "no such file"),
    ],
)
def test_inspect_broken_file_one_line_exit_2(tmp_path, capsys, content, name, expect):
    path = tmp_path / name
    if name.endswith(".ckpt"):
        torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    elif content is not None:
        path.write_bytes(content)
    rc, out, err = _run(capsys, "inspect", str(path))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"eri inspect: {path}: ") and expect in err


def test_inspect_pickle_allowed(model_file, tmp_path, capsys):
    _, path = model_file
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": safetensors.torch.load_file(str(path))}, ckpt)
    rc, out, _ = _run(capsys, "inspect", str(ckpt), "--allow-pickle", "--json")
    r = json.loads(out)
    assert rc == 0 and r["family"] == "sd15-tiny" and r["format"].startswith("pickle")


def test_inspect_base_model_family_unknown(tmp_path, capsys):
    path = tmp_path / "vae.safetensors"
    vae = {"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_in.weight": torch.zeros(1)}
    safetensors.torch.save_file(vae, str(path))
    rc, _, err = _run(capsys, "inspect", str(path))
    assert rc == 2 and "is a standalone VAE" in err


def test_weight_errors_caught_for_every_command(monkeypatch, capsys):
    def boom(args):
        keys = ["model.diffusion_model.out.2.bias"]
        raise WeightNotFound("model.diffusion_model.out.2.weight", "x.safetensors", keys)

    monkeypatch.setitem(cli.COMMANDS, "boom", cli.Command("boom", "raises", boom, ()))
    rc, out, err = _run(capsys, "boom")
    assert rc == 2 and out == ""
    assert err == (
        "eri boom: x.safetensors: key 'model.diffusion_model.out.2.weight' not found; "
        "closest: model.diffusion_model.out.2.bias\n"
    )
    assert "inspect" in cli.COMMANDS


def test_subprocess(model_file, tmp_path):
    _, path = model_file
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "eridiffusion.cli", "inspect", str(path), "--json"],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["family"] == "sd15-tiny"
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(path.read_bytes()[:1000])
    res = subprocess.run([sys.executable, "-m", "eridiffusion.cli", "inspect", str(bad)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1 and "truncated" in res.stderr


def test_bench_runs_the_benchmark_script_and_needs_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--cases", "b1_eager"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]


def test_bench_help_is_the_benchmark_scripts_own(capsys):
    assert cli.main(["bench", "--help"]) == 0
    assert "--cases" in capsys.readouterr().out
