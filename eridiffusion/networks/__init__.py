"""Adapters (LoRA / LoCon, LoHa, LoKr, DoRA on any of them) on a frozen model, and the kohya /
LyCORIS safetensors files that ComfyUI, A1111/Forge and diffusers read.

- `base`: the adapter protocol and the registries (file-key suffix → class, `lora.type` → class).
- `lora`: LoRA (`LoRALinear`), LoCon (`LoRAConv2d`), `LoRADelta`, and `LoRAQKV` for open_clip's
  fused q/k/v attention.
- `delta`: `WeightDelta`, adapters applied through their full ΔW; `loha`, `lokr`, `dora` build on it.
- `naming`: kohya prefixes, default targets, and each layer's kohya name.
- `network`: `LoRANetwork` (the adapters on one model, by kohya name) and `inject`.
- `files`: `lora_metadata`, `save_lora`, `load_lora`, `apply_lora`, `load_into` (`lora.init_from`).
- `tools`: `merge_into_checkpoint`, `resize` (`eri lora merge / resize`).
"""

from eridiffusion.errors import LoRAError
from eridiffusion.networks.base import ADAPTERS, TYPES, Adapter, AdapterStack, register_adapter
from eridiffusion.networks.dora import DoRA
from eridiffusion.networks.files import AdapterWeights, apply_lora, load_into, load_lora, lora_metadata, save_lora
from eridiffusion.networks.loha import LoHa
from eridiffusion.networks.lokr import LoKr
from eridiffusion.networks.lora import LoRA, LoRAConv2d, LoRADelta, LoRALinear, LoRAQKV, Rows
from eridiffusion.networks.naming import (
    PREFIXES,
    TE2_TARGETS,
    TE_TARGETS,
    UNET_CONV_TARGETS,
    UNET_TARGETS,
    unet_lora_name,
)
from eridiffusion.networks.network import LoRANetwork, inject
from eridiffusion.networks import tools  # noqa: E402  (merge / resize; after the registry is filled)

AdapterNetwork = LoRANetwork

__all__ = [
    "ADAPTERS", "TYPES", "Adapter", "AdapterNetwork", "AdapterStack", "AdapterWeights", "DoRA", "LoHa", "LoKr", "LoRA",
    "LoRAConv2d", "LoRADelta", "LoRAError", "LoRALinear", "LoRANetwork", "LoRAQKV", "PREFIXES", "Rows", "TE2_TARGETS",
    "TE_TARGETS", "UNET_CONV_TARGETS", "UNET_TARGETS", "apply_lora", "inject", "load_into", "load_lora",
    "lora_metadata", "register_adapter", "save_lora", "unet_lora_name",
]
