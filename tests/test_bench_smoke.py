"""The end-to-end benchmarks run on the CPU with --tiny and write complete, finite JSON.

bench/e2e.py: writes a tiny SDXL-layout checkpoint, reads and loads it, and trains through
`eri train` in a fresh process; bench/vae_sample.py: VAE encode and DPM++ 2M sampling, ours
against diffusers on the same weights (the parity row must show the same computation).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
STEPS = 4


def run_script(name: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / name), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def positive(row: dict, *keys: str) -> None:
    for k in keys:
        v = row[k]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (k, v, row)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    out = work / "e2e.json"
    proc = run_script("e2e.py", "--tiny", "--workdir", str(work), "--out", str(out), "--steps", str(STEPS),
                      "--images", "4", "--set", "train.gradient_checkpointing=false")  # fmt: skip
    return work, json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def vae_sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("vs") / "vs.json"
    proc = run_script("vae_sample.py", "--tiny", "--steps", "2", "--out", str(out))
    return json.loads(out.read_text()), proc.stdout


def test_e2e_checkpoint_rows(e2e):
    work, result, stdout = e2e
    rows = result["rows"]
    assert [r["stage"] for r in rows] == ["write", "read", "read", "load", "load", "load", "load", "train"]
    # every stdout JSON line is one row (plus the env line), so a killed run still leaves data
    lines = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    assert lines[0] == {"env": result["env"]} and lines[1:] == rows

    write = rows[0]
    ckpt = work / "random_sdxl-tiny_fp16.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        assert write["tensors"] == len(list(f.keys()))
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    assert write["file_gb"] * 1e9 == ckpt.stat().st_size
    positive(write, "build_s", "s", "gb_per_s")

    cold, warm = rows[1], rows[2]
    for r in (cold, warm):
        positive(r, "s", "gb_per_s")
    assert cold["fadvise_dontneed"] is True and warm["fadvise_dontneed"] is False
    assert warm["resident_before"] > 0.95 and warm["cache"] == "warm"  # mincore sees the file just read

    loads = rows[3:7]
    assert [(r["impl"], r["fadvise_dontneed"]) for r in loads] == [
        ("checkpoint.load", True), ("checkpoint.load", False), ("safetensors.load_file", True),
        ("safetensors.load_file", False),
    ]  # fmt: skip
    for r in loads:
        positive(r, "s", "gb_per_s", "peak_gib")


def test_e2e_train_row(e2e):
    work, result, _ = e2e
    train = result["rows"][-1]
    assert train["rc"] == 0 and "error" not in train
    positive(train, "total_s", "startup_s", "load_s", "cache_and_setup_s", "time_to_first_step_s", "loop_s",
             "steady_s_per_step", "img_per_s", "loss_first", "loss_last")  # fmt: skip
    assert train["startup_s"] < train["time_to_first_step_s"] < train["total_s"]
    assert train["batch"] == 1 and train["steps"] == STEPS and train["gradient_checkpointing"] is False
    losses = train["losses"]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    # the loss curve is the run's own loss.csv, and the LoRA file was written
    csv_rows = (work / "run_b1" / "loss.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[1]) for r in csv_rows] == losses
    assert train["lora_written"] and Path(train["lora_file"]).is_file()
    assert train["cmd"].startswith("eri train ") and f"train.max_steps={STEPS}" in train["cmd"]


def test_vae_sample_rows(vae_sample):
    result, stdout = vae_sample
    rows = result["rows"]
    ops = ["vae_encode", "vae_encode", "sample_loop", "vae_decode", "total (generate, PIL)"]
    ours = [r for r in rows if r["impl"] == "eridiffusion"]
    assert [r["op"] for r in ours] == ops
    assert [r["batch"] for r in ours if r["op"] == "vae_encode"] == [1, 2]
    for r in ours:
        positive(r, "peak_gib", "s_per_batch" if r["op"] == "vae_encode" else "s_per_image")
    assert all(r["steps"] == 2 and r["unet_batch"] == 2 for r in ours if r["op"] != "vae_encode")
    header = [ln.split() for ln in stdout.splitlines() if ln.split()[:2] == ["impl", "op"]]
    assert header and "time_ratio_ours_over_peer" in header[0]  # the table is printed

    # diffusers is installed in the test environment: the peer rows and the ratios are there
    peer = [r for r in rows if r["impl"] == "diffusers"]
    assert [r["op"] for r in peer] == ops
    for r in ours:
        positive(r, "time_ratio_ours_over_peer")


def test_vae_sample_parity_with_diffusers(vae_sample):
    """Same weights, same inputs: both VAEs, one UNet forward and the whole 2-step DPM++ 2M
    trajectory (fp32 on the CPU) agree, so the timings compare the same computation."""
    (parity,) = [r for r in vae_sample[0]["rows"] if r["impl"] == "parity"]
    print({k: f"{v:.3g}" for k, v in parity.items() if isinstance(v, float)})
    assert parity["dtype"] == "float32"
    assert parity["vae_encode_max_abs_diff"] <= 1e-5 * parity["vae_encode_max_abs"]
    assert parity["unet_forward_max_abs_diff"] <= 1e-4 * parity["unet_forward_max_abs"]
    assert parity["final_latents_max_abs_diff"] <= 1e-4 * parity["final_latents_max_abs"]
    assert parity["unet_forward_max_abs"] > 0.01 and parity["final_latents_max_abs"] > 0.1  # not all zeros
