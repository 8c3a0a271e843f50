"""VAE: parity with diffusers through its ldm converter, exact checkpoint keys, tiling, precision."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eridiffusion.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, _tiled

FIXTURE = Path(__file__).parent.parent / "fixtures" / "keys_vae.json"


def diffusers_twin(vae: AutoencoderKL):
    """diffusers AutoencoderKL loaded (strict) from our state dict via diffusers' own ldm converter."""
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg = vae.cfg
    n = len(cfg.ch_mult)
    config = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels, norm_num_groups=cfg.num_groups, scaling_factor=cfg.scaling_factor,
    )
    checkpoint = {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    assert len(converted) == len(checkpoint)  # every one of our tensors has a diffusers destination
    ref = DAutoencoderKL(**config).eval()
    ref.load_state_dict(converted, strict=True)
    return ref


@torch.no_grad()
def test_parity_with_diffusers_via_ldm_converter(tiny_vae):
    vae = tiny_vae()
    ref = diffusers_twin(vae)
    x = torch.rand(2, 3, 64, 48) * 2 - 1  # non-square: catches H/W mix-ups and the asymmetric pad

    post = vae.encode(x)
    ref_post = ref.encode(x).latent_dist
    assert post.mean.shape == (2, 4, 8, 6)
    torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(post.logvar, ref_post.logvar, atol=1e-5, rtol=0)
    torch.testing.assert_close(post.std, ref_post.std, atol=1e-5, rtol=0)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.testing.assert_close(post.sample(g1), ref_post.sample(g2), atol=1e-5, rtol=0)

    z = torch.randn(2, 4, 8, 6) * 3
    out = vae.decode(z)
    assert out.shape == (2, 3, 64, 48)
    torch.testing.assert_close(out, ref.decode(z).sample, atol=1e-5, rtol=0)


def test_sdxl_keys_and_shapes_match_checkpoint_fixture():
    fixture = json.loads(FIXTURE.read_text())
    assert fixture["count"] == 248 and "convert_diffusers_to_original_sdxl" in fixture["source"]
    for cfg in (VAEConfig.sdxl(), VAEConfig.sd15()):
        with torch.device("meta"):
            vae = AutoencoderKL(cfg)
        ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
        assert set(ours) - set(fixture["keys"]) == set()
        assert set(fixture["keys"]) - set(ours) == set()
        assert ours == fixture["keys"]
    assert ours["decoder.mid.attn_1.q.weight"] == [512, 512, 1, 1]
    assert VAEConfig.sdxl().scaling_factor == 0.13025 and VAEConfig.sd15().scaling_factor == 0.18215
    assert VAEConfig.sdxl().factor == VAEConfig.tiny().factor == 8


def test_tiling_geometry_is_exact_for_a_local_map():
    """With a map that has no cross-pixel context, overlapping tiles + ramps reproduce it exactly."""
    z = torch.randn(2, 4, 23, 37)
    up = _tiled(lambda t: F.interpolate(t, scale_factor=8.0, mode="nearest"), z, 8, 3, 1, 8)
    torch.testing.assert_close(up, F.interpolate(z, scale_factor=8.0, mode="nearest"), atol=1e-6, rtol=0)
    x = torch.randn(1, 3, 200, 136)
    down = _tiled(lambda t: F.avg_pool2d(t, 8), x, 10, 4, 8, 1)
    torch.testing.assert_close(down, F.avg_pool2d(x, 8), atol=1e-6, rtol=0)


def diffusers_tiled(vae: AutoencoderKL, tile: int):
    """diffusers' own tiled VAE (pairwise linear blends, 25 % overlap) at the same tile size."""
    ref = diffusers_twin(vae)
    ref.tile_latent_min_size, ref.tile_sample_min_size = tile, tile * vae.cfg.factor
    ref.enable_tiling()
    return ref


@torch.no_grad()
def test_tiled_decode_close_to_plain_and_right_shape(tiny_vae):
    """Tiling is not exact: each tile normalises with its own GroupNorm statistics, the mid attention
    sees one tile only and convs zero-pad at tile borders. On this random tiny model (32 channels, so
    GroupNorm is per channel, and a receptive field of ~20 latent pixels) that costs a lot more than on
    the real VAE with 64-latent tiles, so the bar is: no worse than diffusers' tiled_decode at the same
    tile size, better with larger tiles, and exact when one tile covers the latent."""
    vae = tiny_vae()
    z = torch.randn(1, 4, 16, 23)  # not a multiple of the tile or of the stride (tile - overlap)
    plain = vae.decode(z)
    scale = plain.abs().mean()
    errors = {}
    for tile in (12, 16):
        tiled = vae.decode(z, tile=tile, overlap=tile // 4)
        assert tiled.shape == plain.shape == (1, 3, 128, 184)
        errors[tile] = (tiled - plain).abs().mean() / scale
    ref_err = (diffusers_tiled(vae, 12).decode(z).sample - plain).abs().mean() / scale
    assert errors[12] <= ref_err, (errors, ref_err)
    assert errors[12] > errors[16] and errors[16] < 0.25, errors
    torch.testing.assert_close(vae.decode(z, tile=32), plain, atol=1e-6, rtol=0)


@torch.no_grad()
def test_tiled_encode_close_to_plain(tiny_vae):
    vae = tiny_vae()
    x = torch.rand(1, 3, 128, 192) * 2 - 1
    plain = vae.encode(x)
    tiled = vae.encode(x, tile=12, overlap=3)
    assert tiled.mean.shape == plain.mean.shape == (1, 4, 16, 24)
    scale = plain.mean.abs().mean()
    err = (tiled.mean - plain.mean).abs().mean() / scale
    ref_err = (diffusers_tiled(vae, 12).encode(x).latent_dist.mean - plain.mean).abs().mean() / scale
    assert err <= ref_err and err < 0.25, (err, ref_err)
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(x[:, :, :90], tile=12)


@torch.no_grad()
def test_batch_slicing_equals_batched(tiny_vae):
    vae = tiny_vae()
    x = torch.rand(3, 3, 64, 48) * 2 - 1
    plain = vae.encode(x)
    # Same maths; only fp32 rounding differs (batch size changes the conv kernels' blocking).
    sliced = vae.encode(x, slice_batch=True)
    torch.testing.assert_close(sliced.mean, plain.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(sliced.logvar, plain.logvar, atol=1e-5, rtol=0)
    z = plain.mode()
    torch.testing.assert_close(vae.decode(z, slice_batch=True), vae.decode(z), atol=1e-4, rtol=0)


@torch.no_grad()
def test_bf16_runs_close_to_fp32(tiny_vae):
    """bf16 keeps fp32's exponent range (fp16 overflows in the SDXL VAE); its rounding error here is
    compared with diffusers' AutoencoderKL run in bf16 on the same weights."""
    vae = tiny_vae()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = vae.encode(x).mean
    out = vae.decode(z)
    vae16 = tiny_vae().to(torch.bfloat16)
    ref16 = diffusers_twin(vae).to(torch.bfloat16)
    z16 = vae16.encode(x).mean  # fp32 input is cast to the weights' dtype
    out16 = vae16.decode(z)
    assert z16.dtype == out16.dtype == torch.bfloat16
    assert torch.isfinite(out16).all() and torch.isfinite(z16).all()
    ref_z16 = ref16.encode(x.bfloat16()).latent_dist.mean.float()
    ref_out16 = ref16.decode(z.bfloat16()).sample.float()
    assert (z16.float() - z).abs().mean() <= 1.5 * (ref_z16 - z).abs().mean()
    assert (out16.float() - out).abs().mean() <= 1.5 * (ref_out16 - out).abs().mean()
    assert (out16.float() - out).abs().mean() < 0.05 * out.abs().mean()


def test_diagonal_gaussian_clamps_and_samples_reproducibly():
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.full_like(mean, 100.0)
    logvar[0] = -100.0
    post = DiagonalGaussian.from_moments(torch.cat([mean, logvar], dim=1))
    assert post.logvar[0].eq(-30.0).all() and post.logvar[1].eq(20.0).all()
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    assert post.mode() is post.mean
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(3)), mean + post.std * eps)
