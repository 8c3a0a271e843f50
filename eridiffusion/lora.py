"""LoRA and LoCon adapters, kohya-format names, and safetensors files that ComfyUI, A1111/Forge
and diffusers read.

LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen layer W gets a low-rank update,
    y = W x + (alpha / rank) · multiplier · up(down(dropout(x))),
`down` (rank, in) kaiming-uniform, `up` (out, rank) zero, so step 0 is the base model.
LoCon (LyCORIS) does the same for a k×k conv: `down` is a (rank, in, k, k) conv with the base
stride/padding, `up` a 1×1 conv; the folded update is up.flatten(1) @ down.flatten(1).

File layout (kohya-ss sd-scripts `networks/lora.py`): per adapted module NAME,
`NAME.lora_down.weight`, `NAME.lora_up.weight`, `NAME.alpha`; NAME = prefix + module path with
"." -> "_". Prefixes: `lora_unet_`, `lora_te1_` (SDXL CLIP-L), `lora_te2_` (SDXL bigG), `lora_te_`
(SD1.5 CLIP-L). The bigG text encoder is stored open_clip-style (fused `in_proj_weight`), but its
LoRA names are the HF-style ones every reader expects (ComfyUI `model_lora_keys_clip`); the table
`_TE2_NAMES` maps them, and q/k/v become three row-slices of the fused weight.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from eridiffusion import ops
from eridiffusion.io import atomic_write
from eridiffusion.errors import LoRAError

PREFIXES = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_", "te": "lora_te_"}

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


# ---------------------------------------------------------------------------------------------
# Adapter modules
# ---------------------------------------------------------------------------------------------


class _LoRABase(nn.Module):
    """lora_down / lora_up / alpha / multiplier / dropout shared by the adapters.

    LoRA params stay fp32 (the master copy for the optimizer); in forward they are cast to the
    activation dtype (a rank×in copy, far cheaper than casting activations).
    """

    def _init_lora(self, down: nn.Module, up: nn.Module, rank: int, alpha: float, dropout: float):
        self.rank = rank
        self.alpha = float(alpha)
        self.multiplier = 1.0  # user strength, applied on top of alpha / rank
        self.lora_down = down
        self.lora_up = up
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def lora_parameters(self) -> list[nn.Parameter]:
        return [self.lora_down.weight, self.lora_up.weight]

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) · up @ down in fp32, shaped like the base weight (multiplier not applied)."""
        up, down = self.lora_up.weight.float(), self.lora_down.weight.float()
        delta = up.flatten(1) @ down.flatten(1)  # (out, in·kh·kw)
        return (delta * self.scale).reshape(up.shape[0], *down.shape[1:])


class LoRALinear(_LoRABase):
    """A frozen `nn.Linear` plus a LoRA branch; the base keeps its names (`weight`, `bias`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self._init_lora(
            nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=torch.float32),
            nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=torch.float32),
            rank, alpha, dropout,
        )
        self.merged = False

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self.lora_down.weight.to(x.dtype))  # (..., rank)
        return F.linear(h, self.lora_up.weight.to(x.dtype)) * (self.scale * self.multiplier)

    def linear_parts(self, dtype: torch.dtype):
        """(weight, bias, down, scaled up) in `dtype` for `ops.project`; None with dropout or a
        trainable base (then `forward` takes the plain path)."""
        frozen = not (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if not frozen or not isinstance(self.dropout, nn.Identity):
            return None
        if self.merged:
            return self.weight, self.bias, None, None
        up = self.lora_up.weight * (self.scale * self.multiplier)
        return self.weight, self.bias, self.lora_down.weight.to(dtype), up.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.linear_parts(x.dtype) if x.dtype == self.weight.dtype else None
        if parts is not None and parts[2] is not None:  # the update added in the GEMM epilogue
            return ops.lora_linear(x, *parts)
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + self._delta(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (in its dtype; bf16 rounding makes unmerge inexact)."""
        if not self.merged:
            self.weight.add_((self.delta_weight() * self.multiplier).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_((self.delta_weight() * self.multiplier).to(self.weight.dtype))
            self.merged = False


class LoRAConv2d(_LoRABase):
    """LoCon: a frozen `nn.Conv2d` plus down (rank, in, kh, kw) with the base stride/padding and
    up (out, rank, 1, 1). 1×1 convs (SD1.5 proj_in/out, skip_connection) are plain LoRA."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if base.groups != 1 or base.padding_mode != "zeros":
            raise LoRAError(f"LoRAConv2d: groups={base.groups}, padding_mode={base.padding_mode!r} unsupported; exclude it from targets")
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride = base.kernel_size, base.stride
        self.padding, self.dilation = base.padding, base.dilation
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self._init_lora(
            nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                      bias=False, device=w.device, dtype=torch.float32),
            nn.Conv2d(rank, base.out_channels, 1, bias=False, device=w.device, dtype=torch.float32),
            rank, alpha, dropout,
        )
        self.merged = False

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(self.dropout(x), self.lora_down.weight.to(x.dtype), None,
                     self.stride, self.padding, self.dilation)  # (B, rank, H', W')
        return F.conv2d(h, self.lora_up.weight.to(x.dtype)) * (self.scale * self.multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if self.merged:
            return out
        return out + self._delta(x).to(out.dtype)

    merge = LoRALinear.merge
    unmerge = LoRALinear.unmerge


class LoRADelta(_LoRABase):
    """A LoRA branch without a base layer: forward returns only the update (…, out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float = 0.0, device: torch.device | None = None):
        super().__init__()
        self._init_lora(
            nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32),
            nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32),
            rank, alpha, dropout,
        )

    _delta = LoRALinear._delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._delta(x)


class LoRAQKV(nn.Module):
    """te2 q/k/v LoRA for open_clip's fused attention: three deltas on the row-slices
    [0:D], [D:2D], [2D:3D] of `in_proj_weight` (3D, D), concatenated to (B, T, 3D).

    Installed as `attn.qkv_adapter`; the attention adds its output to F.linear(x, in_proj_weight).
    """

    def __init__(self, attn: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        d = attn.in_proj_weight.shape[1]
        dev = attn.in_proj_weight.device
        self.q = LoRADelta(d, d, rank, alpha, dropout, dev)
        self.k = LoRADelta(d, d, rank, alpha, dropout, dev)
        self.v = LoRADelta(d, d, rank, alpha, dropout, dev)
        self.__dict__["_attn"] = attn  # a plain reference: registering it would make a module cycle
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1).to(x.dtype)  # (B, T, 3·D)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        w = self._attn.in_proj_weight
        d = w.shape[1]
        for i, branch in enumerate((self.q, self.k, self.v)):
            w[i * d:(i + 1) * d].add_((branch.delta_weight() * (sign * branch.multiplier)).to(w.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._fold(1.0)
            self._attn.qkv_adapter = None
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._fold(-1.0)
            self._attn.qkv_adapter = self
            self.merged = False


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def unet_lora_name(path: str, cfg, diffusers_names: bool) -> str:
    """kohya name (without prefix) of a UNet module at ldm `path`.

    SDXL: the ldm path itself (kohya trains SDXL on the ldm UNet; ComfyUI maps it 1:1 from the
    checkpoint keys, diffusers through `_maybe_map_sgm_blocks_to_diffusers`, A1111 through its
    "lora_unet" -> "diffusion_model" fallback). SD1.5: diffusers block names
    (`down_blocks_0_attentions_0_…`), because kohya trains SD1.x on the diffusers UNet, so every
    SD1.5 LoRA in the wild, kohya's own tools and A1111's `convert_diffusers_name_to_compvis`
    expect them; ComfyUI maps them through `unet_to_diffusers`.
    """
    if not diffusers_names:
        return path.replace(".", "_")
    parts = path.split(".")
    for ldm, name in _TOP_LEVEL_NAMES.items():
        if path == ldm:
            return name.replace(".", "_")
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


def _te2_name(path: str) -> str | None:
    """HF-style name of a bigG module (no prefix); for the fused attention, the q name's stem."""
    m = _TE2_PATH.fullmatch(path)
    if m is None:
        return None
    layer, sub = m.groups()
    stem = f"text_model_encoder_layers_{layer}_"
    return stem + ("self_attn" if sub == "attn" else _TE2_NAMES[sub])


def _is_fused_attn(module: nn.Module) -> bool:
    return isinstance(getattr(module, "in_proj_weight", None), torch.Tensor) and hasattr(module, "qkv_adapter")


def _names_for(kind: str, path: str, module: nn.Module, model: nn.Module, diffusers_names: bool) -> list[str]:
    """kohya names of one module: three (q, k, v) for a fused attention, else one; [] if none."""
    prefix = PREFIXES[kind]
    if kind == "te2":
        stem = _te2_name(path)
        if stem is None:
            return []
        if _is_fused_attn(module):
            return [f"{prefix}{stem}_{c}_proj" for c in "qkv"]
        return [prefix + stem]
    if _is_fused_attn(module):
        return []
    if kind == "unet":
        return [prefix + unet_lora_name(path, model.cfg, diffusers_names)]
    return [prefix + path.replace(".", "_")]


def _uses_diffusers_names(kind: str, model: nn.Module) -> bool:
    """SD1.5 UNets (no `label_emb`, cfg.adm_in_channels None) are named the diffusers way."""
    return kind == "unet" and getattr(model.cfg, "adm_in_channels", None) is None


def _candidates(model: nn.Module, kind: str) -> Iterable[tuple[str, nn.Module]]:
    """Linear / Conv2d layers (and te2's fused attentions), none inside an adapter."""
    for path, m in model.named_modules():
        if isinstance(m, (_LoRABase, LoRAQKV)) or {"lora_down", "lora_up", "qkv_adapter"} & set(path.split(".")):
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)) or (kind == "te2" and _is_fused_attn(m)):
            yield path, m


def _set_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)
    return parent


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


class LoRANetwork(nn.Module):
    """The adapters injected into one model, by kohya name (`self.loras[name]`).

    `loras` holds each adapter with its base weights too (they share the model's Parameters), so
    train with `lora_parameters()`, not `parameters()`. `remove()` puts the original layers back.
    """

    def __init__(self, kind: str, rank: int, alpha: float, conv_rank: int | None = None, conv_alpha: float | None = None):
        super().__init__()
        self.kind, self.prefix = kind, PREFIXES[kind]
        self.rank, self.alpha, self.conv_rank, self.conv_alpha = rank, alpha, conv_rank, conv_alpha
        self.loras = nn.ModuleDict()
        self._units: list[tuple[nn.Module, str, nn.Module | None, nn.Module]] = []  # parent, attr, original, adapter

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.loras.values() for p in m.lora_parameters()]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """kohya keys -> tensors (fp32, on the model's device): lora_down, lora_up, alpha."""
        out = {}
        for name, m in self.loras.items():
            out[f"{name}.lora_down.weight"] = m.lora_down.weight.detach()
            out[f"{name}.lora_up.weight"] = m.lora_up.weight.detach()
            out[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
        return out

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.loras.values():
            m.multiplier = float(multiplier)

    def merge(self) -> None:
        for *_, unit in self._units:
            unit.merge()

    def unmerge(self) -> None:
        for *_, unit in self._units:
            unit.unmerge()

    def remove(self) -> None:
        """Restore the original layers (a merged update stays folded into their weights)."""
        for parent, attr, original, _ in self._units:
            setattr(parent, attr, original)
        self._units.clear()
        self.loras = nn.ModuleDict()

    def _add(self, model: nn.Module, path: str, module: nn.Module, names: list[str],
             rank: int, alpha: float, dropout: float) -> None:
        if _is_fused_attn(module):
            if module.qkv_adapter is not None:
                raise LoRAError(f"{path}: already has a q/k/v LoRA; remove() it or pass all files to one apply_lora call")
            unit = LoRAQKV(module, rank, alpha, dropout)
            module.qkv_adapter = unit
            self._units.append((module, "qkv_adapter", None, unit))
            for name, branch in zip(names, (unit.q, unit.k, unit.v)):
                self.loras[name] = branch
            return
        if isinstance(module, nn.Conv2d):
            unit = LoRAConv2d(module, rank, alpha, dropout)
        else:
            unit = LoRALinear(module, rank, alpha, dropout)
        parent = _set_module(model, path, unit)
        self._units.append((parent, path.rpartition(".")[2], module, unit))
        self.loras[names[0]] = unit

    @torch.no_grad()
    def load_state_from_file(self, path: str | os.PathLike) -> None:
        """Resume: copy this network's tensors from a saved file (names, ranks and alphas must match)."""
        weights, _ = load_lora(path)
        mine = {k: v for k, v in weights.items() if k.startswith(self.prefix)}
        missing = sorted(set(self.loras) - set(mine))
        extra = sorted(set(mine) - set(self.loras))
        if missing or extra:
            raise LoRAError(
                f"{path}: {self.kind} LoRA names differ from this network: missing {missing[:3]}, unexpected {extra[:3]}; "
                "resume with the same targets/ranks as the run that wrote it"
            )
        for name, w in mine.items():
            m = self.loras[name]
            if w.down.shape != m.lora_down.weight.shape or w.up.shape != m.lora_up.weight.shape or w.alpha != m.alpha:
                raise LoRAError(
                    f"{path}: {name} has down {tuple(w.down.shape)}, up {tuple(w.up.shape)}, alpha {w.alpha}; the network has "
                    f"{tuple(m.lora_down.weight.shape)}, {tuple(m.lora_up.weight.shape)}, {m.alpha}: use the same rank/alpha"
                )
            m.lora_down.weight.copy_(w.down)
            m.lora_up.weight.copy_(w.up)


def inject(
    model: nn.Module,
    kind: str,
    rank: int,
    alpha: float,
    targets: Sequence[str] | None = None,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
) -> LoRANetwork:
    """Freeze `model` and wrap its target layers with LoRA; returns the network (by kohya name).

    kind: "unet", "te1" (SDXL CLIP-L), "te2" (SDXL bigG, open_clip layout), "te" (SD1.5 CLIP-L).
    targets: fnmatch patterns over module paths (`*` crosses dots); default `UNET_TARGETS`
    (plus `UNET_CONV_TARGETS` when conv_rank is given), `TE_TARGETS`, or `TE2_TARGETS` (the
    fused `attn` gives q/k/v). Linear and 1×1 conv layers get (rank, alpha); k×k convs get
    (conv_rank, conv_alpha), conv_alpha defaulting to conv_rank (scale 1).
    A1111/Forge apply a te2 attention LoRA only if q, k, v and out_proj are all present.
    """
    if kind not in PREFIXES:
        raise LoRAError(f"inject: kind {kind!r} unknown; use one of {sorted(PREFIXES)}")
    if targets is None:
        targets = {"unet": UNET_TARGETS, "te2": TE2_TARGETS}.get(kind, TE_TARGETS)
        if kind == "unet" and conv_rank is not None:
            targets = targets + UNET_CONV_TARGETS
    if conv_rank is not None and conv_alpha is None:
        conv_alpha = conv_rank
    model.requires_grad_(False)
    diffusers_names = _uses_diffusers_names(kind, model)
    net = LoRANetwork(kind, rank, alpha, conv_rank, conv_alpha)
    chosen = [(p, m) for p, m in _candidates(model, kind) if any(fnmatch.fnmatchcase(p, t) for t in targets)]
    if not chosen:
        raise LoRAError(f"inject: no {kind} module matches targets {list(targets)}; check the patterns against model.named_modules()")
    for path, module in chosen:
        names = _names_for(kind, path, module, model, diffusers_names)
        if not names:
            raise LoRAError(f"inject: {kind} module {path!r} has no kohya name; remove it from targets")
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            if conv_rank is None:
                raise LoRAError(f"inject: target {path!r} is a {module.kernel_size} conv; pass conv_rank (LoCon) or drop it from targets")
            r, a = conv_rank, conv_alpha
        else:
            r, a = rank, alpha
        net._add(model, path, module, names, r, a, dropout)
    return net


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAWeights:
    """One module's tensors from a file; alpha = rank when the file has none (scale 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def lora_metadata(
    family: str,
    rank: int,
    alpha: float,
    steps: int = 0,
    epoch: int = 0,
    resolution: int | tuple[int, int] = 1024,
    num_images: int = 0,
    title: str = "LoRA",
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    prediction_type: str = "epsilon",
    **extra: object,
) -> dict[str, str]:
    """kohya `ss_*` fields and the SAI model spec (kohya `library/sai_model_spec.py`), all strings.

    family: "sdxl" / "sd15" (or the "-tiny" variants). `extra` adds more keys (e.g.
    `ss_training_comment`, `modelspec.trigger_phrase` as modelspec_trigger_phrase=...).
    """
    sdxl = family.startswith("sdxl")
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_v2": "False",
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_resolution": f"({w}, {h})",
        "ss_num_train_images": str(num_images),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora",
        # kohya: SDXL LoRAs are sgm-named, SD1.x LoRAs diffusers-named; ours follow the same split
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": prediction_type,
    }
    if conv_rank is not None:
        conv_alpha = conv_rank if conv_alpha is None else conv_alpha
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_alpha))})
    for k, v in extra.items():
        meta[k.replace("modelspec_", "modelspec.", 1) if k.startswith("modelspec_") else k] = str(v)
    return meta


def save_lora(
    path: str | os.PathLike,
    networks: LoRANetwork | Iterable[LoRANetwork],
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write a kohya LoRA file atomically (`io.atomic_write`: a crash keeps the previous file).

    down/up in `dtype`; alpha always written (fp32 scalar: a missing alpha reads as scale 1).
    """
    networks = [networks] if isinstance(networks, LoRANetwork) else list(networks)
    tensors: dict[str, torch.Tensor] = {}
    for net in networks:
        for k, v in net.lora_state_dict().items():
            if k in tensors:
                raise LoRAError(f"save_lora: {k} comes from two networks; pass each model's network once")
            tensors[k] = v.to("cpu", torch.float32 if k.endswith(".alpha") else dtype).contiguous()
    if not tensors:
        raise LoRAError(f"save_lora: nothing to write to {path}; the networks are empty")
    header = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def load_lora(path: str | os.PathLike) -> tuple[dict[str, LoRAWeights], dict[str, str]]:
    """Read a kohya LoRA safetensors file -> ({kohya name: LoRAWeights (fp32)}, metadata)."""
    path = str(path)
    if not path.endswith(".safetensors"):
        raise LoRAError(f"{path}: not a .safetensors file; LoRA files are read from safetensors only")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
            if suffix is None:
                raise LoRAError(f"{path}: key {key!r} is not kohya LoRA (lora_down/lora_up/alpha); LoHa/LoKr/DoRA files are not supported")
            parts.setdefault(key[: -len(suffix)], {})[suffix] = f.get_tensor(key).float()
    out = {}
    for name, p in parts.items():
        if ".lora_down.weight" not in p or ".lora_up.weight" not in p:
            raise LoRAError(f"{path}: {name} lacks lora_down or lora_up; the file is incomplete")
        down, up = p[".lora_down.weight"], p[".lora_up.weight"]
        alpha = float(p[".alpha"].item()) if ".alpha" in p else float(down.shape[0])
        if up.shape[1] != down.shape[0]:
            raise LoRAError(f"{path}: {name} has lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)}; ranks differ")
        out[name] = LoRAWeights(down, up, alpha)
    return out, metadata


def _name_map(model: nn.Module, kind: str) -> dict[str, tuple[str, nn.Module, int | None]]:
    """Every kohya name the model answers to -> (path, module, q/k/v index or None).

    UNets answer to both the ldm and the diffusers-derived names, like ComfyUI does.
    """
    out = {}
    styles = (False, True) if kind == "unet" else (False,)
    for path, m in _candidates(model, kind):
        for diffusers_names in styles:
            try:
                names = _names_for(kind, path, m, model, diffusers_names)
            except LoRAError:
                continue
            for i, name in enumerate(names):
                out[name] = (path, m, i if len(names) == 3 else None)
    return out


def _models_of(components) -> dict[str, nn.Module]:
    """Prefix kind -> model, from a Components object (unet/te1/te2) or a mapping by kind."""
    get = components.get if isinstance(components, Mapping) else (lambda k: getattr(components, k, None))
    te1 = get("te1") if get("te1") is not None else get("te")
    models = {"unet": get("unet"), "te1": te1, "te2": get("te2")}
    models["te"] = models["te1"]
    return {k: v for k, v in models.items() if v is not None}


def apply_lora(
    components,
    path: str | os.PathLike | Sequence[str | os.PathLike],
    scale: float | Sequence[float] = 1.0,
    merge: bool = False,
) -> dict[str, LoRANetwork]:
    """Apply one or more LoRA files for inference, each with its strength.

    components: an object with `unet`, `te1`, `te2` (checkpoint.Components) or a dict by kind.
    merge=True folds W += strength · (alpha/rank) · up @ down into the weights (returns {});
    otherwise the layers are wrapped (several files on one layer are concatenated along the rank,
    which is exact) and the networks are returned by kind, for `set_multiplier` / `remove`.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    scales = [float(scale)] * len(paths) if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if len(scales) != len(paths):
        raise LoRAError(f"apply_lora: {len(paths)} files but {len(scales)} scales; give one scale per file")
    models = _models_of(components)
    maps: dict[str, dict] = {}
    # kind -> kohya name -> list of (weights, strength), in file order
    pending: dict[str, dict[str, list[tuple[LoRAWeights, float]]]] = {}
    for p, s in zip(paths, scales):
        weights, _ = load_lora(p)
        unmatched, misfit = [], []
        for name, w in weights.items():
            kind = next((k for k, pre in PREFIXES.items() if name.startswith(pre)), None)
            if kind is None or kind not in models:
                unmatched.append(name)
                continue
            if kind not in maps:
                maps[kind] = _name_map(models[kind], kind)
            if name not in maps[kind]:
                unmatched.append(name)
            elif (problem := _shape_problem(name, w, maps[kind][name])) is not None:
                misfit.append(problem)
            else:
                pending.setdefault(kind, {}).setdefault(name, []).append((w, s))
        if unmatched or misfit:
            what = (f"{len(unmatched)} of {len(weights)} LoRA modules match no layer of the loaded model "
                    f"(e.g. {', '.join(sorted(unmatched)[:3])})") if unmatched else f"{len(misfit)} LoRA modules misfit ({misfit[0]})"
            raise LoRAError(f"{p}: {what}; is it for another base model (SDXL vs SD1.5)?")
    if merge:
        with torch.no_grad():
            for kind, entries in pending.items():
                for name, items in entries.items():
                    _, module, idx = maps[kind][name]
                    w = module.in_proj_weight if idx is not None else module.weight
                    rows = w[idx * w.shape[1]:(idx + 1) * w.shape[1]] if idx is not None else w
                    for lw, s in items:
                        delta = (lw.up.flatten(1) @ lw.down.flatten(1)).reshape(rows.shape)
                        rows.add_((delta * (s * lw.alpha / lw.rank)).to(device=w.device, dtype=w.dtype))
        return {}
    networks = {}
    for kind, entries in pending.items():
        model = models[kind]
        net = networks[kind] = LoRANetwork(kind, rank=0, alpha=0.0)
        by_module: dict[str, list[str]] = {}
        for name in entries:
            by_module.setdefault(maps[kind][name][0], []).append(name)
        for mpath, names in by_module.items():
            _, module, idx = maps[kind][names[0]]
            if idx is None:  # one layer, perhaps named in both the ldm and the diffusers style
                slots = {names[0]: [item for n in names for item in entries[n]]}
            else:  # fused attention: q, k, v in order; a slice no file adapts stays zero
                slots = {n: entries.get(n, []) for n in _names_for(kind, mpath, module, model, False)}
            stacked = {n: _concat(items, module) for n, items in slots.items()}
            rank = max(d.shape[0] for d, _ in stacked.values())
            net._add(model, mpath, module, list(slots), rank, float(rank), 0.0)
            with torch.no_grad():
                for n, (down, up) in stacked.items():
                    m = net.loras[n]
                    m.lora_down.weight.zero_()
                    m.lora_up.weight.zero_()
                    r = down.shape[0]
                    m.lora_down.weight[:r].copy_(down.reshape(r, *m.lora_down.weight.shape[1:]))
                    m.lora_up.weight[:, :r].copy_(up.reshape(up.shape[0], r, *m.lora_up.weight.shape[2:]))
    return networks


def _concat(items: list[tuple[LoRAWeights, float]], module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack several LoRAs of one layer into one, exactly: down (Σr, in·k·k), up (out, Σr) with
    each file's strength · alpha / rank folded into its columns of up."""
    if not items:  # a q/k/v slice that no file adapts
        d = module.in_proj_weight.shape[1]
        return torch.zeros(1, d), torch.zeros(d, 1)
    down = torch.cat([w.down.flatten(1) for w, _ in items])
    up = torch.cat([w.up.flatten(1) * (s * w.alpha / w.rank) for w, s in items], dim=1)
    return down, up


def _shape_problem(name: str, w: LoRAWeights, target: tuple[str, nn.Module, int | None]) -> str | None:
    _, module, idx = target
    if idx is not None:
        d = module.in_proj_weight.shape[1]
        shape = (d, d)
    else:
        shape = tuple(module.weight.shape)
    got = (w.up.shape[0], *w.down.shape[1:])
    if math.prod(got) != math.prod(shape) or got[0] != shape[0]:
        return f"{name} gives a {got} update for a {shape} weight"
    return None
