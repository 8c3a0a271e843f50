import hashlib
import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from eridiffusion.data.buckets import BucketBatchSampler, BucketConfig
from eridiffusion.data.dataset import (
    SKIP_BOMB,
    SKIP_CORRUPT,
    SKIP_EMPTY,
    SKIP_NOT_IMAGE,
    SKIP_TOO_SMALL,
    IGNORE_NOT_IMAGE,
    IGNORE_ORPHAN,
    CaptionConfig,
    DatasetError,
    ImageLoadError,
    build_dataset,
    open_rgb,
    process_caption,
    to_rgb,
)

TINY = BucketConfig.tiny()  # buckets (h, w): 64×192, 64×256, 128×128, 192×64, 256×64; min side 64


def _rgb(path, w=128, h=128, colour=(200, 50, 30), fmt=None, **save_kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path, format=fmt, **save_kw)
    return path


def _jpeg_bytes(w=128, h=128):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _names(paths):
    return sorted(p.name for p in paths)


# ---------------------------------------------------------------- bad images


@pytest.fixture
def messy(tmp_path):
    """A folder with every kind of bad file next to good ones."""
    _rgb(tmp_path / "good.png")
    (tmp_path / "truncated.jpg").write_bytes(_jpeg_bytes()[:3000])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a png\n")
    _rgb(tmp_path / "tiny.png", 32, 32)
    _rgb(tmp_path / "narrow.png", 300, 40)  # short side below the smallest bucket side
    (tmp_path / "notes.txt").write_text("a stray caption with no image")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")  # a header and nothing else
    (tmp_path / "notes.docx").write_bytes(b"PK")
    return tmp_path


def test_bad_files_are_skipped_with_reasons(messy):
    ds = build_dataset(messy, TINY, upscale_small=False)
    assert [it.path.name for it in ds.items] == ["good.png"]
    skipped = {reason: _names(paths) for reason, paths in ds.report.skipped.items()}
    assert skipped == {
        SKIP_CORRUPT: ["truncated.jpg"],
        SKIP_EMPTY: ["zero.png"],
        SKIP_NOT_IMAGE: ["anim.gif", "text.png"],
        SKIP_TOO_SMALL: ["narrow.png", "tiny.png"],
    }
    ignored = {reason: _names(paths) for reason, paths in ds.report.ignored.items()}
    assert ignored == {IGNORE_ORPHAN: ["notes.txt"], IGNORE_NOT_IMAGE: ["notes.docx"]}
    text = str(ds.report)
    assert 2 <= len(text.splitlines()) <= 6
    assert "1 images used" in text and "6 skipped" in text and "2 smaller than the smallest bucket" in text
    assert "first: anim.gif, narrow.png, text.png" in text  # the first few


def test_decompression_bomb_skipped_by_header_size(tmp_path):
    _rgb(tmp_path / "ok.png", 64, 64)
    _rgb(tmp_path / "bomb.png", 200, 100)  # 20,000 px > the 10,000 px limit set below
    ds = build_dataset(tmp_path, TINY, max_pixels=10_000)
    assert [it.path.name for it in ds.items] == ["ok.png"]
    assert _names(ds.report.skipped[SKIP_BOMB]) == ["bomb.png"]
    with pytest.raises(ImageLoadError, match="pixel limit"):
        open_rgb(tmp_path / "bomb.png", max_pixels=10_000)


def test_truncated_jpeg_without_verify_fails_at_load_with_one_line(tmp_path):
    (tmp_path / "truncated.jpg").write_bytes(_jpeg_bytes()[:3000])
    ds = build_dataset(tmp_path, TINY, verify=False)  # headers only: the scan cannot see it
    assert len(ds) == 1
    with pytest.raises(ImageLoadError) as e:
        ds.load_item(0)
    assert "truncated.jpg" in str(e.value) and "\n" not in str(e.value)


def test_no_usable_images_is_one_line_error_naming_folder(messy):
    for name in ["good.png"]:
        (messy / name).unlink()
    with pytest.raises(DatasetError) as e:
        build_dataset(messy, TINY, upscale_small=False)
    msg = str(e.value)
    assert str(messy) in msg and "\n" not in msg and "no usable images" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(DatasetError, match="not found"):
        build_dataset(messy / "missing", TINY)


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    Image.new("RGB", (128, 128), (200, 50, 30)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    ds = build_dataset(tmp_path, TINY)
    out = ds.load_item(0)
    rgb = (out["pixels"] + 1) * 127.5
    diff = (rgb - torch.tensor([200.0, 50.0, 30.0])[:, None, None]).abs().max().item()
    assert out["pixels"].shape == (3, 128, 128) and diff <= 3, diff


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    levels = np.array([0, 64, 128, 255], dtype=np.uint16) * 257  # k·257 ↦ k exactly
    a = np.repeat(np.repeat(levels[None, :], 128, axis=0), 32, axis=1)  # (128, 128), 4 vertical stripes
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert rgb.shape == (128, 128, 3)
    assert rgb[0, ::32, 0].tolist() == [0, 64, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_palette_with_transparency_composited_on_white(tmp_path):
    p = Image.new("P", (128, 128), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    p.paste(1, (0, 0, 64, 128))
    p.save(tmp_path / "pal.png", transparency=0)
    rgb = np.asarray(open_rgb(tmp_path / "pal.png"))
    assert rgb[5, 5].tolist() == [255, 0, 0]  # opaque red
    assert rgb[5, 100].tolist() == [255, 255, 255]  # transparent → white, not black


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), [255, 255, 255]),
        (Image.new("RGBA", (4, 4), (0, 0, 0, 128)), [127, 127, 127]),  # 255·(1 − 128/255)
        (Image.new("LA", (4, 4), (0, 255)), [0, 0, 0]),
        (Image.new("LA", (4, 4), (0, 0)), [255, 255, 255]),
        (Image.new("L", (4, 4), 77), [77, 77, 77]),
        (Image.new("1", (4, 4), 1), [255, 255, 255]),
        (Image.fromarray(np.full((4, 4), 65535, dtype=np.int32)), [255, 255, 255]),  # mode I, 16-bit range
        (Image.fromarray(np.full((4, 4), 200, dtype=np.int32)), [200, 200, 200]),  # mode I, 8-bit range
        (Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), [128, 128, 128]),  # mode F in [0, 1]
        (Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32)), [255, 255, 255]),  # mode F, clipped
    ],
)
def test_to_rgb_modes(image, expected):
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert np.asarray(out)[1, 1].tolist() == expected


def test_exif_rotated_jpeg_orientation_and_time_ids(tmp_path):
    # Stored 192 wide × 64 high with a red left third; EXIF orientation 6 = display rotated 90° CW,
    # so the displayed image is 64 wide × 192 high with red on the top third.
    stored = Image.new("RGB", (192, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 64, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    ds = build_dataset(tmp_path, TINY)
    item = ds.items[0]
    assert item.size == (192, 64) and item.bucket == (192, 64)  # portrait, from the header alone
    out = ds.load_item(0)
    assert out["pixels"].shape == (3, 192, 64)
    assert out["time_ids"].tolist() == [192, 64, 0, 0, 192, 64]
    rgb = (out["pixels"] + 1) * 127.5
    top, bottom = rgb[:, 10:50, 10:50].mean((1, 2)), rgb[:, 140:180, 10:50].mean((1, 2))
    assert top[0] > 240 and top[2] < 15  # red on top
    assert bottom[2] > 240 and bottom[0] < 15  # blue below


# ---------------------------------------------------------------- captions and repeats


def test_captions_from_txt_jsonl_default_and_encodings(tmp_path):
    for name in ["txt", "jsonl", "missing", "empty", "latin1", "bom"]:
        _rgb(tmp_path / f"{name}.png")
    (tmp_path / "txt.txt").write_text("  a photo of sks dog \n", encoding="utf-8")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "jsonl.png", "text": "from jsonl"}) + "\n"
        + json.dumps({"file_name": "txt.png", "text": "txt file wins"}) + "\n"
        + "not json\n"
    )
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "ünïcode, tag".encode("utf-8"))

    ds = build_dataset(tmp_path, TINY)
    captions = {it.path.stem: it.caption for it in ds.items}
    assert captions == {
        "bom": "ünïcode, tag",
        "empty": "empty",  # empty file → file stem
        "jsonl": "from jsonl",
        "latin1": "caf\ufffd au lait",
        "missing": "missing",
        "txt": "a photo of sks dog",
    }
    assert ds.report.captions_defaulted == 2 and ds.report.default_source == "file stem"
    assert len(ds.report.warnings) == 2  # the latin-1 file and the bad jsonl line
    assert any("latin1.txt" in w and "UTF-8" in w for w in ds.report.warnings)
    assert "captions: 3 caption file (.txt), 2 file stem, 1 metadata.jsonl" in str(ds.report)

    ds = build_dataset(tmp_path, TINY, default_caption="photo of sks")
    captions = {it.path.stem: it.caption for it in ds.items}
    assert captions["missing"] == captions["empty"] == "photo of sks"
    assert "2 default_caption" in str(ds.report)


def test_jsonl_in_parent_folder_with_relative_names(tmp_path):
    _rgb(tmp_path / "sub" / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/a.png", "text": "nested"}) + "\n")
    assert build_dataset(tmp_path, TINY).items[0].caption == "nested"


def test_repeats_from_kohya_folders(tmp_path):
    _rgb(tmp_path / "10_dog" / "a.png")
    _rgb(tmp_path / "10_dog" / "b.jpg", fmt="JPEG")
    _rgb(tmp_path / "3_cat" / "deeper" / "c.webp", fmt="WEBP")
    _rgb(tmp_path / "plain" / "d.bmp", fmt="BMP")
    _rgb(tmp_path / "0_off" / "e.png")
    _rgb(tmp_path / ".hidden" / "f.png")
    ds = build_dataset(tmp_path, TINY)
    assert {it.path.name: it.repeats for it in ds.items} == {"a.png": 10, "b.jpg": 10, "c.webp": 3, "d.bmp": 1}
    assert ds.report.samples == 24 and ds.report.used == 4
    assert sum(ds.report.skipped_counts.values()) == 1  # e.png in 0_off
    # The sampler honours repeats: each item repeats[i] times per epoch.
    seen = Counter(i for batch in BucketBatchSampler(ds.buckets, 3, 0, repeats=ds.repeats) for i in batch)
    assert [seen[i] for i in range(len(ds))] == ds.repeats
    # default_repeats (the config's data.repeats) applies only outside `N_name` folders
    ds = build_dataset(tmp_path, TINY, default_repeats=5)
    assert {it.path.name: it.repeats for it in ds.items} == {"a.png": 10, "b.jpg": 10, "c.webp": 3, "d.bmp": 5}
    assert ds.report.samples == 28


# ---------------------------------------------------------------- load_item


def test_load_item_fields_and_determinism(tmp_path):
    _rgb(tmp_path / "wide.png", 300, 100, colour=(255, 255, 255))
    (tmp_path / "wide.txt").write_text("sks, red, blue, green, yellow")
    ds = build_dataset(tmp_path, TINY, crop="random", flip=True, captions=CaptionConfig.tags(keep_tags=1))
    item = ds.items[0]
    assert item.bucket == (64, 192) and item.size == (100, 300)  # 3:1
    out = ds.load_item(0, torch.Generator().manual_seed(0))
    assert set(out) == {"pixels", "caption", "time_ids", "bucket", "key", "flipped", "mask", "loss_weight", "is_reg",
                        "subset"}
    assert out["mask"] is None and out["loss_weight"] == 1.0 and out["is_reg"] is False and out["subset"] == 0
    assert out["pixels"].shape == (3, 64, 192) and out["pixels"].dtype == torch.float32
    assert torch.equal(out["pixels"], torch.ones(3, 64, 192))
    assert out["bucket"] == (64, 192)
    assert out["key"] == hashlib.sha256((tmp_path / "wide.png").read_bytes()).hexdigest()
    # 300×100 → scale max(64/100, 192/300) = 0.64 → 192×64: nothing to crop.
    assert out["time_ids"].tolist() == [100, 300, 0, 0, 64, 192]
    assert out["caption"].startswith("sks, ")
    again = ds.load_item(0, torch.Generator().manual_seed(0))
    assert again["caption"] == out["caption"] and again["flipped"] == out["flipped"]
    flips = {ds.load_item(0, torch.Generator().manual_seed(s))["flipped"] for s in range(12)}
    assert flips == {True, False}
    assert ds.load_item(0, torch.Generator().manual_seed(0), flip=True)["flipped"] is True


def test_dataset_rejects_unknown_crop(tmp_path):
    _rgb(tmp_path / "a.png")
    with pytest.raises(ValueError, match="crop='middle'"):
        build_dataset(tmp_path, TINY, crop="middle")


# ---------------------------------------------------------------- caption augmentation


def test_tag_shuffle_keeps_first_n_tags():
    caption = "sks, dog, red collar, grass, sunny, park"
    cfg = CaptionConfig(shuffle_tags=True, keep_tags=2)
    orders = set()
    for seed in range(30):
        out = process_caption(caption, cfg, torch.Generator().manual_seed(seed))
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"]
        assert sorted(tags[2:]) == sorted(["red collar", "grass", "sunny", "park"])
        assert out == process_caption(caption, cfg, torch.Generator().manual_seed(seed))
        orders.add(out)
    assert len(orders) > 10  # 4! = 24 possible


def test_caption_dropout_rate_and_passthrough():
    g = torch.Generator().manual_seed(0)
    outs = [process_caption("a cat", CaptionConfig(dropout=0.25), g) for _ in range(2000)]
    rate = outs.count("") / len(outs)
    assert abs(rate - 0.25) < 0.04 and set(outs) == {"", "a cat"}
    assert process_caption("a, b", CaptionConfig(dropout=1.0), g) == ""
    assert process_caption(" keep  as is ", CaptionConfig(), g) == " keep  as is "
