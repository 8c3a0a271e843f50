import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion.data.cache import (
    TensorCache,
    canonical_json,
    check_cacheable,
    file_digest,
    latent_settings,
    make_key,
    text_settings,
)


def _latents():
    return {"mean": torch.randn(4, 8, 16), "std": torch.rand(4, 8, 16).to(torch.bfloat16)}


def test_file_digest_is_sha256_of_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # > one 1 MiB chunk
    (tmp_path / "a.png").write_bytes(data)
    assert file_digest(tmp_path / "a.png", chunk_size=4096) == hashlib.sha256(data).hexdigest()


def test_key_is_sha256_of_canonical_json():
    settings = {"model": "vae-abc", "bucket": (64, 192), "flip": False, "dtype": torch.bfloat16}
    expected_json = '{"content":"d1","settings":{"bucket":[64,192],"dtype":"bfloat16","flip":false,"model":"vae-abc"}}'
    assert canonical_json({"content": "d1", "settings": settings}) == expected_json
    assert make_key("d1", settings) == hashlib.sha256(expected_json.encode()).hexdigest()
    # Key order and tuple-vs-list do not matter; any value change does.
    reordered = {"dtype": "bfloat16", "flip": False, "bucket": [64, 192], "model": "vae-abc"}
    assert make_key("d1", reordered) == make_key("d1", settings)
    assert make_key("d2", settings) != make_key("d1", settings)
    for change in [{"bucket": (64, 256)}, {"flip": True}, {"dtype": torch.float32}, {"model": "vae-xyz"}]:
        assert make_key("d1", {**settings, **change}) != make_key("d1", settings)
    with pytest.raises(TypeError, match="not JSON"):
        make_key("d1", {"bad": object()})


def test_text_key_depends_on_caption():
    a = make_key(None, text_settings("te-1", "a photo of sks", torch.float16))
    assert a == make_key(None, text_settings("te-1", "a photo of sks", "float16"))
    assert a != make_key(None, text_settings("te-1", "a photo of sks dog", torch.float16))
    assert json.loads(canonical_json(text_settings("te-1", "ünï", "float16")))["caption"] == "ünï"


def test_miss_put_hit_roundtrip_and_layout(tmp_path):
    cache = TensorCache(tmp_path / "cache")
    key = make_key("d1", latent_settings("vae", (64, 64), False, torch.float32))
    assert cache.get("latent", key) is None
    tensors = _latents()
    path = cache.put("latent", key, tensors)
    assert path == tmp_path / "cache" / "latent" / key[:2] / f"{key}.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left behind
    got = cache.get("latent", key)
    assert set(got) == {"mean", "std"} and got["std"].dtype == torch.bfloat16
    assert torch.equal(got["mean"], tensors["mean"]) and torch.equal(got["std"], tensors["std"])
    assert (cache.stats.hits, cache.stats.misses, cache.stats.writes) == (1, 1, 1)
    assert torch.equal(load_file(path)["mean"], tensors["mean"])  # a plain safetensors file


def get_or_compute(cache, kind, key, fn):  # what the trainer's fill_cache does: get, else compute and put
    tensors = cache.get(kind, key)
    if tensors is None:
        tensors = dict(fn())
        cache.put(kind, key, tensors)
    return tensors


def test_computed_once_and_invalidated_on_change(tmp_path):
    image = tmp_path / "img.png"
    image.write_bytes(b"first version of the image")
    cache = TensorCache(tmp_path / "cache")
    calls = []

    def encode():
        calls.append(1)
        return {"latent": torch.full((4, 8, 8), float(len(calls)))}

    def key_of(path, flip=False):
        return make_key(file_digest(path), latent_settings("vae", (64, 64), flip, "float32"))

    first = get_or_compute(cache, "latent", key_of(image), encode)
    again = get_or_compute(cache, "latent", key_of(image), encode)
    assert len(calls) == 1 and torch.equal(first["latent"], again["latent"])

    # Same bytes under another name: reused.
    copy = tmp_path / "renamed.png"
    copy.write_bytes(image.read_bytes())
    get_or_compute(cache, "latent", key_of(copy), encode)
    assert len(calls) == 1

    # A different flip (a setting) is a separate entry; so is edited content.
    flipped = get_or_compute(cache, "latent", key_of(image, flip=True), encode)
    assert len(calls) == 2 and flipped["latent"][0, 0, 0] == 2
    image.write_bytes(b"edited image")
    edited = get_or_compute(cache, "latent", key_of(image), encode)
    assert len(calls) == 3 and edited["latent"][0, 0, 0] == 3
    assert (cache.stats.hits, cache.stats.misses) == (2, 3)


def test_unreadable_entry_is_a_miss_and_is_rewritten(tmp_path):
    cache = TensorCache(tmp_path)
    key = make_key("d", {"x": 1})
    path = cache.put("latent", key, {"a": torch.ones(2)})
    path.write_bytes(b"\x00garbage")
    assert cache.get("latent", key) is None and cache.stats.unreadable == 1
    out = get_or_compute(cache, "latent", key, lambda: {"a": torch.zeros(2)})
    assert torch.equal(out["a"], torch.zeros(2)) and torch.equal(cache.get("latent", key)["a"], torch.zeros(2))


def test_bad_kind_or_key_rejected(tmp_path):
    cache = TensorCache(tmp_path)
    key = make_key("d", {})
    with pytest.raises(ValueError, match="cache kind"):
        cache.get("../escape", key)
    with pytest.raises(ValueError, match="sha256"):
        cache.get("latent", "abc")


def test_random_crop_cannot_be_cached():
    check_cacheable("center")
    with pytest.raises(ValueError, match="crop='random'"):
        latent_settings("vae", (64, 64), False, "float32", crop="random")
