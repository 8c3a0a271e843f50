"""kohya / LyCORIS module names: prefixes, default target patterns, and the name of each layer.

File layout (kohya-ss sd-scripts `networks/lora.py`): NAME = prefix + module path with "." -> "_".
Prefixes: `lora_unet_`, `lora_te1_` (SDXL CLIP-L), `lora_te2_` (SDXL bigG), `lora_te_` (SD1.5
CLIP-L). The UNet is named either by its ldm path ("ldm", SDXL) or by the diffusers block names
("diffusers", SD1.5); the family says which (`Family.unet_lora_naming`). The bigG text encoder
is stored open_clip-style (fused `in_proj_weight`), but its LoRA names are the HF-style ones
every reader expects (ComfyUI `model_lora_keys_clip`); the table `_TE2_NAMES` maps them, and
q/k/v become three row blocks of the fused weight.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from eridiffusion.errors import LoRAError
from eridiffusion.networks.base import Adapter, AdapterStack

PREFIXES = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_", "te": "lora_te_"}
NAMINGS = ("ldm", "diffusers")

# Module-path patterns (fnmatch, matched against the full path in the model, e.g.
# "input_blocks.4.1.transformer_blocks.0.attn1.to_q"; "*" also crosses dots).
UNET_TARGETS = (
    "*.transformer_blocks.*.attn[12].to_[qkv]",
    "*.transformer_blocks.*.attn[12].to_out.0",
    "*.transformer_blocks.*.ff.net.0.proj",
    "*.transformer_blocks.*.ff.net.2",
    "*.proj_in",
    "*.proj_out",
)
# With conv_rank (LoCon, as kohya's conv_dim): ResBlock convs, and the Downsample `op` /
# Upsample `conv`. emb_layers.1 (Linear) and the 1×1 skip_connection get the linear rank.
UNET_CONV_TARGETS = (
    "*.in_layers.2",
    "*.out_layers.3",
    "*.emb_layers.1",
    "*.skip_connection",
    "input_blocks.*.0.op",
    "output_blocks.*.conv",
)
TE_TARGETS = ("*.self_attn.[qkv]_proj", "*.self_attn.out_proj", "*.mlp.fc1", "*.mlp.fc2")
TE2_TARGETS = ("transformer.resblocks.*.attn", "*.attn.out_proj", "*.mlp.c_fc", "*.mlp.c_proj")
DEFAULT_TARGETS = {"unet": UNET_TARGETS, "te1": TE_TARGETS, "te": TE_TARGETS, "te2": TE2_TARGETS}

# open_clip path -> HF-style kohya name (after "lora_te2_"), as ComfyUI's LORA_CLIP_MAP and
# `clip_text_transformers_convert` (in_proj split into q, k, v rows; c_fc/c_proj = fc1/fc2).
_TE2_NAMES = {
    "attn.out_proj": "self_attn_out_proj",
    "mlp.c_fc": "mlp_fc1",
    "mlp.c_proj": "mlp_fc2",
}
_TE2_PATH = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj|attn)")

# ldm ResBlock child -> diffusers ResnetBlock2D child (names of SD1.5 LoRAs, see unet_lora_name).
_RESNET_NAMES = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_TOP_LEVEL_NAMES = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.2": "conv_out",
}


def unet_lora_name(path: str, cfg, naming: str = "ldm") -> str:
    """kohya name (without prefix) of a UNet module at ldm `path`.

    "ldm" (SDXL): the ldm path itself (kohya trains SDXL on the ldm UNet; ComfyUI maps it 1:1 from
    the checkpoint keys, diffusers through `_maybe_map_sgm_blocks_to_diffusers`, A1111 through its
    "lora_unet" -> "diffusion_model" fallback). "diffusers" (SD1.5): diffusers block names
    (`down_blocks_0_attentions_0_…`), because kohya trains SD1.x on the diffusers UNet, so every
    SD1.5 LoRA in the wild, kohya's own tools and A1111's `convert_diffusers_name_to_compvis`
    expect them; ComfyUI maps them through `unet_to_diffusers`.
    """
    if naming == "ldm":
        return path.replace(".", "_")
    if naming != "diffusers":
        raise LoRAError(f"unet_lora_name: naming {naming!r} unknown; use one of {NAMINGS}")
    if path in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[path].replace(".", "_")
    parts = path.split(".")
    nrb = cfg.num_res_blocks
    if parts[0] == "input_blocks":
        level, i = divmod(int(parts[1]) - 1, nrb + 1)
        kind, rest = ("resnets" if parts[2] == "0" else "attentions"), parts[3:]
        if i == nrb:  # the Downsample that closes a level
            return f"down_blocks_{level}_downsamplers_0_conv"
        block = f"down_blocks.{level}.{kind}.{i}"
    elif parts[0] == "middle_block":
        block = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}[parts[1]]
        kind, rest = block.split(".")[1], parts[2:]
    elif parts[0] == "output_blocks":
        level, i = divmod(int(parts[1]), nrb + 1)
        rest = parts[3:]
        if rest == ["conv"]:  # Upsample (index 1 or 2 of the block): a ResBlock has no child "conv"
            return f"up_blocks_{level}_upsamplers_0_conv"
        kind = "resnets" if parts[2] == "0" else "attentions"
        block = f"up_blocks.{level}.{kind}.{i}"
    else:
        raise LoRAError(f"unet_lora_name: no diffusers name for module {path!r}")
    inner = ".".join(rest)
    if kind == "resnets":
        inner = _RESNET_NAMES.get(inner, inner)
    return f"{block}.{inner}".replace(".", "_")


def default_naming(kind: str, model: nn.Module) -> str:
    """The UNet naming when the caller gives none: UNets without `label_emb` (cfg.adm_in_channels
    None, SD1.x) are named the diffusers way. Prefer `Family.unet_lora_naming`."""
    return "diffusers" if kind == "unet" and getattr(model.cfg, "adm_in_channels", None) is None else "ldm"


def _te2_name(path: str) -> str | None:
    """HF-style name of a bigG module (no prefix); for the fused attention, the q name's stem."""
    m = _TE2_PATH.fullmatch(path)
    if m is None:
        return None
    layer, sub = m.groups()
    stem = f"text_model_encoder_layers_{layer}_"
    return stem + ("self_attn" if sub == "attn" else _TE2_NAMES[sub])


def is_fused_attn(module: nn.Module) -> bool:
    """open_clip attention with a fused `in_proj_weight` and a `qkv_adapter` hook."""
    return isinstance(getattr(module, "in_proj_weight", None), torch.Tensor) and hasattr(module, "qkv_adapter")


def names_for(kind: str, path: str, module: nn.Module, model: nn.Module, naming: str = "ldm") -> list[str]:
    """kohya names of one module: three (q, k, v) for a fused attention, else one; [] if none."""
    prefix = PREFIXES[kind]
    if kind == "te2":
        stem = _te2_name(path)
        if stem is None:
            return []
        if is_fused_attn(module):
            return [f"{prefix}{stem}_{c}_proj" for c in "qkv"]
        return [prefix + stem]
    if is_fused_attn(module):
        return []
    if kind == "unet":
        return [prefix + unet_lora_name(path, model.cfg, naming)]
    return [prefix + path.replace(".", "_")]


def candidates(model: nn.Module, kind: str) -> Iterator[tuple[str, nn.Module]]:
    """Linear / Conv2d layers (and te2's fused attentions), none inside an adapter."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            if isinstance(child, (Adapter, AdapterStack)) or name == "qkv_adapter":
                continue
            path = prefix + name
            if isinstance(child, (nn.Linear, nn.Conv2d)) or (kind == "te2" and is_fused_attn(child)):
                yield path, child
            yield from walk(child, path + ".")

    yield from walk(model, "")


def name_map(model: nn.Module, kind: str) -> dict[str, tuple[str, nn.Module, int | None]]:
    """Every kohya name the model answers to -> (path, module, q/k/v index or None).

    UNets answer to both the ldm and the diffusers-derived names, like ComfyUI does.
    """
    out = {}
    namings = NAMINGS if kind == "unet" else ("ldm",)
    for path, m in candidates(model, kind):
        for naming in namings:
            try:
                names = names_for(kind, path, m, model, naming)
            except LoRAError:
                continue
            for i, name in enumerate(names):
                out[name] = (path, m, i if len(names) == 3 else None)
    return out


def kind_of(name: str) -> str | None:
    """The prefix kind ("unet", "te1", …) of a kohya module name, or None."""
    return next((k for k, pre in PREFIXES.items() if name.startswith(pre)), None)
