"""WeightLoader: lazy safetensors access, content-based format detection, one-line typed errors."""

import json
import os
import struct

import pytest
import safetensors.torch
import torch

from eridiffusion import weights
from eridiffusion.weights import (
    NotACheckpoint,
    PickleRefused,
    ReadFailed,
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


# -- read_many: the parallel path checkpoint.load takes ------------------------------------
def _every_dtype():
    """One tensor per stored dtype read_many must handle, plus a scalar and zero-element tensors."""
    g = torch.Generator().manual_seed(5)
    f = torch.randn(33, 7, generator=g) * 100
    return {
        "f16": f.to(torch.float16),
        "bf16": f.to(torch.bfloat16),
        "f32": torch.randn(5, 3, 4, generator=g),
        "f64": torch.randn(301, generator=g, dtype=torch.float64),
        "i64": torch.randint(-(2**62), 2**62, (3, 9), generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (17,), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 256, (4, 4, 4), generator=g, dtype=torch.uint8),
        "bool": torch.rand(29, generator=g) > 0.5,
        "scalar": torch.tensor(0.1234, dtype=torch.float32),
        "empty_f16": torch.empty(0, 8, dtype=torch.float16),
        "empty_i64": torch.empty(4, 0, dtype=torch.int64),
        "big_f32": torch.randn(257, 129, generator=g),  # 132 KB: several chunks when _CHUNK is small
    }


def _identical(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Same dtype, shape, device, layout and bits; fresh 64-byte aligned memory like get()'s."""
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.device == ref.device
    assert got.is_contiguous() and got.data_ptr() % 64 == 0
    assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))


@pytest.fixture
def dtype_file(tmp_path):
    path = tmp_path / "dtypes.safetensors"
    safetensors.torch.save_file(_every_dtype(), str(path))
    return path


@pytest.mark.parametrize("cast", [None, torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("workers", [1, 3, 8])
def test_read_many_equals_get_every_dtype(dtype_file, monkeypatch, cast, workers):
    """Bit for bit what get() returns, for every stored dtype, cast or not, scalar and empty tensors
    included, with tensors split over several 4 KiB chunks through the staging buffer."""
    monkeypatch.setattr(weights, "_CHUNK", 4096)
    tensors = _every_dtype()
    with WeightLoader(dtype_file) as w:
        got = w.read_many([(k, t.shape, cast) for k, t in tensors.items()], device="cpu", workers=workers)
        assert list(got) == list(tensors)  # request order
        for k, t in tensors.items():
            ref = w.get(k, dtype=cast)
            _identical(got[k], ref)
            assert torch.equal(ref, t if cast is None else t.to(cast))  # and get() reads the file right


def test_read_many_many_tensors_many_threads(tmp_path):
    g = torch.Generator().manual_seed(7)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.uint8)
    tensors = {
        f"t{i}": (torch.randn(int(torch.randint(0, 3000, (1,), generator=g)), generator=g) * 10).to(dtypes[i % 5])
        for i in range(400)
    }
    path = tmp_path / "many.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    keys = list(tensors)[::-1]  # not in file order
    with WeightLoader(path) as w:
        got = w.read_many([(k, None, torch.bfloat16 if i % 2 else None) for i, k in enumerate(keys)], workers=16)
        assert list(got) == keys
        for i, k in enumerate(keys):
            _identical(got[k], w.get(k, dtype=torch.bfloat16 if i % 2 else None))


def test_read_many_checks_every_shape_before_reading(dtype_file, monkeypatch):
    reads = []
    monkeypatch.setattr(weights, "_host_buffer", lambda n, pinned: reads.append(n))
    monkeypatch.setattr(os, "preadv", lambda *a: reads.append(a))
    tensors = _every_dtype()
    requests = [(k, t.shape, None) for k, t in tensors.items()]
    with WeightLoader(dtype_file) as w:
        with pytest.raises(ShapeMismatch) as e:
            w.read_many([*requests, ("f32", (5, 4, 3), None)])
        assert e.value.key == "f32" and e.value.found == [5, 3, 4] and e.value.expected == [5, 4, 3]
        assert str(dtype_file) in _one_line(e.value)
        with pytest.raises(WeightNotFound):
            w.read_many([*requests, ("f33", (5, 3, 4), None)])
    assert reads == []
    with pytest.raises(ValueError, match="closed"):
        w.read_many(requests)


def test_read_many_truncated_after_opening(dtype_file):
    """A file cut short after its header was read: a one-line error naming the file and the cut
    tensor, never garbage; tensors before the cut still read."""
    tensors = _every_dtype()
    with WeightLoader(dtype_file) as w:
        last = max(w.keys(), key=lambda k: w._header[k]["data_offsets"][1])
        begin, end = w._header[last]["data_offsets"]
        os.truncate(dtype_file, w._data_start + (begin + end) // 2)
        for workers in (1, 8):
            with pytest.raises(ReadFailed) as e:
                w.read_many([(k, None, None) for k in tensors], workers=workers)
            msg = _one_line(e.value)
            assert str(dtype_file) in msg and repr(last) in msg and "truncated" in msg
            assert e.value.key == last and isinstance(e.value, WeightError)
        rest = [k for k in tensors if w._header[k]["data_offsets"][1] <= begin]
        got = w.read_many([(k, None, torch.float32) for k in rest])
        assert all(torch.equal(got[k], tensors[k].float()) for k in rest)


def test_read_many_pickle_falls_back_to_get(tmp_path):
    path = tmp_path / "model.ckpt"
    sd = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save(sd, path)
    with WeightLoader(path, allow_pickle=True) as w:
        got = w.read_many([("a", (3, 2), torch.float16), ("b", None, None)])
        _identical(got["a"], w.get("a", dtype=torch.float16))
        _identical(got["b"], sd["b"])
        with pytest.raises(ShapeMismatch):
            w.read_many([("a", (2, 3), None)])


@pytest.mark.gpu
def test_read_many_cuda_equals_get(dtype_file):
    tensors = _every_dtype()
    with WeightLoader(dtype_file) as w:
        for cast in (None, torch.bfloat16, torch.float32):
            got = w.read_many([(k, t.shape, cast) for k, t in tensors.items()], device="cuda")
            for k in tensors:
                ref = w.get(k, dtype=cast, device="cuda")
                assert got[k].is_cuda and got[k].is_contiguous()
                _identical(got[k].cpu(), ref.cpu())
