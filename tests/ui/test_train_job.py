"""Training from the UI runs as a child `eri train`: a stop request (SIGINT) saves the state,
and a resume continues the run exactly where it stopped (same losses, same LoRA as a run never
stopped)."""

import copy
import time

import pytest
import torch
from safetensors.torch import load_file

STEPS = 30


def _config(client, out: str) -> dict:
    cfg = copy.deepcopy(client.get("/api/presets").json()[0]["config"])  # the demo
    cfg["train"]["max_steps"] = STEPS
    cfg["log"]["every"] = 1
    cfg["sample"]["every_n_steps"] = 0
    cfg["save"]["every_n_steps"] = 0
    cfg["save"]["output_dir"] = out
    cfg["cache"]["dir"] = "cache"  # shared by the runs: keyed by content
    return cfg


def _wait(client, timeout: float = 240) -> dict:
    job = client.app.state.ui.job
    job.wait(timeout)
    return client.get("/api/train/status").json()


def _losses(folder) -> list[tuple[int, float]]:
    lines = (folder / "loss.csv").read_text().splitlines()[1:]
    return [(int(r.split(",")[0]), float(r.split(",")[1])) for r in lines]


@pytest.mark.slow
def test_stop_saves_the_state_and_resume_continues_exactly(client, demo_root, one_thread):
    r = client.post("/api/train/start", json={"config": _config(client, "runs/reference")})
    assert r.status_code == 200, r.text
    assert client.post("/api/train/start", json={"config": _config(client, "runs/other")}).status_code == 409
    status = _wait(client)
    assert status["state"] == "finished" and status["exit_code"] == 0, (demo_root / "runs/reference/ui-train.log").read_text()
    reference = demo_root / "runs" / "reference"

    r = client.post("/api/train/start", json={"config": _config(client, "runs/stopped")})
    assert r.json()["state"] == "running" and r.json()["command"].startswith("eri train ")
    folder = demo_root / "runs" / "stopped"
    deadline = time.time() + 120
    while time.time() < deadline and len(_losses(folder) if (folder / "loss.csv").is_file() else []) < 2:
        time.sleep(0.05)
    assert client.post("/api/train/stop", json={}).json()["state"] == "stopping"
    status = _wait(client)
    log = (folder / "ui-train.log").read_text()
    assert status["state"] == "stopped" and status["exit_code"] == 130, log
    assert "stopped by SIGINT" in log
    run = client.get("/api/run", params={"dir": "runs/stopped"}).json()
    stopped_at = run["state"]
    assert 2 <= stopped_at < STEPS and run["step"] == stopped_at
    assert [lo["file"] for lo in run["loras"]] == [f"lora-step{stopped_at}.safetensors"]
    assert run["loras"][0]["kind"] == "lora" and run["loras"][0]["ranks"] == {"8": run["loras"][0]["modules"]}

    r = client.post("/api/train/resume", json={"dir": "runs/stopped"})
    assert "--resume" in r.json()["command"]
    status = _wait(client)
    assert status["state"] == "finished", (folder / "ui-train.log").read_text()
    assert _losses(folder) == _losses(reference)  # steps 1..STEPS, the same numbers
    assert [s for s, _ in _losses(folder)] == list(range(1, STEPS + 1))
    ours, theirs = load_file(folder / "lora.safetensors"), load_file(reference / "lora.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # resuming a finished run: one line saying there is nothing to train (issue 20), exit 2
    assert client.post("/api/train/resume", json={"dir": "runs/stopped"}).status_code == 200
    assert _wait(client)["exit_code"] == 2
    assert "nothing to train" in (folder / "ui-train.log").read_text().splitlines()[-1]
