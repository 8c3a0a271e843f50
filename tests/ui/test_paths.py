"""Every path the UI reads or writes stays under its root: '..', absolute paths elsewhere and
symlinks that leave the root are refused, by `Root` and by every endpoint that takes a path."""

import os

import pytest

from eridiffusion.ui.paths import BadPath, PathRefused, Root


@pytest.fixture
def outside(tmp_path):
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(b"not yours")
    return secret


def test_root_resolves_inside_and_refuses_escapes(tmp_path, outside):
    root = Root(tmp_path / "root")
    (tmp_path / "root" / "a").mkdir(parents=True)
    assert root.resolve("a") == (tmp_path / "root" / "a").resolve()
    assert root.resolve(str(tmp_path / "root" / "a" / "x.txt")).name == "x.txt"  # absolute inside: fine
    assert root.resolve(".") == root.path
    for bad in ("..", "../outside/secret.png", "a/../../outside", "a/../a", str(outside), "/etc/passwd"):
        with pytest.raises(PathRefused):
            root.resolve(bad)
    os.symlink(outside, tmp_path / "root" / "link.png")
    os.symlink(outside.parent, tmp_path / "root" / "a" / "dir")
    for bad in ("link.png", "a/dir/secret.png", "a/dir"):
        with pytest.raises(PathRefused):
            root.resolve(bad)
    for bad in ("", "a\0b"):
        with pytest.raises(BadPath):
            root.resolve(bad)


@pytest.fixture
def links(demo_root, outside):
    """A file and a folder symlinked out of the root, and a caption .txt symlinked out."""
    made = [demo_root / "escape.png", demo_root / "escape_dir", demo_root / "data" / "shape_011.txt"]
    os.symlink(outside, made[0])
    os.symlink(outside.parent, made[1])
    original = made[2].read_text()
    made[2].unlink()
    os.symlink(outside.parent / "caption.txt", made[2])
    yield outside
    for p in made:
        p.unlink()
    made[2].write_text(original)


def test_endpoints_refuse_paths_outside_the_root(client, demo_root, links):
    outside = links
    escapes = ["../outside/secret.png", str(outside), "escape.png", "escape_dir/secret.png", "data/../../x.png"]
    for path in escapes:
        for endpoint in ("/api/file", "/api/thumb"):
            r = client.get(endpoint, params={"path": path})
            assert r.status_code == 403, (endpoint, path, r.text)
            assert "not yours" not in r.text
        assert client.get("/api/dataset", params={"dir": path}).status_code == 403
        assert client.get("/api/run", params={"dir": path}).status_code == 403
        assert client.get("/api/live", params={"dir": path, "once": 1}).status_code == 403
        r = client.post("/api/caption", json={"path": path, "caption": "pwned"})
        assert r.status_code == 403, (path, r.text)
        assert client.post("/api/train/resume", json={"dir": path}).status_code == 403
        r = client.post("/api/sample", json={"model": path, "prompt": "x"})
        assert r.status_code == 403
    assert outside.read_bytes() == b"not yours"
    # a caption whose .txt is a symlink out of the root is not written through
    r = client.post("/api/caption", json={"path": "data/shape_011.png", "caption": "pwned"})
    assert r.status_code == 403
    assert not (outside.parent / "caption.txt").exists()
    assert client.get("/api/file", params={"path": "a\0b"}).status_code == 400


def test_config_paths_outside_the_root_are_field_errors(client, tmp_path):
    cfg = client.get("/api/presets").json()[0]["config"]
    cfg["model"]["path"] = "../tiny.safetensors"
    cfg["data"]["dir"] = "/etc"
    cfg["save"]["output_dir"] = str(tmp_path / "elsewhere")
    r = client.post("/api/train/start", json={"config": cfg})
    assert r.status_code == 400
    errors = r.json()["errors"]
    assert set(errors) == {"model.path", "data.dir", "save.output_dir"}
    assert "'..' is not allowed" in errors["model.path"] and "outside the UI root" in errors["data.dir"]
    assert not (tmp_path / "elsewhere").exists()
