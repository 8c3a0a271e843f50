"""The two SDXL text encoders: CLIP ViT-L/14 text (TE1, HF layout) and OpenCLIP ViT-bigG/14 text (TE2).

Both are the pre-LN causal transformer of CLIP (Radford et al. 2021, openai/CLIP `clip/model.py`):
token + learned position embeddings, N blocks of `x + attn(ln_1(x))`, `x + mlp(ln_2(x))` with a
causal mask, a final LayerNorm, and the feature at the EOS token (the largest id) as the pooled
output. SDXL (Stability-AI generative-models `sgm/modules/encoders/modules.py`) reads:
- TE1 `FrozenCLIPEmbedder(layer="hidden", layer_idx=11)`: output of the 11th of 12 layers, no final norm;
- TE2 `FrozenOpenCLIPEmbedder2(layer="penultimate", legacy=False)`: input of the last block, no final norm,
  and pooled = ln_final(last)[EOS] @ text_projection.
`TextOutput.hidden` is that penultimate state for both models.

Module names equal the checkpoint keys after `conditioner.embedders.0.transformer.` (TE1, transformers
`CLIPTextModel` layout incl. `text_model.`) and `conditioner.embedders.1.model.` (TE2, open_clip
`TextTransformer` layout with a fused `in_proj_weight` like `nn.MultiheadAttention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class TextOutput(NamedTuple):
    hidden: Tensor  # (B, T, D) output of the penultimate layer, no final norm (SDXL context)
    last: Tensor  # (B, T, D) final norm of the last layer (SD1.5 context)
    pooled: Tensor  # (B, D) `last` at the EOS position; OpenCLIP: (B, proj_dim) after text_projection


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer in the transformers layout (openai/clip-vit-large-patch14 for SDXL TE1 / SD1.5)."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    eps: float = 1e-5

    @classmethod
    def clip_l(cls) -> CLIPTextConfig:
        return cls()

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        return cls(width=32, layers=3, heads=4, mlp_dim=64)

    @classmethod
    def micro(cls) -> CLIPTextConfig:
        return cls(width=16, layers=2, heads=2, mlp_dim=32)


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """OpenCLIP text transformer in the open_clip layout (ViT-bigG-14, laion2b_s39b_b160k, for SDXL TE2)."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 1280
    layers: int = 32
    heads: int = 20
    mlp_dim: int = 5120
    proj_dim: int = 1280
    act: str = "gelu"
    eps: float = 1e-5

    @classmethod
    def bigg(cls) -> OpenCLIPTextConfig:
        return cls()

    @classmethod
    def tiny(cls) -> OpenCLIPTextConfig:
        return cls(width=64, layers=3, heads=4, mlp_dim=128, proj_dim=64)

    @classmethod
    def micro(cls) -> OpenCLIPTextConfig:
        return cls(width=24, layers=2, heads=2, mlp_dim=48, proj_dim=24)


def quick_gelu(x: Tensor) -> Tensor:
    """x·σ(1.702x), the GELU approximation OpenAI's CLIP was trained with (openai/CLIP `QuickGELU`)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def _activation(name: str):
    if name not in _ACTIVATIONS:
        raise ValueError(f"text encoder config: unknown act={name!r}; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, heads, T, head_dim) x3 -> (B, T, heads·head_dim), scale 1/√head_dim, causal mask."""
    B, _, T, _ = q.shape
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, head_dim)
    return y.transpose(1, 2).reshape(B, T, -1)  # (B, T, D)


def _run_blocks(blocks: nn.ModuleList, x: Tensor, use_checkpoint: bool) -> tuple[Tensor, Tensor]:
    """Runs all blocks; returns (input of the last block, output of the last block)."""
    hidden = x
    for block in blocks:
        hidden = x
        x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
    return hidden, x


def _pool(last: Tensor, ids: Tensor) -> Tensor:
    """Feature at the first EOS: EOS 49407 is the largest id, argmax returns its first occurrence."""
    return last[torch.arange(last.shape[0], device=last.device), ids.argmax(dim=-1)]  # (B, D)


# ---------------------------------------------------------------------------------------------
# TE1: CLIP ViT-L/14 text, transformers layout (keys `text_model.…`)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = (
            proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, T, head_dim)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        return self.out_proj(_causal_attention(q, k, v))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = _activation(cfg.act)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, ids: Tensor) -> Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]  # (B, T, D)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    """Holds the `text_model.` submodules; `CLIPTextModel.forward` runs them."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPTextModel(nn.Module):
    """CLIP text encoder (TE1 of SDXL, the text encoder of SD1.5). `forward(ids (B, T)) -> TextOutput`."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        self.gradient_checkpointing = False

    def forward(self, ids: Tensor) -> TextOutput:
        tm = self.text_model
        x = tm.embeddings(ids)  # (B, T, D)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        hidden, x = _run_blocks(tm.encoder.layers, x, use_checkpoint)
        last = tm.final_layer_norm(x)
        return TextOutput(hidden, last, _pool(last, ids))


# ---------------------------------------------------------------------------------------------
# TE2: OpenCLIP ViT-bigG/14 text, open_clip layout


class MultiheadSelfAttention(nn.Module):
    """`nn.MultiheadAttention` parameter layout (fused `in_proj_weight` rows [q; k; v]) run through SDPA.

    `qkv_adapter`, when set (a LoRA on q/k/v), maps x (B, T, D) to a (B, T, 3·D) delta added to the
    fused projection: that is how a te2 LoRA on the row slices of `in_proj_weight` is applied.
    """

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        self.qkv_adapter: nn.Module | None = None
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3·D)
        if self.qkv_adapter is not None:
            qkv = qkv + self.qkv_adapter(x)
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, head_dim)
        return self.out_proj(_causal_attention(q, k, v))


class MLP(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.act = _activation(cfg.act)
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_dim)
        self.c_proj = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = MultiheadSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """OpenCLIP text encoder (TE2 of SDXL). `forward(ids (B, T)) -> TextOutput`, pooled projected.

    `text_projection` is stored (width, proj_dim) and applied as `x @ P` (open_clip; diffusers and
    ComfyUI transpose it into a Linear weight, sd-scripts does not).
    """

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.proj_dim))
        self.gradient_checkpointing = False
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)

    def forward(self, ids: Tensor) -> TextOutput:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]  # (B, T, D)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        hidden, x = _run_blocks(self.transformer.resblocks, x, use_checkpoint)
        last = self.ln_final(x)
        return TextOutput(hidden, last, _pool(last, ids) @ self.text_projection)
