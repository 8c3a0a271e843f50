"""The SDXL / SD1.5 UNet in the ldm/sgm layout, on plain PyTorch.

Layout and maths follow Stability-AI generative-models
`sgm/modules/diffusionmodules/openaimodel.py` (UNetModel, ResBlock, Downsample, Upsample)
and `sgm/modules/attention.py` (SpatialTransformer, BasicTransformerBlock, CrossAttention,
GEGLU). Module names equal the checkpoint keys after `model.diffusion_model.`, so a
checkpoint loads with `load_state_dict(strict=True)` and LoRA names follow directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from eridiffusion import ops

GROUPS = 32  # GroupNorm groups everywhere in the ldm UNet


def _run(fn, *args, ckpt: bool):
    """fn(*args); with `ckpt`, only the inputs are kept and the rest is recomputed in backward."""
    return checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args)


@dataclass(frozen=True)
class UNetConfig:
    """Per-level tuples (one entry per resolution level) make the variants data, not code."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    transformer_depth: tuple[int, ...]  # 0 = no SpatialTransformer at that level
    transformer_depth_middle: int
    num_heads: tuple[int, ...]  # attention heads per level (middle block uses the last)
    context_dim: int
    use_linear: bool  # proj_in/proj_out as Linear (SDXL) or 1x1 Conv (SD1.5)
    adm_in_channels: int | None = None  # size of `y` (SDXL label_emb input); None: no label_emb
    addition_time_embed_dim: int | None = None  # per-number sinusoid size of SDXL time_ids
    in_channels: int = 4
    out_channels: int = 4

    @classmethod
    def sdxl(cls) -> UNetConfig:
        # sgm configs/inference/sd_xl_base.yaml: heads = channels // 64 (num_head_channels 64)
        return cls(320, (1, 2, 4), 2, (0, 2, 10), 10, (5, 10, 20), 2048, True, 2816, 256)

    @classmethod
    def sd15(cls) -> UNetConfig:
        # ldm configs/stable-diffusion/v1-inference.yaml: 8 heads, attention on levels 0-2
        return cls(320, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, (8, 8, 8, 8), 768, False)

    @classmethod
    def tiny(cls) -> UNetConfig:
        # head channels 16; adm = 6 * 32 + 64 (pooled width of the tiny OpenCLIP)
        return cls(32, (1, 2, 4), 2, (0, 1, 1), 1, (2, 4, 8), 96, True, 256, 32)

    @classmethod
    def micro(cls) -> UNetConfig:
        # the shipped shapes model (eridiffusion/tiny/weights): 32-64-64 channels, attention on
        # levels 1-2, 16 channels per head; context 40 = 16 + 24, adm = 6 * 16 + 24
        return cls(32, (1, 2, 2), 2, (0, 1, 1), 1, (2, 4, 4), 40, True, 120, 16)

    @classmethod
    def tiny_sd15(cls) -> UNetConfig:
        return cls(32, (1, 2, 2), 2, (1, 1, 0), 1, (4, 4, 4), 32, False)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ldm `timestep_embedding`: [cos(t·f), sin(t·f)], f_i = P^(-i/half).

    `t` (B,) float or int -> (B, dim) float32 (cos first; zero-padded when dim is odd).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sdxl_vector(pooled: torch.Tensor, time_ids: torch.Tensor, embed_dim: int = 256) -> torch.Tensor:
    """SDXL `y`: concat(pooled, sinusoid of each of the 6 time_ids), as sgm GeneralConditioner.

    sgm ConcatTimestepEmbedderND embeds every number separately (`(b d) e -> b (d e)`); the
    vector embedders come after bigG's pooled output. `pooled` (B, P), `time_ids` (B, 6) =
    [orig_h, orig_w, crop_top, crop_left, target_h, target_w] -> (B, P + 6·embed_dim).
    """
    b = time_ids.shape[0]
    emb = timestep_embedding(time_ids.flatten(), embed_dim).reshape(b, -1)  # (B, 6·embed_dim)
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with the time embedding added in between (sgm ResBlock)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, channels), nn.SiLU(), ops.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            ops.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else ops.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None = None,
                ckpt: bool = False) -> torch.Tensor:
        """`skip`: the encoder feature an output block concatenates to `x` (inside the block, so
        checkpointing keeps x and skip, not their concatenation). `ckpt`: recompute in backward."""
        return _run(self._forward, x, emb, skip, ckpt=ckpt)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # (B, C + C_skip, H, W)
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C, 1, 1) broadcast over H, W
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention without q/k/v bias; self-attention when `context` is None.

    `fuse_qkv = True` computes a self-attention's q, k, v with one GEMM over the concatenated
    weights (`ops.project`, LoRA updates included); the parameters keep their names. `recompute =
    True`: a compiled region concatenates them again in backward instead of keeping the copy."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.fuse_qkv = False
        self.recompute = False

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        if context is None and self.fuse_qkv:
            q, k, v = ops.project((self.to_q, self.to_k, self.to_v), x, self.recompute)
        else:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        s = k.shape[1]
        q = q.view(b, t, self.heads, -1).transpose(1, 2)  # (B, heads, T, head_dim)
        k = k.view(b, s, self.heads, -1).transpose(1, 2)  # (B, heads, S, head_dim)
        v = v.view(b, s, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, heads·head_dim)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, arXiv:2002.05202): x · gelu(gate), one projection.

    `recompute = True`: in a compiled region the output is computed again in backward instead of
    kept (40 MiB per SDXL 32² block at batch 4; `speed.optimize_for_training` sets it)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)
        self.recompute = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.geglu(self.proj(x), self.recompute)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim // heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim // heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
        """`ckpt`: keep only this block's inputs and recompute the rest in backward."""
        return _run(self._forward, x, context, ckpt=ckpt)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H·W positions of a feature map, with a residual around it."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, use_linear: bool):
        super().__init__()
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if use_linear else ops.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, context_dim, heads) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels) if use_linear else ops.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
        """`ckpt`: recompute each transformer block in backward, one at a time (the peak holds one
        block's activations, not the whole stack's: SDXL has stacks of 10)."""
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H·W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, ckpt)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = ops.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """One `input_blocks.i` / `middle_block` / `output_blocks.i`: routes emb, context and an
    output block's skip feature to the layers that take them; `ckpt` checkpoints each ResBlock
    and transformer block."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, ckpt: bool = False,
                skip: torch.Tensor | None = None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x, skip = layer(x, emb, skip, ckpt), None
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, ckpt)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """sgm `UNetModel`: `forward(x, timesteps, context, y=None)` -> noise prediction, shape of x.

    Runs in the dtype of its weights (inputs are cast; the sinusoid is computed in fp32). Set
    `gradient_checkpointing = True` to recompute each ResBlock / BasicTransformerBlock (and the
    output layers) in backward.
    Unlike sgm, no layer is zero-initialised: weights always come from a checkpoint, and random
    tiny models should give non-trivial outputs.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
            )

        def transformer(ch: int, level: int, depth: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.num_heads[level], depth, cfg.context_dim, cfg.use_linear)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(ops.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch = mc
        n_levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, mc * mult)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, level, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != n_levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, ch),
            transformer(ch, n_levels - 1, cfg.transformer_depth_middle),
            ResBlock(ch, ted, ch),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, mc * mult)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, level, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(GROUPS, ch), nn.SiLU(), ops.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        dtype = self.out[0].weight.dtype  # a GroupNorm: never replaced by a LoRA wrapper
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(dtype))  # (B, 4·mc)
        if self.cfg.adm_in_channels is not None:
            if y is None or y.shape[-1] != self.cfg.adm_in_channels:
                got = None if y is None else tuple(y.shape)
                raise ValueError(
                    f"UNet: y has shape {got}, need (B, {self.cfg.adm_in_channels}); "
                    "build it with sdxl_vector(pooled, time_ids)"
                )
            emb = emb + self.label_emb(y.to(dtype))
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        h, context = x.to(dtype), context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, ckpt)
            skips.append(h)
        h = self.middle_block(h, emb, context, ckpt)
        for block in self.output_blocks:
            h = block(h, emb, context, ckpt, skip=skips.pop())
        return _run(self.out, h, ckpt=ckpt)
