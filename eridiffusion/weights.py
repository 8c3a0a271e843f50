"""Lazy, checked access to the tensors of one weight file.

safetensors layout (https://github.com/huggingface/safetensors#format): an 8-byte
little-endian header length N, N bytes of JSON
``{"key": {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw tensor bytes (offsets are relative to the end of the header). The header is
read and validated here. ``get``/``tensor`` read one tensor from the memory-mapped file
(``safetensors.safe_open``); ``read_many`` reads many at once with a pool of threads, each
``os.preadv``-ing its own contiguous stretch of the file into a small reused host buffer (pinned
for CUDA) and copying to the device, where it casts. Either way a 7 GB checkpoint never sits in
RAM twice.

Pickle checkpoints (.ckpt/.pt/.pth/.bin) can run code when unpickled; they are refused
unless ``allow_pickle=True``, and even then read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import struct
import sys
import threading
import zipfile
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from eridiffusion.errors import WeightError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library refuses larger headers too
_CHUNK = 16 << 20  # read_many: bytes per read, caps each worker's host buffer; a multiple of 8 (itemsize)

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


class ReadFailed(WeightError):
    """A tensor's bytes could not be read (the file was cut short after its header was read, or an I/O error)."""

    def __init__(self, file: str | os.PathLike, key: str, reason: str):
        self.file, self.key = str(file), key
        super().__init__(f"{self.file}: tensor {key!r}: {reason}")


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
            dtype, shape, (_begin, end) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
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


@dataclass
class _Job:
    """One tensor for read_many: where its bytes are and what to make of them."""

    key: str
    shape: torch.Size
    stored: torch.dtype
    dtype: torch.dtype  # wanted
    offset: int  # absolute, in the file
    nbytes: int


def _split(jobs: list[_Job], n: int) -> list[list[_Job]]:
    """`jobs` (sorted by offset) cut into at most `n` contiguous runs of about equal bytes:
    each worker then reads one stretch of the file front to back, so the kernel's per-file
    readahead sees a sequential stream."""
    total = sum(j.nbytes for j in jobs) or 1
    groups: list[list[_Job]] = [[] for _ in range(n)]
    seen = 0
    for j in jobs:
        groups[min(n - 1, seen * n // total)].append(j)
        seen += j.nbytes
    return [g for g in groups if g]


def _host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """A read_many worker's staging buffer (pinned memory makes host->device copies DMA)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


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
    def _check_open(self) -> None:
        if self._handle is None and self._state is None:
            raise ValueError(f"{self.path}: WeightLoader is closed; read tensors inside the `with` block")

    def get(self, key: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Read one tensor into fresh memory of `dtype` on `device`; only this tensor is materialised.

        Always one copy: the mmap-backed tensor safetensors returns is not 64-byte aligned (slower
        kernels, last-bit differences) and would crash with SIGBUS if the file changed on disk.
        """
        self._entry(key)
        self._check_open()
        t = self._state[key] if self._state is not None else self._handle.get_tensor(key)
        return t.to(device=device, dtype=dtype, copy=True)

    def tensor(self, key: str, shape, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Like ``get``, after checking the stored shape equals ``shape`` (before reading)."""
        found = self.shape(key)
        if found != torch.Size(shape):
            raise ShapeMismatch(key, shape, found, self.path)
        return self.get(key, dtype=dtype, device=device)

    def read_many(
        self,
        requests: Iterable[tuple[str, tuple[int, ...] | torch.Size | None, torch.dtype | None]],
        device=None,
        workers: int = 8,
    ) -> dict[str, torch.Tensor]:
        """Read many tensors at once: ``{key: tensor}`` in request order, each equal to
        ``tensor(key, shape, dtype, device)`` (same values, dtype, device, contiguous, freshly
        allocated so 64-byte aligned on the CPU).

        `requests` are ``(key, shape, dtype)``; shape None skips its check, dtype None keeps the
        stored one. Every key and shape is checked before anything is read. safetensors files:
        `workers` threads each open the file and ``os.preadv`` one contiguous stretch of it, tensor
        by tensor in chunks of 16 MiB, into a buffer of their own (pinned when `device` is CUDA) that
        is copied to the device, where the cast happens: the same steps on the CPU, where the copy
        is a no-op. Pickle files read through ``get``.
        """
        reqs = [(key, None if shape is None else torch.Size(shape), dtype) for key, shape, dtype in requests]
        for key, shape, _ in reqs:
            found = self.shape(key)
            if shape is not None and found != shape:
                raise ShapeMismatch(key, shape, found, self.path)
        self._check_open()
        if self._state is not None or sys.byteorder != "little":  # safetensors data is little-endian
            return {key: self.get(key, dtype=dtype, device=device) for key, _, dtype in reqs}
        device = torch.device(device if device is not None else "cpu")
        if device.type == "cuda" and device.index is None:  # worker threads start on device 0
            device = torch.device("cuda", torch.cuda.current_device())
        jobs = []
        for key, _, dtype in reqs:
            e = self._header[key]
            begin, end = e["data_offsets"]
            stored, offset = _DTYPES[e["dtype"]], self._data_start + begin
            jobs.append(_Job(key, torch.Size(e["shape"]), stored, dtype or stored, offset, end - begin))
        jobs.sort(key=lambda j: j.offset)
        out: dict[str, torch.Tensor] = {}
        stop = threading.Event()
        groups = _split(jobs, max(1, min(workers, len(jobs))))
        with ThreadPoolExecutor(len(groups), thread_name_prefix="read_many") as pool:
            futures = [pool.submit(self._read_run, g, device, out, stop) for g in groups]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:
                stop.set()  # the others stop at their next tensor
        for f in futures:
            if f.exception() is not None:
                raise f.exception()
        if device.type == "cuda":  # the last casts were queued from the workers' threads
            torch.cuda.synchronize(device)
        return {key: out[key] for key, _, _ in reqs}

    def _read_run(self, jobs: list[_Job], device: torch.device, out: dict, stop: threading.Event) -> None:
        """One worker of read_many: read `jobs` (one stretch of the file) in order into `out`."""
        buf = _host_buffer(max(1, min(_CHUNK, max(j.nbytes for j in jobs))), pinned=device.type == "cuda")
        with open(self.path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):  # a larger readahead window for this handle; only a hint
                span = jobs[-1].offset + jobs[-1].nbytes - jobs[0].offset
                with contextlib.suppress(OSError):
                    os.posix_fadvise(f.fileno(), jobs[0].offset, span, os.POSIX_FADV_SEQUENTIAL)
            for j in jobs:
                if stop.is_set():
                    return
                out[j.key] = self._read_one(f, j, device, buf)

    def _read_one(self, f, j: _Job, device: torch.device, buf: torch.Tensor) -> torch.Tensor:
        """Read `j` chunk by chunk through `buf`, the same steps on every device: host -> device
        copy (a no-op on the CPU), then the cast on the device as ``Tensor.to`` does it."""
        t = torch.empty(j.shape, dtype=j.dtype, device=device)
        flat, item = t.view(-1), j.stored.itemsize  # (numel,)
        for start in range(0, j.nbytes, len(buf)):
            n = min(len(buf), j.nbytes - start)
            self._pread(f, j, buf[:n], start)
            chunk = buf[:n].view(j.stored)  # (n // item,)
            if j.dtype != j.stored:
                chunk = chunk.to(device)  # the cast below then runs on the device, not the host
            flat[start // item : (start + n) // item].copy_(chunk)  # synchronous from the host: buf is reused next
        return t

    def _pread(self, f, j: _Job, into: torch.Tensor, start: int) -> None:
        """Fill CPU uint8 tensor `into` with the bytes of `j` from `start`; short reads are errors."""
        view, done = memoryview(into.numpy()), 0
        while done < len(view):
            at = j.offset + start + done
            try:
                if hasattr(os, "preadv"):
                    got = os.preadv(f.fileno(), [view[done:]], at)
                else:  # Windows: this worker's own handle, so seeking is safe
                    f.seek(at)
                    got = f.readinto(view[done:])
            except OSError as e:
                reason = f"reading {len(view) - done} bytes at byte {at} failed ({e.strerror or e})"
                raise ReadFailed(self.path, j.key, reason) from None
            if not got:
                size = os.fstat(f.fileno()).st_size
                raise ReadFailed(
                    self.path,
                    j.key,
                    f"truncated: its data ends at byte {j.offset + j.nbytes}, the file now has {size}; "
                    "the file changed on disk, download it again",
                )
            done += got

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
