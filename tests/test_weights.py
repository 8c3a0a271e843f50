"""WeightLoader: lazy safetensors access, content-based format detection, one-line typed errors."""

import json
import struct

import pytest
import safetensors.torch
import torch

from eridiffusion.weights import (
    NotACheckpoint,
    PickleRefused,
    ShapeMismatch,
    WeightError,
    WeightLoader,
    WeightNotFound,
)

TENSORS = {
    "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
    "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8),
    "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3).to(torch.float16),
    "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3).to(torch.bfloat16),
    "position_ids": torch.arange(77).unsqueeze(0),
}


@pytest.fixture
def st_file(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(TENSORS, str(path), metadata={"ss_network_dim": "8"})
    return path


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg and msg
    return msg


def test_header_introspection(st_file):
    with WeightLoader(st_file) as w:
        assert sorted(w.keys()) == sorted(TENSORS)
        assert len(w) == len(TENSORS)
        assert "position_ids" in w and "nope" not in w
        for k, t in TENSORS.items():
            assert w.shape(k) == t.shape
            assert w.dtype(k) == t.dtype
        assert w.metadata == {"ss_network_dim": "8"}
        assert w.nbytes == sum(t.numel() * t.element_size() for t in TENSORS.values())
        assert w.path == st_file


def test_closed_loader_refuses_reads(st_file):
    with WeightLoader(st_file) as w:
        pass
    assert w.shape("position_ids") == (1, 77)  # the header stays readable
    with pytest.raises(ValueError, match="closed"):
        w.get("position_ids")


def test_get_values_and_casts(st_file):
    with WeightLoader(st_file) as w:
        for k, t in TENSORS.items():
            assert torch.equal(w.get(k), t)
        k = "model.diffusion_model.input_blocks.0.0.weight"
        got = w.get(k, dtype=torch.bfloat16, device="cpu")
        assert got.dtype == torch.bfloat16 and got.device.type == "cpu"
        assert torch.equal(got, TENSORS[k].to(torch.bfloat16))
        got = w.tensor("model.diffusion_model.out.2.weight", (4, 8, 3, 3), dtype=torch.float32)
        assert got.dtype == torch.float32
        assert torch.equal(got, TENSORS["model.diffusion_model.out.2.weight"].float())


def test_missing_key_names_closest(st_file):
    with WeightLoader(st_file) as w, pytest.raises(WeightNotFound) as e:
        w.get("model.diffusion_model.input_blocks.0.0.weigth")
    msg = _one_line(e.value)
    assert str(st_file) in msg and "input_blocks.0.0.weigth" in msg
    assert e.value.closest[0] == "model.diffusion_model.input_blocks.0.0.weight"
    assert len(e.value.closest) <= 3
    assert "closest: model.diffusion_model.input_blocks.0.0.weight" in msg
    assert isinstance(e.value, WeightError)


def test_wrong_shape(st_file):
    with WeightLoader(st_file) as w, pytest.raises(ShapeMismatch) as e:
        w.tensor("model.diffusion_model.input_blocks.0.0.weight", (320, 4, 3, 3))
    msg = _one_line(e.value)
    assert "[8, 4, 3, 3]" in msg and "[320, 4, 3, 3]" in msg and str(st_file) in msg
    assert e.value.expected == [320, 4, 3, 3] and e.value.found == [8, 4, 3, 3]


def test_truncated_data(st_file, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(st_file.read_bytes()[:-10])
    with pytest.raises(NotACheckpoint, match="truncated") as e:
        WeightLoader(bad)
    assert str(bad) in _one_line(e.value)


def test_truncated_header(st_file, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(st_file.read_bytes()[:40])
    with pytest.raises(NotACheckpoint, match="truncated"):
        WeightLoader(bad)


def test_zero_bytes(tmp_path):
    bad = tmp_path / "empty.safetensors"
    bad.write_bytes(b"")
    with pytest.raises(NotACheckpoint, match="empty") as e:
        WeightLoader(bad)
    _one_line(e.value)


def test_random_bytes(tmp_path):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(bytes(range(7, 256)) * 4)
    with pytest.raises(NotACheckpoint, match="not a safetensors file") as e:
        WeightLoader(bad)
    _one_line(e.value)


def test_header_not_json(tmp_path):
    body = b"{not json at all}"
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(NotACheckpoint, match="not JSON") as e:
        WeightLoader(bad)
    _one_line(e.value)


def test_header_entry_incomplete(tmp_path):
    body = json.dumps({"a": {"dtype": "F32"}}).encode()
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(NotACheckpoint, match="'a' lacks dtype/shape/data_offsets"):
        WeightLoader(bad)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(NotACheckpoint, match="is a directory"):
        WeightLoader(tmp_path)
    with pytest.raises(NotACheckpoint, match="no such file"):
        WeightLoader(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.pth", "pytorch_model.bin", "disguised.safetensors"])
def test_pickle_refused_by_default(tmp_path, name):
    path = tmp_path / name
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(PickleRefused) as e:
        WeightLoader(path)
    msg = _one_line(e.value)
    assert "pickle" in msg and "--allow-pickle" in msg and str(path) in msg


def test_pickle_allowed_reads_weights_only(tmp_path):
    path = tmp_path / "model.ckpt"
    sd = {"a.weight": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save({"state_dict": sd, "global_step": 7}, path)
    with WeightLoader(path, allow_pickle=True) as w:
        assert sorted(w.keys()) == ["a.weight", "b"]  # state_dict unwrapped, non-tensors dropped
        assert w.shape("a.weight") == (3, 2) and w.dtype("b") == torch.int64
        assert torch.equal(w.get("a.weight"), sd["a.weight"])
        assert w.get("a.weight", dtype=torch.float16).dtype == torch.float16
        assert w.metadata == {}


class _Exploit:
    """Unpickling this calls open(marker, "w"): proof that code would run with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_refused_even_when_allowed(tmp_path):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Exploit(marker)}, path)
    with pytest.raises(PickleRefused, match="weights_only") as e:
        WeightLoader(path, allow_pickle=True)
    _one_line(e.value)
    assert not marker.exists()


def test_safetensors_with_pickle_extension_is_read_by_content(st_file, tmp_path):
    path = tmp_path / "really_safetensors.bin"
    path.write_bytes(st_file.read_bytes())
    with WeightLoader(path) as w:
        assert torch.equal(w.get("position_ids"), TENSORS["position_ids"])
