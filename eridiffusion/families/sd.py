"""Stable Diffusion 1.x (CompVis ldm layout): one CLIP-L text encoder, UNet with cross-attention.

Conditioning (CompVis `FrozenCLIPEmbedder`, diffusers `StableDiffusionPipeline`): context =
CLIP-L's last layer after the final norm (B, 77, 768); an empty negative prompt is encoded.
kohya trains SD1.x on the diffusers UNet, so its LoRA names are diffusers block names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from eridiffusion.families.base import Components, Cond, Family
# default adapter targets (fnmatch over module paths; kohya's sets): networks/naming.py
from eridiffusion.networks.naming import TE_TARGETS, UNET_CONV_TARGETS, UNET_TARGETS
from eridiffusion.models.clip import CLIPTextConfig, CLIPTextModel
from eridiffusion.models.tokenizer import CLIPTokenizer
from eridiffusion.models.unet import UNet, UNetConfig
from eridiffusion.models.vae import AutoencoderKL, VAEConfig

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "te1": "cond_stage_model.transformer.",
}
CLASSES: dict[str, type[nn.Module]] = {"unet": UNet, "vae": AutoencoderKL, "te1": CLIPTextModel}

_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_UNET_ADM = "model.diffusion_model.label_emb.0.0.weight"



def unet_signature(loader) -> tuple:
    """(model_channels, in_channels, context dim, adm channels) of the ldm UNet in a file."""
    keys = loader.keys()
    channels, in_channels = loader.shape(_UNET_IN)[:2]
    to_k = next((k for k in keys if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")), None)
    context = loader.shape(to_k)[1] if to_k else None
    adm = loader.shape(_UNET_ADM)[1] if _UNET_ADM in loader else None
    return channels, in_channels, context, adm


def check_max_tokens(max_tokens: int) -> int:
    """The number of 75-token chunks for `max_tokens` (75, 150 or 225)."""
    if max_tokens not in (75, 150, 225):
        raise ValueError(f"max_tokens={max_tokens} is invalid: use 75, 150 or 225")
    return max_tokens // 75


def encode_chunks(model: nn.Module, ids: torch.Tensor):
    """ids (B, k, 77) → the model's TextOutput on the B·k chunks, each encoded on its own."""
    device = next(model.parameters()).device
    return model(ids.reshape(-1, ids.shape[-1]).to(device))  # (B·k, 77, D)


class ClipText:
    """Prompts → {"context": CLIP-L last layer after the final norm (B, 77·k, D)}, k = max_tokens / 75.

    Long prompts (max_tokens 150 / 225): the ids are cut into k chunks of 75, each encoded as
    its own BOS, chunk, EOS, pad sequence, and the k hidden states concatenated along the
    sequence, as ComfyUI (comfy/sd1_clip.py `ClipTokenWeightEncoder.encode_token_weights`,
    commit 00728eb20fce05955f89ef1ccf5f6167416e94cf) and A1111 do; every prompt gets k chunks
    (kohya's fixed `max_token_length`), so the shape is the same for any prompt.
    """

    def __init__(self, te1: nn.Module, max_tokens: int = 75):
        self.te1, self.tok1 = te1, CLIPTokenizer()
        self.chunks = check_max_tokens(max_tokens)

    def __call__(self, prompts: list[str]) -> Cond:
        last = encode_chunks(self.te1, self.tok1.chunked(prompts, self.chunks)).last
        return {"context": last.reshape(len(prompts), -1, last.shape[-1])}  # (B, 77·k, D)


@dataclass(frozen=True)
class StableDiffusion(Family):
    @classmethod
    def sd15(cls) -> StableDiffusion:
        return cls._make("sd15", UNetConfig.sd15(), VAEConfig.sd15(), CLIPTextConfig.clip_l())

    @classmethod
    def sd15_tiny(cls) -> StableDiffusion:
        vae = dataclasses.replace(VAEConfig.tiny(), scaling_factor=VAEConfig.sd15().scaling_factor)
        return cls._make("sd15-tiny", UNetConfig.tiny_sd15(), vae, CLIPTextConfig.tiny())

    @classmethod
    def _make(cls, name: str, unet, vae, te1) -> StableDiffusion:
        return cls(
            name, "SD1.5", {"unet": unet, "vae": vae, "te1": te1}, CLASSES, PREFIXES,
            base_model_version="sd_v1", architecture="stable-diffusion-v1", implementation="diffusers",
            lora_parts={"unet": "unet", "te": "te1"}, unet_lora_naming="diffusers", default_size=(512, 512),
        )  # fmt: skip

    def matches(self, loader) -> bool:
        if _UNET_IN not in loader:
            return False
        u = self.configs["unet"]
        return unet_signature(loader) == (u.model_channels, u.in_channels, u.context_dim, u.adm_in_channels)

    @property
    def bucket_multiple(self) -> int:
        """VAE factor · 2^(UNet levels − 1): 64 for SD1.5, 32 for SDXL and the tiny variants."""
        return self.configs["vae"].factor * 2 ** (len(self.configs["unet"].channel_mult) - 1)

    def text_encoder(self, components: Components, max_tokens: int = 75) -> ClipText:
        return ClipText(components.te1, max_tokens)

    def lora_targets(self, kind: str, conv: bool = False) -> tuple[str, ...]:
        if kind == "unet":
            return UNET_TARGETS + (UNET_CONV_TARGETS if conv else ())
        return TE_TARGETS

    def time_ids(self, size: tuple[int, int], batch: int, device) -> torch.Tensor | None:
        """Sampling micro-conditioning for `size` (width, height); SD1.x has none."""
        return None
