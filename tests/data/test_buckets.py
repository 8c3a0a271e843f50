import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from eridiffusion.data.buckets import (
    BucketBatchSampler,
    BucketConfig,
    assign_bucket,
    bucket_transform,
    make_buckets,
)


# ---------------------------------------------------------------- bucket grid


def test_tiny_buckets_exact():
    # By hand, area 128² = 16384, step 64, sides in [64, 256]:
    # w=64 → h=min(256, 256)=256; w=128 → 128; w=192 → 85, floored to 64; w=256 → 64; plus mirrors.
    assert make_buckets(BucketConfig.tiny()) == [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]


@pytest.mark.parametrize("cfg", [BucketConfig.sdxl(), BucketConfig.sd15(), BucketConfig.tiny()])
def test_bucket_grid_invariants(cfg):
    buckets = make_buckets(cfg)
    assert (cfg.resolution, cfg.resolution) in buckets
    for h, w in buckets:
        assert h % cfg.step == 0 and w % cfg.step == 0
        assert cfg.min_side <= min(h, w) and max(h, w) <= cfg.max_side
        assert h * w <= cfg.resolution**2
        assert (w, h) in buckets  # mirrored
    # No wasted area: one of the sides cannot grow by a step (the grid is built per width, then mirrored).
    area = cfg.resolution**2
    for h, w in buckets:
        assert h == cfg.max_side or (h + cfg.step) * w > area or w == cfg.max_side or h * (w + cfg.step) > area


def test_sdxl_grid_has_the_sai_resolutions():
    buckets = set(make_buckets(BucketConfig.sdxl()))
    # SDXL's published training resolutions (h, w), a subset of the kohya-style grid.
    for hw in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344)]:
        assert hw in buckets


def test_bucket_config_rejects_off_grid_sides():
    with pytest.raises(ValueError, match="multiples of step"):
        BucketConfig(resolution=512, step=64, min_side=100, max_side=1024)


def test_assign_closest_aspect_ratio():
    buckets = make_buckets(BucketConfig.sdxl())
    assert assign_bucket(3000, 3000, buckets) == (1024, 1024)
    assert assign_bucket(1216, 832, buckets) == (1216, 832)  # exact match
    assert assign_bucket(4000, 3000, buckets) == (1152, 896)  # 4:3 → 1.333 vs 1.286 (next: 1.462)
    assert assign_bucket(3000, 4000, buckets) == (896, 1152)
    # Log distance is symmetric in portrait / landscape; a linear h/w distance would send 180×100
    # (1.8) to the square (|1.8 − 1| < |1.8 − 3|) but 100×180 to 64×192.
    tiny = make_buckets(BucketConfig.tiny())
    assert assign_bucket(180, 100, tiny) == (192, 64) and assign_bucket(100, 180, tiny) == (64, 192)
    # Brute force over log-aspect distance.
    for h, w in [(123, 456), (999, 100), (640, 480), (1080, 1920)]:
        best = min(abs(math.log(b[0] / b[1]) - math.log(h / w)) for b in buckets)
        got = assign_bucket(h, w, buckets)
        assert abs(math.log(got[0] / got[1]) - math.log(h / w)) == best


# ---------------------------------------------------------------- transform


def _ramp(w, h):
    """RGB image whose R = x, G = y, B = 7 (distinct columns / rows)."""
    x = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    y = np.tile(np.arange(h, dtype=np.uint8)[:, None], (1, w))
    return Image.fromarray(np.stack([x, y, np.full_like(x, 7)], axis=-1))


def _norm(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def test_center_crop_no_resize_exact_pixels_and_time_ids():
    img = _ramp(160, 128)  # w=160, h=128 → bucket 128×128 needs no resize, crop 16 px each side
    pixels, time_ids, crop = bucket_transform(img, (128, 128), "center", flip=False)
    assert pixels.shape == (3, 128, 128) and pixels.dtype == torch.float32
    expected = _norm(np.asarray(img)[:, 16:144])
    assert torch.equal(pixels, expected)
    assert time_ids.tolist() == [128, 160, 0, 16, 128, 128]
    assert crop == (0, 16)


def test_flip_mirrors_pixels_and_crop_left():
    img = _ramp(200, 128)
    g = torch.Generator().manual_seed(3)
    pixels, time_ids, (top, left) = bucket_transform(img, (128, 128), "random", flip=True, generator=g)
    assert 0 <= left <= 72 and top == 0
    expected = _norm(np.asarray(img)[:, left : left + 128][:, ::-1].copy())
    assert torch.equal(pixels, expected)
    # In the flipped 200-wide image, the crop starts at 200 - left - 128.
    assert time_ids.tolist() == [128, 200, 0, 200 - left - 128, 128, 128]


def test_random_crop_is_seeded_and_covers_range():
    img = _ramp(128, 250)  # tall: crop top in [0, 122]
    tops = []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        _, t1, crop1 = bucket_transform(img, (128, 128), "random", generator=g)
        g = torch.Generator().manual_seed(seed)
        _, t2, crop2 = bucket_transform(img, (128, 128), "random", generator=g)
        assert crop1 == crop2 and torch.equal(t1, t2)
        assert crop1[1] == 0 and 0 <= crop1[0] <= 122
        tops.append(crop1[0])
    assert len(set(tops)) > 20


def test_downscale_resize_matches_analytic_ramp():
    # R = x (0..255), G = y (0..199): 256×200 → bucket 64×128, scale max(64/200, 128/256) = 0.5
    # → resized 128×100, crop top (100-64)//2 = 18. A symmetric, normalised resampling kernel
    # reproduces a linear ramp: output pixel j samples input x = 2j + 0.5.
    x = np.tile(np.arange(256, dtype=np.uint8), (200, 1))
    y = np.tile(np.arange(200, dtype=np.uint8)[:, None], (1, 256))
    img = Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1))
    pixels, time_ids, crop = bucket_transform(img, (64, 128), "center")
    assert time_ids.tolist() == [200, 256, 18, 0, 64, 128] and crop == (18, 0)
    values = (pixels + 1) * 127.5  # back to 0..255
    j = torch.arange(128, dtype=torch.float32)
    i = torch.arange(64, dtype=torch.float32)
    inner = slice(3, -3)  # away from the image borders, where the kernel is clipped
    r_diff = (values[0, :, inner] - (2 * j + 0.5)[inner]).abs().max().item()
    g_diff = (values[1, :, :] - (2 * (i + 18) + 0.5)[:, None]).abs().max().item()
    assert r_diff <= 0.75 and g_diff <= 0.75, (r_diff, g_diff)  # measured 0.5: uint8 rounding


def test_upscale_and_extremes_normalised():
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    pixels, time_ids, _ = bucket_transform(white, (64, 192), "center")
    assert pixels.shape == (3, 64, 192)
    assert torch.allclose(pixels, torch.ones_like(pixels))
    black = Image.new("RGB", (40, 30), (0, 0, 0))
    assert torch.equal(bucket_transform(black, (64, 64))[0], -torch.ones(3, 64, 64))
    # 40×30 scaled by max(64/30, 192/40)=4.8 → 192×144, crop top (144-64)//2 = 40.
    assert time_ids.tolist() == [30, 40, 40, 0, 64, 192]


# ---------------------------------------------------------------- sampler


def _buckets(n=37):
    kinds = ["a", "b", "c"]
    return [kinds[(i * 7) % 3] if i % 5 else "d" for i in range(n)]


def _check_epoch(batches, buckets, batch_size, repeats=None):
    seen = Counter()
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert len({buckets[i] for i in batch}) == 1  # never mixes buckets
        seen.update(batch)
    expected = Counter({i: (1 if repeats is None else repeats[i]) for i in range(len(buckets))})
    assert seen == +expected


def test_sampler_no_mixing_and_all_seen_with_repeats():
    buckets = _buckets()
    repeats = [1 + (i % 3) for i in range(len(buckets))]
    s = BucketBatchSampler(buckets, 4, seed=1, repeats=repeats)
    for _ in range(3):
        _check_epoch(list(s), buckets, 4, repeats)
    assert s.epoch == 3


def test_sampler_deterministic_per_seed_and_epoch():
    buckets = _buckets()
    a, b = BucketBatchSampler(buckets, 4, seed=5), BucketBatchSampler(buckets, 4, seed=5)
    e0, e1 = list(a), list(a)
    assert list(b) == e0 and list(b) == e1
    assert e0 != e1  # a new order each epoch
    assert list(BucketBatchSampler(buckets, 4, seed=6)) != e0
    c = BucketBatchSampler(buckets, 4, seed=5)
    c.set_epoch(1)
    assert list(c) == e1


def test_sampler_no_shuffle_is_ordered():
    s = BucketBatchSampler(["x"] * 5 + ["y"] * 3, 2, seed=0, shuffle=False)
    assert list(s) == [[0, 1], [2, 3], [4], [5, 6], [7]]


def test_sampler_drop_last_keeps_only_full_batches():
    buckets = _buckets()
    batches = list(BucketBatchSampler(buckets, 4, seed=0, drop_last=True))
    assert all(len(b) == 4 for b in batches)
    counts = Counter(buckets)
    assert len(batches) == sum(n // 4 for n in counts.values())


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_rank_split_whole_batches_each_sample_once(drop_last):
    buckets = _buckets(53)
    world = 3
    full = list(BucketBatchSampler(buckets, 4, seed=9, drop_last=drop_last))
    per_rank = [list(BucketBatchSampler(buckets, 4, seed=9, drop_last=drop_last, rank=r, world_size=world))
                for r in range(world)]
    merged = [b for r in range(world) for b in per_rank[r]]
    assert sorted(map(tuple, merged)) == sorted(map(tuple, full[: len(merged)]))
    if drop_last:
        assert len({len(p) for p in per_rank}) == 1  # every rank takes the same number of steps
    else:
        _check_epoch(merged, buckets, 4)
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    flat = [i for b in merged for i in b]
    assert len(flat) == len(set(flat))  # no sample on two ranks


def test_sampler_resume_yields_exactly_the_remaining_batches():
    buckets = _buckets()
    ref = BucketBatchSampler(buckets, 3, seed=2)
    ref_epochs = [list(ref) for _ in range(3)]

    run = BucketBatchSampler(buckets, 3, seed=2)
    list(run)  # epoch 0 done
    it = iter(run)
    consumed = [next(it) for _ in range(4)]
    state = run.state_dict()
    assert state["epoch"] == 1 and state["position"] == 4

    resumed = BucketBatchSampler(buckets, 3, seed=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the trainer's loop calling set_epoch on the same epoch keeps the position
    rest = list(resumed)
    assert consumed + rest == ref_epochs[1]
    assert list(resumed) == ref_epochs[2]


def test_sampler_resume_refuses_other_seed():
    s = BucketBatchSampler(_buckets(), 3, seed=2)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"epoch": 0, "position": 1, "seed": 3})
