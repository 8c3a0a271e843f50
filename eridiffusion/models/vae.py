"""AutoencoderKL (the SD / SDXL VAE) in the ldm layout, on plain torch.

Architecture after Stability-AI generative-models `sgm/modules/diffusionmodules/model.py`
(`Encoder`, `Decoder`, `ResnetBlock`, `AttnBlock`, `Downsample`, `Upsample`) and
`sgm/models/autoencoder.py` (`AutoencodingEngineLegacy`: `quant_conv`, `post_quant_conv`),
itself from Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (2022).
Module names equal the checkpoint keys after `first_stage_model.`.

Images are in [-1, 1]; latents are unscaled (callers multiply by `cfg.scaling_factor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4  # latent channels; the encoder outputs 2·z (mean, logvar)
    embed_dim: int = 4  # quant_conv / post_quant_conv width, equal to z_channels in SD/SDXL
    in_channels: int = 3
    out_ch: int = 3
    num_groups: int = 32
    scaling_factor: float = 0.13025

    @classmethod
    def sdxl(cls) -> VAEConfig:
        return cls(scaling_factor=0.13025)

    @classmethod
    def sd15(cls) -> VAEConfig:
        return cls(scaling_factor=0.18215)

    @classmethod
    def tiny(cls) -> VAEConfig:
        return cls(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, scaling_factor=0.13025)

    @property
    def factor(self) -> int:
        """Pixels per latent pixel along each side (8 for every shipped variant)."""
        return 2 ** (len(self.ch_mult) - 1)


def Normalize(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-silu-conv twice plus a residual; 1×1 `nin_shortcut` when the width changes (no timestep input)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm1 = Normalize(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, num_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q/k/v/proj_out are 1×1 convs as in the checkpoint."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = Normalize(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    @staticmethod
    def _linear(conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
        """A 1×1 conv applied to token-major input as a matmul (the weight view costs no copy)."""
        return F.linear(t, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (self._linear(proj, t).unsqueeze(1) for proj in (self.q, self.k, self.v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C), one head, scale C**-0.5
        out = self._linear(self.proj_out, out).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W), channels-last strides
        # `out` first: the sum keeps its channels-last layout, as diffusers' does, so the kernels chosen
        # downstream match and fp32 parity with it is bit-exact.
        return out + x


class Downsample(nn.Module):
    """ldm's asymmetric padding: pad right/bottom by one, then a stride-2 3×3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, num_groups)
        self.attn_1 = AttnBlock(channels, num_groups)
        self.block_2 = ResnetBlock(channels, channels, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Down(nn.Module):
    """Encoder level `down.i`: `block.j` ResnetBlocks, then `downsample` except at the last level."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class Up(nn.Module):
    """Decoder level `up.i`: `block.j` ResnetBlocks, then `upsample` except at level 0 (full size)."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            block_out = cfg.ch * mult
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, g) for j in range(cfg.num_res_blocks)]
            block_in = block_out
            last = i == len(cfg.ch_mult) - 1
            self.down.append(Down(blocks, None if last else Downsample(block_in)))
        self.mid = MidBlock(block_in, g)
        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.num_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, g)
        # `up.i` holds the level at resolution i (0 = full size) but runs in reverse order, as in ldm.
        levels: list[Up] = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(block_in if j == 0 else block_out, block_out, g) for j in range(cfg.num_res_blocks + 1)]
            block_in = block_out
            levels.insert(0, Up(blocks, Upsample(block_in) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) per latent element; logvar clamped to [-30, 20] as ldm's
    `DiagonalGaussianDistribution` does (sgm/modules/distributions/distributions.py)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)  # (B, z, h, w) each
        return cls(mean, logvar)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread starts of windows of size `tile` covering [0, length), neighbours overlapping >= `overlap`."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _ramp(n: int, ramp: int, rise: bool, fall: bool) -> torch.Tensor:
    """Weights along one tile side: linear ramps of `ramp` samples on the sides that meet another tile."""
    i = torch.arange(n, dtype=torch.float32)
    w = torch.ones(n)
    if rise:
        w = torch.minimum(w, (i + 1) / (ramp + 1))
    if fall:
        w = torch.minimum(w, (n - i) / (ramp + 1))
    return w


def _tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
           step_in: int, step_out: int) -> torch.Tensor:
    """Run `fn` on overlapping windows of `x` and blend the results with linear ramps.

    Tiles are laid out on the latent grid (`tile`, `overlap` in latent pixels); one latent pixel is
    `step_in` input pixels and `step_out` output pixels (decode: 1 → 8, encode: 8 → 1). Each output
    pixel is the weighted mean of the tiles covering it, accumulated in fp32 (the idea of diffusers'
    `AutoencoderKL.tiled_decode`, with per-pixel normalised weights instead of pairwise blends).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"VAE tiling: overlap={overlap} must be >= 0 and smaller than tile={tile} (latent pixels)")
    b, _, hx, wx = x.shape
    gh, gw = hx // step_in, wx // step_in
    out = weight = None
    th, tw = min(tile, gh), min(tile, gw)
    for top in _tile_starts(gh, tile, overlap):
        for left in _tile_starts(gw, tile, overlap):
            piece = x[:, :, top * step_in:(top + th) * step_in, left * step_in:(left + tw) * step_in]
            y = fn(piece)  # (B, C_out, th·step_out, tw·step_out)
            if out is None:
                out = torch.zeros(b, y.shape[1], gh * step_out, gw * step_out, device=y.device, dtype=torch.float32)
                weight = torch.zeros(1, 1, gh * step_out, gw * step_out, device=y.device, dtype=torch.float32)
            r = overlap * step_out
            wy = _ramp(y.shape[2], r, top > 0, top + th < gh)
            wx_ = _ramp(y.shape[3], r, left > 0, left + tw < gw)
            w = (wy[:, None] * wx_[None, :]).to(y.device)  # (h, w)
            rows = slice(top * step_out, top * step_out + y.shape[2])
            cols = slice(left * step_out, left * step_out + y.shape[3])
            out[:, :, rows, cols] += y.float() * w
            weight[:, :, rows, cols] += w
    return (out / weight).to(y.dtype)


class AutoencoderKL(nn.Module):
    """The KL-regularised VAE of SD 1.x and SDXL: `encode(x) -> DiagonalGaussian`, `decode(z) -> image`.

    Precision: run it in fp32 or bf16. The SDXL VAE's activations exceed the fp16 range, so fp16
    gives inf/NaN (black images); bf16 has fp32's range and is safe.

    Memory: `tile=` (latent pixels, e.g. 64 with `overlap=16`) processes overlapping windows and
    blends them with linear ramps, so a 1024² image decodes on small GPUs; the result is close to,
    not equal to, the untiled one (GroupNorm statistics and the mid attention see one tile only, and
    conv zero padding applies at tile borders). `slice_batch=True` runs one image at a time.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))  # (B, 2·embed_dim, H/8, W/8)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))  # (B, out_ch, 8h, 8w)

    def encode(self, x: torch.Tensor, *, tile: int | None = None, overlap: int = 16,
               slice_batch: bool = False) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1] → posterior over unscaled latents (B, 4, H/8, W/8)."""
        x = x.to(self.dtype)
        if tile is not None and (x.shape[2] % self.cfg.factor or x.shape[3] % self.cfg.factor):
            raise ValueError(f"VAE tiled encode: image size {tuple(x.shape[2:])} must be a multiple of "
                             f"{self.cfg.factor}; resize/crop it or encode without tile=")
        parts = x.split(1) if slice_batch else (x,)
        if tile is None:
            moments = [self._moments(p) for p in parts]
        else:
            moments = [_tiled(self._moments, p, tile, overlap, self.cfg.factor, 1) for p in parts]
        return DiagonalGaussian.from_moments(torch.cat(moments) if len(moments) > 1 else moments[0])

    def decode(self, z: torch.Tensor, *, tile: int | None = None, overlap: int = 16,
               slice_batch: bool = False) -> torch.Tensor:
        """z: unscaled latents (B, 4, h, w) → image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        z = z.to(self.dtype)
        parts = z.split(1) if slice_batch else (z,)
        if tile is None:
            images = [self._decode(p) for p in parts]
        else:
            images = [_tiled(self._decode, p, tile, overlap, 1, self.cfg.factor) for p in parts]
        return torch.cat(images) if len(images) > 1 else images[0]
