"""Subsets, regularization balance, caption rules, formats, the report file, masks and exclude."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from eridiffusion.config import ConfigError, TrainConfig
from eridiffusion.data import images
from eridiffusion.data.buckets import BucketBatchSampler, BucketConfig
from eridiffusion.data.dataset import (
    DatasetError,
    IGNORE_EXCLUDED,
    SKIP_REG_UNUSED,
    SKIP_TOO_SMALL,
    SKIP_UNSUPPORTED,
    CaptionConfig,
    build_dataset,
    build_datasets,
    downsample_mask,
    process_caption,
)

TINY = BucketConfig.tiny()  # buckets (h, w): 64×192, 64×256, 128×128, 192×64, 256×64; min side 64
TINY_DATA = {"resolution": 128, "bucket_step": 64, "bucket_min": 64, "bucket_max": 256}


def _rgb(path, w=128, h=128, colour=(200, 50, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path, format=fmt)
    return path


def _data(**fields):
    return TrainConfig.from_dict({"data": {**TINY_DATA, **fields}}).data


def _gradient(w, h):
    """uint8 (h, w), different along x and y and not mirror-symmetric: any crop or flip shows."""
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 200 // w + y * 55 // h) % 256).astype(np.uint8)


# ---------------------------------------------------------------- subsets and regularization


def test_subsets_repeats_and_regularization_like_kohya(tmp_path):
    for n in range(3):
        _rgb(tmp_path / "a" / "5_dog" / f"{n}.png")  # 3 images × 5
    for n in range(2):
        _rgb(tmp_path / "b" / f"{n}.png")  # 2 × subset repeats 2
    for n in range(4):
        _rgb(tmp_path / "reg" / f"{n}.png")  # 4 reg images, 1 repeat each to start with
    data = _data(dir=str(tmp_path / "a"), prior_loss_weight=0.5,
                 subsets=[{"dir": str(tmp_path / "b"), "repeats": 2}, {"dir": str(tmp_path / "reg"), "is_reg": True}])
    ds = build_datasets(data)
    train = [it for it in ds.items if not it.is_reg]
    reg = [it for it in ds.items if it.is_reg]
    assert sum(it.repeats for it in train) == 19  # 3·5 + 2·2
    # 4 reg samples are short of 19: one more repeat each in turn until 19 (train_util.py, 48d368f)
    assert [it.repeats for it in reg] == [5, 5, 5, 4]
    assert ds.report.samples == 38 and ds.report.reg_samples == 19 and ds.report.reg_used == 4
    assert "38 samples per epoch: 19 train + 19 regularization" in str(ds.report)
    assert [it.subset for it in ds.items] == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert ds.loss_weights == [1.0] * 5 + [0.5] * 4
    seen = Counter(i for batch in BucketBatchSampler(ds.buckets, 4, 0, repeats=ds.repeats) for i in batch)
    assert [seen[i] for i in range(len(ds))] == ds.repeats
    assert sum(seen[i] for i in range(len(ds)) if ds[i].is_reg) == 19
    out = ds.load_item(8)
    assert out["is_reg"] is True and out["loss_weight"] == 0.5 and out["subset"] == 2


def test_reg_images_beyond_the_train_count_are_unused(tmp_path):
    for n in range(2):
        _rgb(tmp_path / "train" / f"{n}.png")  # 2 × 2 = 4 samples
    for n in range(5):
        _rgb(tmp_path / "reg" / f"{n}.png")
    data = _data(subsets=[{"dir": str(tmp_path / "train"), "repeats": 2},
                          {"dir": str(tmp_path / "reg"), "is_reg": True, "repeats": 3}])  # fmt: skip
    ds = build_datasets(data)
    # kohya takes reg images in order with their repeats until the train count is reached: 3 + 3 ≥ 4
    assert [(it.path.name, it.repeats) for it in ds.items if it.is_reg] == [("0.png", 3), ("1.png", 3)]
    assert sorted(p.name for p in ds.report.skipped[SKIP_REG_UNUSED]) == ["2.png", "3.png", "4.png"]


def test_only_reg_subsets_is_an_error(tmp_path):
    _rgb(tmp_path / "reg" / "a.png")
    with pytest.raises(DatasetError, match="only regularization images"):
        build_datasets(_data(subsets=[{"dir": str(tmp_path / "reg"), "is_reg": True}]))


def test_subsets_inherit_and_keep_their_options(tmp_path):
    _rgb(tmp_path / "a" / "x.png", 256, 128)
    _rgb(tmp_path / "b" / "y.png", 256, 128)
    (tmp_path / "b" / "y.txt").write_text("red, green, blue")
    data = _data(flip=True, caption_prefix="sks,",
                 subsets=[{"dir": str(tmp_path / "a")},
                          {"dir": str(tmp_path / "b"), "flip": False, "resolution": 192, "bucket_min": 128,
                           "shuffle_tags": True, "keep_tags": 1}])  # fmt: skip
    ds = build_datasets(data)
    a, b = ds.subsets
    assert a.flip and not b.flip and a.captions.prefix == b.captions.prefix == "sks,"
    assert a.buckets.resolution == 128 and b.buckets == BucketConfig(192, 64, 128, 256)
    assert ds[0].bucket == (64, 192) and ds[1].bucket == (128, 256)  # each subset's own grid
    with pytest.raises(ValueError, match="subsets differ in flip"):
        ds.flip
    assert ds.caption_set() is None  # subset b shuffles
    flips = {ds.augment(1, torch.Generator().manual_seed(s))[0] for s in range(8)}
    assert flips == {False}
    caption = ds.augment(1, torch.Generator().manual_seed(0))[1]
    assert caption.startswith("sks, ") and sorted(caption.split(", ")[1:]) == ["blue", "green", "red"]


def test_batches_never_mix_buckets_across_subsets(tmp_path):
    for n, (w, h) in enumerate([(128, 128), (256, 128), (128, 256), (300, 100)]):
        _rgb(tmp_path / "a" / f"{n}.png", w, h)
        _rgb(tmp_path / "b" / f"{n}.png", w, h)
    ds = build_datasets(_data(subsets=[{"dir": str(tmp_path / "a")},
                                       {"dir": str(tmp_path / "b"), "resolution": 192, "bucket_min": 128}]))
    for batch in BucketBatchSampler(ds.buckets, 3, 1, repeats=ds.repeats):
        assert len({ds[i].bucket for i in batch}) == 1


def test_augment_is_load_items_draws(tmp_path):
    _rgb(tmp_path / "w.png", 300, 120)
    (tmp_path / "w.txt").write_text("sks, a, b, c, d, e")
    ds = build_datasets(_data(dir=str(tmp_path), flip=True, random_crop=True, shuffle_tags=True, keep_tags=1,
                              tag_dropout=0.3, caption_dropout=0.1))  # fmt: skip
    for seed in range(10):
        item = ds.load_item(0, torch.Generator().manual_seed(seed))
        assert ds.augment(0, torch.Generator().manual_seed(seed)) == (item["flipped"], item["caption"])


# ---------------------------------------------------------------- config


def test_subset_config_validation_names_the_subset(tmp_path):
    with pytest.raises(ConfigError, match=r"data.subsets\[1\].tag_dropout = 2.0 is invalid"):
        _data(subsets=[{"dir": "a"}, {"dir": "b", "tag_dropout": 2.0}])
    with pytest.raises(ConfigError, match=r"data.subsets\[0\].dir"):
        _data(subsets=[{"repeats": 2}])
    with pytest.raises(ConfigError, match=r"unknown key data.subsets\[0\].flp; did you mean data.subsets\[0\].flip"):
        _data(subsets=[{"dir": "a", "flp": True}])
    with pytest.raises(ConfigError, match=r"data.subsets\[0\].bucket_min = 128 is invalid: must be <= the resolution"):
        _data(bucket_min=128, subsets=[{"dir": "a", "resolution": 64, "bucket_min": 128}])
    assert _data(caption_ext=".caption").caption_ext == ".caption"
    with pytest.raises(ConfigError, match='data.caption_ext = "caption" is invalid'):
        _data(caption_ext="caption")
    cfg = TrainConfig.from_dict({"data": {**TINY_DATA, "subsets": [{"dir": "a", "is_reg": True}]}})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # round trip through TOML-ready dicts
    with pytest.raises(ConfigError, match=r"data.subsets\[0\].dir = .* is not a folder"):
        cfg.replace(model={"path": __file__}).check_paths()


# ---------------------------------------------------------------- captions


def test_caption_rules_and_summary(tmp_path):
    _rgb(tmp_path / "10_sks dog" / "a.png")  # no caption: the folder's name
    _rgb(tmp_path / "10_sks dog" / "b.png")
    (tmp_path / "10_sks dog" / "b.caption").write_text("a caption file")
    (tmp_path / "10_sks dog" / "b.txt").write_text("not read: caption_ext is .caption")
    _rgb(tmp_path / "plain" / "c.png")  # nothing: default_caption or the stem
    ds = build_dataset(tmp_path, TINY, caption_ext=".caption")
    assert {it.path.stem: (it.caption, it.caption_source) for it in ds.items} == {
        "a": ("sks dog", "N_name folder name"), "b": ("a caption file", "caption file"), "c": ("c", "file stem")}
    assert "captions: 1 N_name folder name, 1 caption file (.caption), 1 file stem" in str(ds.report)
    ds = build_dataset(tmp_path, TINY, caption_ext=".caption", default_caption="a photo")
    assert [it.caption for it in ds.items] == ["sks dog", "a caption file", "a photo"]
    assert "1 default_caption" in str(ds.report)


def test_prefix_suffix_and_tag_dropout():
    cfg = CaptionConfig(prefix="sks,", suffix=", best quality", keep_tags=1, tag_dropout=0.5)
    g = torch.Generator().manual_seed(0)
    outs = [process_caption("a, b, c, d", cfg, g) for _ in range(400)]
    assert all(o.startswith("sks") for o in outs)
    kept = Counter(t for o in outs for t in o.split(", ")[1:])
    assert set(kept) == {"a", "b", "c", "d", "best quality"}
    assert all(abs(n / 400 - 0.5) < 0.1 for n in kept.values())
    assert process_caption("a, b", CaptionConfig(prefix="sks", suffix="end"), g) == "sks a, b end"  # kohya: spaces


# ---------------------------------------------------------------- small images and formats


def test_upscale_small_on_and_off(tmp_path):
    _rgb(tmp_path / "small.png", 40, 40, colour=(10, 20, 30))
    _rgb(tmp_path / "big.png")
    ds = build_dataset(tmp_path, TINY)  # upscale_small=True is the default, as in kohya
    assert [it.path.name for it in ds.items] == ["big.png", "small.png"]
    assert [p.name for p in ds.report.upscaled] == ["small.png"] and "upscaled: 1" in str(ds.report)
    out = ds.load_item(1)
    assert out["pixels"].shape == (3, 128, 128)
    assert torch.allclose(out["pixels"][:, 64, 64], torch.tensor([10, 20, 30]) / 127.5 - 1)
    ds = build_dataset(tmp_path, TINY, upscale_small=False)
    assert [it.path.name for it in ds.items] == ["big.png"]
    assert [p.name for p in ds.report.skipped[SKIP_TOO_SMALL]] == ["small.png"]


@pytest.mark.parametrize("ext,fmt", [(".tif", "TIFF"), (".tiff", "TIFF"), (".gif", "GIF"), (".jfif", "JPEG"),
                                     (".avif", "AVIF")])  # fmt: skip
def test_new_formats_load(tmp_path, ext, fmt):
    if not images.readable(ext):
        pytest.skip(f"this Pillow cannot read {ext}")
    _rgb(tmp_path / f"a{ext}", 128, 128, colour=(0, 0, 255), fmt=fmt)
    ds = build_dataset(tmp_path, TINY)
    assert [it.path.name for it in ds.items] == [f"a{ext}"]
    blue = ds.load_item(0)["pixels"][:, 64, 64]
    assert blue[2] > 0.9 and blue[0] < -0.9


def test_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (128, 128), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    red = build_dataset(tmp_path, TINY).load_item(0)["pixels"][:, 10, 10]
    assert red[0] > 0.9 and red[1] < -0.9


def test_unreadable_format_is_skipped_with_its_reason(tmp_path, monkeypatch):
    _rgb(tmp_path / "a.png")
    (tmp_path / "b.avif").write_bytes(b"\0\0\0\x1cftypavif" + bytes(64))
    monkeypatch.setattr(images, "readable", lambda ext: ext != ".avif")
    ds = build_dataset(tmp_path, TINY)
    assert [p.name for p in ds.report.skipped[SKIP_UNSUPPORTED]] == ["b.avif"]


def test_report_file_lists_every_file_not_used(tmp_path):
    _rgb(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_text("no png")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    ds = build_dataset(tmp_path, TINY)
    path = ds.report.write(tmp_path / "out" / "dataset_report.txt")
    lines = path.read_text().splitlines()
    assert f"{tmp_path / 'broken.png'}\tnot an image" in lines
    assert f"{tmp_path / 'zero.jpg'}\tempty file" in lines
    assert f"{tmp_path / 'notes.md'}\tnot an image file type" in lines
    assert f"{tmp_path / '.DS_Store'}\thidden" in lines
    assert "## skipped images: 2" in lines and lines[1] == str(ds.report).splitlines()[0]


def test_exclude_skips_the_output_folder(tmp_path):
    _rgb(tmp_path / "a.png")
    _rgb(tmp_path / "runs" / "lora" / "samples" / "step1.png")
    _rgb(tmp_path / "runs" / "other.png")
    ds = build_dataset(tmp_path, TINY, exclude=[tmp_path / "runs" / "lora"])
    assert [it.path.name for it in ds.items] == ["a.png", "other.png"]
    assert ds.report.ignored[IGNORE_EXCLUDED] == [tmp_path / "runs" / "lora"]
    data = _data(dir=str(tmp_path))
    assert len(build_datasets(data, exclude=[str(tmp_path / "runs")])) == 1


# ---------------------------------------------------------------- masks


def _masked_folder(tmp_path, source):
    """A 300×120 grey gradient image (bucket 64×192, random crop range 13 rows) and its mask
    equal to the same gradient, given by `source`."""
    grad = _gradient(300, 120)
    tmp_path.mkdir(parents=True, exist_ok=True)
    if source == "alpha":
        Image.fromarray(np.stack([grad] * 3 + [grad], -1), "RGBA").save(tmp_path / "a.png")
    else:
        Image.fromarray(grad, "L").convert("RGB").save(tmp_path / "a.png")
        mask = tmp_path / ("a.mask.png" if source == "beside" else "masks/a.png")
        mask.parent.mkdir(exist_ok=True)
        Image.fromarray(grad, "L").save(mask)
    return tmp_path


@pytest.mark.parametrize("source", ["beside", "folder", "alpha"])
def test_mask_sources_follow_the_pixels_crop_and_flip(tmp_path, source):
    folder = _masked_folder(tmp_path / source, source)
    ds = build_dataset(folder, TINY, crop="random", flip=True, alpha_mask=source == "alpha")
    assert len(ds) == 1 and ds.report.masks == {"alpha" if source == "alpha" else "mask files": 1}
    plain = build_dataset(_masked_folder(tmp_path / "plain", "beside"), TINY, crop="random", flip=True)
    seen = set()
    for seed in range(12):
        out = ds.load_item(0, torch.Generator().manual_seed(seed))
        mask = out["mask"]
        assert mask.shape == (1, 64, 192) and mask.dtype == torch.float32 and 0 <= mask.min() <= mask.max() <= 1
        if source != "alpha":  # the grey pixels are the mask: same resize, crop and flip
            assert torch.allclose(mask[0] * 2 - 1, out["pixels"][0], atol=1e-6)
        else:  # alpha composites the pixels on white; the mask equals the mask-file one
            ref = plain.load_item(0, torch.Generator().manual_seed(seed))
            assert torch.equal(mask, ref["mask"]) and out["time_ids"].tolist() == ref["time_ids"].tolist()
        seen.add((out["flipped"], int(out["time_ids"][2])))
    assert len({f for f, _ in seen}) == 2 and len({top for _, top in seen}) > 2  # flips and crops were drawn


def test_masks_folder_is_not_scanned_and_keys_change_with_the_mask(tmp_path):
    folder = _masked_folder(tmp_path, "folder")
    ds = build_dataset(folder, TINY)
    assert [it.path.name for it in ds.items] == ["a.png"] and ds[0].mask == folder / "masks" / "a.png"
    key = ds.content_key(0)
    Image.new("L", (300, 120), 255).save(folder / "masks" / "a.png")
    assert build_dataset(folder, TINY).content_key(0) != key
    assert build_dataset(folder, TINY).load_item(0)["mask"].min() == 1.0
    (folder / "masks" / "a.png").unlink()
    assert build_dataset(folder, TINY).load_item(0)["mask"] is None
    assert build_dataset(folder, TINY).content_key(0) != key  # the image's own sha256 now


def test_alpha_is_a_mask_only_when_asked(tmp_path):
    folder = _masked_folder(tmp_path, "alpha")
    assert build_dataset(folder, TINY).load_item(0)["mask"] is None
    assert build_dataset(folder, TINY, alpha_mask=True).load_item(0)["mask"] is not None
    assert build_dataset(folder, TINY).content_key(0) != build_dataset(folder, TINY, alpha_mask=True).content_key(0)


def test_downsample_mask_is_an_area_average():
    mask = torch.zeros(1, 16, 24)
    mask[:, :8, :8] = 1.0
    mask[:, 8:, 8:12] = 0.5
    small = downsample_mask(mask, 8)
    assert small.shape == (1, 2, 3)
    assert small.tolist() == [[[1.0, 0.0, 0.0], [0.0, 0.25, 0.0]]]
    assert downsample_mask(torch.ones(2, 1, 64, 64), 8).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="not divisible"):
        downsample_mask(torch.ones(1, 20, 16), 8)
