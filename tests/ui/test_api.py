"""The API on a demo root: token and Host checks, the Dataset page's scan and caption edits,
runs, live metrics, sampling."""

import json
import subprocess
import sys
import time

import pytest
from starlette.testclient import TestClient

from eridiffusion.data.dataset import SKIP_NOT_IMAGE
from eridiffusion.ui import create_app, runs
from eridiffusion.ui.paths import Root



def test_token_is_required_on_every_request_when_set(demo_root):
    app = create_app(demo_root, token="s3cret", local=False)
    with TestClient(app, base_url="http://192.0.2.7:7860") as c:
        for path in ("/", "/static/app.js", "/api/health", "/api/runs", "/api/file?path=data/shape_000.txt"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"X-Eri-Token": "wrong"}).status_code == 401, path
        assert c.get("/api/health", params={"token": "s3cret"}).json()["ok"]
        assert c.get("/api/health", headers={"X-Eri-Token": "s3cret"}).status_code == 200
        assert c.get("/api/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/api/train/stop", json={}).status_code == 401
        page = c.get("/", params={"token": "s3cret"}).text
        assert 'src="/static/app.js?token=s3cret"' in page  # the page's own assets carry it
        assert c.get("/static/app.js", params={"token": "s3cret"}).status_code == 200


def test_local_server_answers_only_to_loopback_names_and_same_origin_json(client):
    assert client.get("/api/health").status_code == 200
    assert client.get("http://localhost/api/health").status_code == 200
    assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 403  # DNS rebinding
    r = client.post("/api/caption", content=json.dumps({"path": "data/shape_000.png", "caption": "x"}),
                    headers={"Content-Type": "text/plain"})  # fmt: skip
    assert r.status_code == 415  # what a cross-site <form> can send
    r = client.post("/api/train/stop", json={}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403


def test_serve_prints_a_generated_token_when_bound_elsewhere(monkeypatch, tmp_path, capsys):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    from eridiffusion.cli import main

    assert main(["ui", "--root", str(tmp_path), "--host", "0.0.0.0", "--port", "7999"]) == 0
    out = capsys.readouterr().out
    token = out.split("?token=")[1].split()[0]
    assert len(token) >= 20 and "generated" in out and seen["host"] == "0.0.0.0" and seen["port"] == 7999


def test_missing_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "starlette", None)  # import starlette → ImportError
    from eridiffusion.cli import main

    assert main(["ui"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "eri ui: the web UI needs starlette, which is not installed: pip install 'eridiffusion[ui]'"


def test_dataset_scan_is_the_trainers(client, demo_root):
    (demo_root / "data" / "broken.png").write_bytes(b"\x89PNG not really")
    try:
        folders = client.get("/api/folders").json()
        assert {"dir": "data", "images": 13} in folders
        d = client.get("/api/dataset", params={"dir": "data", "resolution": 128, "bucket_step": 32,
                                                "bucket_min": 64, "bucket_max": 256}).json()  # fmt: skip
    finally:
        (demo_root / "data" / "broken.png").unlink()
    assert len(d["items"]) == 12 and d["skipped"] == [{"path": "data/broken.png", "reason": SKIP_NOT_IMAGE}]
    first = d["items"][0]
    assert first["path"] == "data/shape_000.png" and first["bucket"] == [128, 128] and first["size"] == [128, 128]
    assert d["items"][1]["bucket"] == [96, 160]  # 192×128 landscape
    assert d["buckets"] == {"96x160": 6, "128x128": 6}
    assert first["tokens"] == 7 and d["stats"]["tokens_max"] == 7 and d["stats"]["over_limit"] == 0
    assert d["stats"]["words"][0] == ["background", 12]
    thumb = client.get("/api/thumb", params={"path": first["path"], "size": 64})
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    assert client.get("/api/thumb", params={"path": "data/shape_000.txt"}).status_code == 400  # not an image
    assert client.get("/api/thumb", params={"path": "data/none.png"}).status_code == 404


def test_caption_edit_changes_the_file(client, demo_root):
    txt = demo_root / "data" / "shape_003.txt"
    before = txt.read_text()
    try:
        r = client.post("/api/caption", json={"path": "data/shape_003.png", "caption": "  sks diamond, purple  "})
        assert r.json() == {"path": "data/shape_003.txt", "caption": "sks diamond, purple", "tokens": 4}
        assert txt.read_text() == "sks diamond, purple\n"
        assert not [p for p in txt.parent.iterdir() if p.name.endswith(".tmp")]  # atomic: no temp file left
        assert client.post("/api/caption", json={"path": "data/shape_003.txt", "caption": "x"}).status_code == 400
        assert client.post("/api/caption", json={"path": "data/none.png", "caption": "x"}).status_code == 404
    finally:
        txt.write_text(before)


def test_runs_and_live_metrics(client, demo_root):
    run = demo_root / "runs" / "listed"
    (run / "samples").mkdir(parents=True)
    (run / "config.toml").write_text(client.post("/api/validate", json={"config": client.get("/api/presets").json()[0]["config"]}).json()["toml"])
    rows = [(s, 1.0 / s, 1e-3, 0.5 * s) for s in range(1, 11)]
    (run / "loss.csv").write_text("step,loss,lr,time\n" + "".join(f"{s},{l},{lr},{t}\n" for s, l, lr, t in rows) + "11,0.")
    (run / "samples" / "step000010.png").write_bytes((demo_root / "data" / "shape_000.png").read_bytes())
    (run / runs.LOG_NAME).write_text("start\ntrain: 1/100\rtrain: 10/100 [loss=0.1, mem=3.2G]\n")
    listed = client.get("/api/runs").json()
    entry = next(r for r in listed if r["dir"] == "runs/listed")
    assert entry["step"] == 10 and entry["total"] == 100 and entry["state"] is None
    d = client.get("/api/run", params={"dir": "runs/listed"}).json()
    assert d["config"].startswith("[model]") and d["samples"] == ["runs/listed/samples/step000010.png"]
    live = client.get("/api/live", params={"dir": "runs/listed", "once": 1})
    assert live.headers["content-type"].startswith("text/event-stream")
    event = json.loads(live.text.removeprefix("data: "))
    assert event["reset"] and len(event["rows"]) == 10  # the partial last line is left out
    assert event["step"] == 10 and event["its"] == pytest.approx(2.0) and event["eta"] == pytest.approx(45.0)
    assert event["mem"] == "3.2G" and event["log"].endswith("train: 10/100 [loss=0.1, mem=3.2G]")
    assert event["sample"] == "runs/listed/samples/step000010.png"
    tail = runs.LiveTail(Root(demo_root), run)
    assert len(tail.poll()["rows"]) == 10
    with open(run / "loss.csv", "a") as f:
        f.write("5,0.001,5.5\n12,0.08,0.001,6.0\n")
    again = tail.poll()
    assert not again["reset"] and [r[0] for r in again["rows"]] == [11.0, 12.0]


@pytest.mark.slow
def test_sample_page_renders_through_eri_sample(client, demo_root, one_thread):
    weights = client.get("/api/weights").json()
    assert "tiny_sdxl.safetensors" in weights["models"]
    body = {"model": "tiny_sdxl.safetensors", "prompt": "a red circle", "negative": "", "sampler": "euler",
            "steps": 2, "cfg": 5, "seed": 7, "width": 64, "height": 64}  # fmt: skip
    job = client.post("/api/sample", json=body).json()
    deadline = time.time() + 120
    while job["state"] == "running" and time.time() < deadline:
        time.sleep(0.5)
        job = client.get(f"/api/sample/{job['id']}").json()
    assert job["state"] == "done", job["log"]
    (png,) = job["files"]
    assert png["path"].startswith("samples/") and png["params"]["seed"] == 7 and png["params"]["size"] == [64, 64]
    assert client.get("/api/file", params={"path": png["path"]}).content[:4] == b"\x89PNG"
    bad = client.post("/api/sample", json={**body, "width": 65}).json()
    while bad["state"] == "running":
        time.sleep(0.5)
        bad = client.get(f"/api/sample/{bad['id']}").json()
    assert bad["state"] == "failed" and "65" in bad["error"]


def test_eri_ui_without_the_extra_is_not_imported_by_the_cli():
    """`eri --help` must work without starlette: the ui command imports it only when run."""
    code = "import sys; sys.modules['starlette'] = None; from eridiffusion.cli import build_parser; build_parser()"
    subprocess.run([sys.executable, "-c", code], check=True)
