"""Lazy, checked access to the tensors of one weight file.

safetensors layout (https://github.com/huggingface/safetensors#format): an 8-byte
little-endian header length N, N bytes of JSON
``{"key": {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw tensor bytes (offsets are relative to the end of the header). The header is
read and validated here; tensors are read one at a time from the memory-mapped file
(``safetensors.safe_open``), so a 7 GB checkpoint never sits in RAM twice.

Pickle checkpoints (.ckpt/.pt/.pth/.bin) can run code when unpickled; they are refused
unless ``allow_pickle=True``, and even then read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import difflib
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library refuses larger headers too

# safetensors dtype names (the JSON header) -> torch dtypes.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}


class WeightError(Exception):
    """Base of every error about a weight file; ``str()`` is one line for the user."""


class WeightNotFound(WeightError):
    def __init__(self, key: str, file: str | os.PathLike, candidates: list[str] | tuple[str, ...] = ()):
        self.key, self.file = key, str(file)
        self.closest = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(self.closest)}" if self.closest else ""
        super().__init__(f"{self.file}: key {key!r} not found{hint}")


class ShapeMismatch(WeightError):
    def __init__(self, key: str, expected, found, file: str | os.PathLike):
        self.key, self.file = key, str(file)
        self.expected, self.found = list(expected), list(found)
        super().__init__(
            f"{self.file}: {key} has shape {self.found}, expected {self.expected}; "
            "the file is for a different model variant"
        )


class NotACheckpoint(WeightError):
    def __init__(self, file: str | os.PathLike, reason: str):
        self.file, self.reason = str(file), reason
        super().__init__(f"{self.file}: {reason}")


class PickleRefused(WeightError):
    def __init__(self, file: str | os.PathLike, reason: str | None = None):
        self.file = str(file)
        super().__init__(
            f"{self.file}: "
            + (
                reason
                or "is a pickle file, which can run code when loaded; "
                "convert it to .safetensors or pass --allow-pickle"
            )
        )


def _looks_like_pickle(head: bytes) -> bool:
    """torch.save writes a zip archive (PK\\x03\\x04) since 1.6, raw pickles (protocol >= 2) before."""
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _read_safetensors_header(path: Path, size: int) -> tuple[dict, dict, int]:
    """Validate the header and return (tensor entries, metadata, data start offset)."""
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        first = f.read(1)
        if first != b"{" or n > _MAX_HEADER:
            raise NotACheckpoint(path, "not a safetensors file (no JSON header after the 8-byte length)")
        if 8 + n > size:
            raise NotACheckpoint(
                path, f"truncated: header says {n} bytes, file has {size - 8}; download the file again"
            )
        raw = first + f.read(n - 1)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotACheckpoint(path, f"safetensors header is not JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise NotACheckpoint(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise NotACheckpoint(path, f"safetensors header entry {key!r} lacks dtype/shape/data_offsets") from None
        if dtype not in _DTYPES:
            raise NotACheckpoint(path, f"tensor {key!r} has unknown dtype {dtype!r}")
        if end > data_size:
            raise NotACheckpoint(
                path,
                f"truncated: tensor {key!r} ends at byte {end} of the data, file holds {data_size}; "
                "download the file again",
            )
        entry["shape"] = shape
    return header, {str(k): str(v) for k, v in metadata.items()}, 8 + n


class WeightLoader:
    """Read-only, lazy view of a .safetensors (or, if allowed, pickle) weight file.

    >>> with WeightLoader("sd_xl_base_1.0.safetensors") as w:
    ...     t = w.tensor("model.diffusion_model.out.2.bias", (4,), dtype=torch.bfloat16)
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False):
        self.path = Path(path)
        self.format = ""
        self.file_size = 0  # bytes on disk
        self._handle = None
        self._state: dict[str, torch.Tensor] | None = None  # pickle files only
        p = self.path
        if not p.exists():
            raise NotACheckpoint(p, "no such file; check the path")
        if p.is_dir():
            raise NotACheckpoint(p, "is a directory, not a weight file; pass the .safetensors file itself")
        self.file_size = size = p.stat().st_size
        if size == 0:
            raise NotACheckpoint(p, "is empty (0 bytes); download the file again")
        with open(p, "rb") as f:
            head = f.read(16)
        if _looks_like_pickle(head) or (p.suffix.lower() in PICKLE_SUFFIXES and head[8:9] != b"{"):
            if not allow_pickle:
                raise PickleRefused(p)
            self.format = "pickle (read with weights_only=True)"
            self._load_pickle()
            return
        if size < 9:
            raise NotACheckpoint(p, f"truncated: {size} bytes, shorter than a safetensors header")
        self.format = "safetensors"
        self._header, self.metadata, self._data_start = _read_safetensors_header(p, size)
        try:
            self._handle = safe_open(str(p), framework="pt", device="cpu")
        except Exception as e:  # SafetensorError and friends: the library's own validation
            raise NotACheckpoint(p, f"not a valid safetensors file ({str(e).splitlines()[0]})") from None

    def _load_pickle(self) -> None:
        p = self.path
        try:
            # mmap needs torch's zip format; legacy raw-pickle files are read without it.
            mmap = zipfile.is_zipfile(p)
            obj = torch.load(p, weights_only=True, map_location="cpu", mmap=mmap)
        except Exception as e:
            raise PickleRefused(
                p,
                f"cannot be read with weights_only=True ({str(e).splitlines()[0][:160]}); "
                "convert it to .safetensors with the tool that made it",
            ) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise NotACheckpoint(p, f"holds a {type(obj).__name__}, not a dict of tensors")
        self._state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not self._state:
            raise NotACheckpoint(p, "holds no tensors")
        self._header = {k: {"shape": list(v.shape)} for k, v in self._state.items()}
        self.metadata = {}

    # -- introspection (header only, nothing read) ---------------------------------
    def keys(self) -> list[str]:
        return list(self._header)

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)

    def __contains__(self, key: object) -> bool:
        return key in self._header

    def _entry(self, key: str) -> dict:
        try:
            return self._header[key]
        except KeyError:
            raise WeightNotFound(key, self.path, self._header) from None

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._entry(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        entry = self._entry(key)
        return self._state[key].dtype if self._state is not None else _DTYPES[entry["dtype"]]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the file (header excluded)."""
        if self._state is not None:
            return sum(t.numel() * t.element_size() for t in self._state.values())
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in self._header.values())

    # -- reading ------------------------------------------------------------------
    def get(self, key: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Read one tensor into fresh memory of `dtype` on `device`; only this tensor is materialised.

        Always one copy: the mmap-backed tensor safetensors returns is not 64-byte aligned (slower
        kernels, last-bit differences) and would crash with SIGBUS if the file changed on disk.
        """
        self._entry(key)
        if self._handle is None and self._state is None:
            raise ValueError(f"{self.path}: WeightLoader is closed; read tensors inside the `with` block")
        t = self._state[key] if self._state is not None else self._handle.get_tensor(key)
        return t.to(device=device, dtype=dtype, copy=True)

    def tensor(self, key: str, shape, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Like ``get``, after checking the stored shape equals ``shape`` (before reading)."""
        found = self.shape(key)
        if found != torch.Size(shape):
            raise ShapeMismatch(key, shape, found, self.path)
        return self.get(key, dtype=dtype, device=device)

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        self._handle = None
        self._state = None

    def __enter__(self) -> WeightLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WeightLoader({str(self.path)!r}, {len(self)} tensors)"
