"""Content-addressed on-disk cache of VAE latents and text-encoder outputs (safetensors).

key = sha256(canonical JSON of {"content": sha256 of the file bytes, "settings": {...}})
where settings holds everything the tensors depend on: model identity, bucket, crop, flip,
dtype, and for text embeddings the caption itself. Editing an image (new bytes) or any
setting gives a new key, so stale entries are never read; identical content under any file
name reuses the entry. Entries live at `cache_dir/<kind>/<key[:2]>/<key>.safetensors` and are
written atomically (`io.atomic_write`: temp file, fsync, `os.replace`), so a crash or a
concurrent writer never leaves a half-written entry under a final name.

Augmentation with cached latents: latents are cached for the deterministic transform only.
Random crop cannot be cached (kohya likewise disables it with `cache_latents`):
`check_cacheable` rejects it. Flip is cached both ways: one entry per `flip` value in the
settings (`latent_settings(..., flip=True/False)`), and each step picks one with the run's
generator, so flip augmentation survives caching at twice the disk space.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from eridiffusion.io import write_bytes

_KIND = re.compile(r"^[a-z0-9_]+$")
_KEY = re.compile(r"^[0-9a-f]{64}$")


def file_digest(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cache settings value {value!r} ({type(value).__name__}) is not JSON; pass str/int/float/list/dict")


def canonical_json(obj) -> str:
    """JSON with sorted keys and no spaces: equal settings give equal bytes (tuples = lists)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default)


def make_key(content_digest: str | None, settings: Mapping) -> str:
    """Cache key of (content hash, settings); `content_digest` is None for text embeddings."""
    payload = canonical_json({"content": content_digest, "settings": dict(settings)})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def latent_settings(model: str, bucket: tuple[int, int], flip: bool, dtype: torch.dtype | str,
                    crop: str = "center") -> dict:
    """Settings that determine an image's VAE latent; `model` names the VAE (e.g. its file hash)."""
    check_cacheable(crop)
    return {"kind": "latent", "model": model, "bucket": list(bucket), "crop": crop, "flip": bool(flip),
            "dtype": dtype}


def text_settings(model: str, caption: str, dtype: torch.dtype | str, max_tokens: int = 75) -> dict:
    """Settings that determine a caption's text-encoder outputs (`max_tokens`: 75-token chunks)."""
    return {"kind": "text", "model": model, "caption": caption, "dtype": dtype, "max_tokens": max_tokens}


def check_cacheable(crop: str) -> None:
    """Latent caching needs a deterministic crop; raise a one-line error for random crop."""
    if crop != "center":
        raise ValueError(f"crop={crop!r} cannot be used with cached latents; set crop='center' or turn latent caching off")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    unreadable: int = 0  # entries that failed to load (counted as misses and rewritten)


class TensorCache:
    """`get` / `put` of dict[str, Tensor] entries under `cache_dir`."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir)
        self.stats = CacheStats()

    def path(self, kind: str, key: str) -> Path:
        if not _KIND.match(kind):
            raise ValueError(f"cache kind {kind!r} must be lower-case letters, digits or _ (e.g. 'latent', 'text')")
        if not _KEY.match(key):
            raise ValueError(f"cache key {key!r} is not a sha256 hex digest; build it with make_key()")
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(kind, key)
        if path.is_file():
            try:
                tensors = load_file(path)
            except (SafetensorError, OSError, ValueError):
                self.stats.unreadable += 1
            else:
                self.stats.hits += 1
                return tensors
        self.stats.misses += 1
        return None

    def put(self, kind: str, key: str, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Write atomically (`io.atomic_write`): a reader never sees a torn entry."""
        path = self.path(kind, key)
        write_bytes(path, save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}))
        self.stats.writes += 1
        return path

