"""The web UI in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright)
against `eri ui --demo` in a child process. Edits a caption, starts a 20-step demo run from
the Train page, watches the loss chart and a sample grid appear, stops it, finds it under Runs
and renders an image on the Sample page. Screenshots of each page go to $ERI_UI_SCREENSHOTS
(the README's docs/ui/*.png: `ERI_UI_SCREENSHOTS=docs/ui pytest tests/ui/test_browser.py`),
else to the test's temporary folder."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not found: `make install-test` installs Debian's chromium (as root, with apt)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield browser
        browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


@pytest.fixture
def server(tmp_path):
    """`eri ui --root ROOT --demo` on a free port; yields (url, root). Training children get one thread each."""
    root, port = tmp_path / "ui-demo", _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "eridiffusion.cli", "ui", "--root", str(root), "--demo", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            _get(url + "api/health")
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"eri ui did not start: {proc.stdout.read()}")
            time.sleep(0.2)
    yield url, root
    child = _get(url + "api/train/status")
    if child["state"] in ("running", "stopping"):
        os.kill(child["pid"], signal.SIGKILL)
    proc.send_signal(signal.SIGINT)
    proc.wait(20)


def test_dataset_train_live_runs_sample_in_chromium(browser, server, tmp_path):
    url, root = server
    shots = Path(os.environ.get("ERI_UI_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(30_000)

    # Dataset: thumbnails, buckets; edit one caption in place
    page.goto(url + "#dataset")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_function("document.querySelectorAll('#ds-grid .card').length === 12")
    card = page.locator('.card[data-path="data/shape_002.png"]')
    card.locator("textarea").fill("sks style, a yellow triangle on a purple background")
    card.locator("button.save").click()
    card.locator(".saved.ok").wait_for()
    assert (root / "data" / "shape_002.txt").read_text() == "sks style, a yellow triangle on a purple background\n"
    assert "bucket 160×96" in page.locator('.card[data-path="data/shape_001.png"]').inner_text()
    page.screenshot(path=shots / "dataset.png")

    # Train: an invalid value is named beside its field; then a 20-step run of the demo
    page.click("nav a[data-page=train]")
    steps = page.locator('[id="f-train.max_steps"]')
    steps.fill("-5")
    error = page.locator('[id="err-train.max_steps"]')
    page.wait_for_function("document.getElementById('err-train.max_steps').textContent.includes('-5 is invalid')")
    steps.evaluate("el => el.scrollIntoView({block: 'center'})")
    page.screenshot(path=shots / "train.png")
    steps.fill("20")
    for key, value in {"log.every": "1", "sample.every_n_steps": "5", "save.every_n_steps": "0",
                       "save.output_dir": "runs/ui-test"}.items():  # fmt: skip
        page.locator(f'[id="f-{key}"]').fill(value)
    page.wait_for_function("document.getElementById('err-train.max_steps').textContent === ''")
    assert error.inner_text() == ""
    page.click("#tr-start")

    # Live run: the chart gets points and a sample grid appears; stop
    page.wait_for_selector("#page-live.active")
    page.wait_for_function("Number(document.getElementById('lv-chart').dataset.points) >= 3", timeout=120_000)
    page.wait_for_function("document.getElementById('lv-sample').naturalWidth > 0", timeout=120_000)
    page.screenshot(path=shots / "live.png")
    page.click("#lv-stop")
    page.wait_for_function("/stopped|finished/.test(document.getElementById('lv-state').textContent)", timeout=90_000)
    assert page.locator("#lv-state").inner_text() in ("stopped (exit 130)", "finished (exit 0)")
    assert (root / "runs" / "ui-test" / "state" / "state.json").is_file()

    # Runs: the run, its LoRA file with the inspect details, its loss plot
    page.click("nav a[data-page=runs]")
    page.click('tr.run[data-dir="runs/ui-test"]')
    page.wait_for_selector("#rn-detail h2:text('runs/ui-test')")
    detail = page.locator("#rn-detail").inner_text()
    assert ".safetensors" in detail and "unet 198" in detail and "download" in detail
    page.wait_for_function("document.querySelector('#rn-detail img.plot').naturalWidth > 0")
    page.screenshot(path=shots / "runs.png")

    # Sample: the trained LoRA on the tiny model
    page.click("nav a[data-page=sample]")
    page.wait_for_function("document.querySelectorAll('#sm-model option').length > 0")
    page.click("#sm-add-lora")
    page.fill("#sm-steps", "8")
    page.click("#sm-go")
    page.wait_for_function("document.querySelector('img.result') && document.querySelector('img.result').naturalWidth > 0",
                           timeout=90_000)  # fmt: skip
    assert "seed\t0" in page.locator("#sm-result").inner_text()
    page.screenshot(path=shots / "sample.png")
    page.close()
    assert errors == []
