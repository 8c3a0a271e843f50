"""Fixtures of the web-UI tests: a prepared demo root and a TestClient on it (CPU, no browser)."""

import pytest

pytest.importorskip("starlette", reason="the web UI needs the [ui] extra: pip install -e '.[test,ui]'")
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx: pip install -e '.[test]'")

from starlette.testclient import TestClient  # noqa: E402

from eridiffusion.tiny import prepare  # noqa: E402
from eridiffusion.ui import create_app  # noqa: E402

LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A root holding the tiny checkpoint and the 12-image demo dataset (written once)."""
    root = tmp_path_factory.mktemp("ui-root")
    prepare(root, log=lambda s: None)
    return root


@pytest.fixture
def client(demo_root):
    with TestClient(create_app(demo_root, demo=True), base_url=LOCAL) as c:
        yield c


@pytest.fixture
def one_thread(monkeypatch):
    """Child trainers with one torch thread: tiny models are fastest so, and other jobs on the CPU do not stall them."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
