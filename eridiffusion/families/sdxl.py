"""SDXL base (Stability-AI generative-models `sgm` layout): CLIP-L + OpenCLIP bigG, UNet with
a pooled-text + size/crop vector `y`.

Conditioning (sgm `GeneralConditioner`, diffusers `StableDiffusionXLPipeline.encode_prompt`):
context = cat(CLIP-L penultimate, bigG penultimate) (B, 77, 768 + 1280), pooled = bigG pooled
(B, 1280); TE1 pads with EOS, TE2 with 0 (comfy/sdxl_clip.py). The unconditional branch for an
empty negative prompt is all zeros, as sgm (`force_uc_zero_embeddings=["txt"]`) and diffusers
(`force_zeros_for_empty_prompt`) do. `y` = [pooled ‖ emb(time_ids)], time_ids (B, 6) = [orig_h,
orig_w, crop_top, crop_left, target_h, target_w] (SDXL paper, section 2.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eridiffusion.families.base import Components, Cond
from eridiffusion.families.sd import CLASSES as SD_CLASSES
from eridiffusion.families.sd import StableDiffusion, check_max_tokens, encode_chunks
from eridiffusion.models.clip import CLIPTextConfig, OpenCLIPTextConfig, OpenCLIPTextModel
from eridiffusion.models.tokenizer import CLIPTokenizer
from eridiffusion.models.unet import UNetConfig, sdxl_vector
from eridiffusion.models.vae import VAEConfig
from eridiffusion.networks.naming import TE2_TARGETS

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "te1": "conditioner.embedders.0.transformer.",  # then text_model.… (HF CLIPTextModel)
    "te2": "conditioner.embedders.1.model.",  # open_clip layout
}
CLASSES: dict[str, type[nn.Module]] = {**SD_CLASSES, "te2": OpenCLIPTextModel}


class DualClipText:
    """Prompts → {"context": (B, 77·k, D1 + D2), "pooled": (B, P)} from CLIP-L and bigG, k = max_tokens / 75.

    Long prompts: both encoders encode the same k chunks (`sd.ClipText`), their hidden states
    concatenated along the sequence; pooled is bigG's of the first chunk (ComfyUI
    `first_pooled = pooled[0:1]`, kohya `get_hidden_states_sdxl`: `pool2[::n_size]`).
    """

    def __init__(self, te1: nn.Module, te2: nn.Module, max_tokens: int = 75):
        self.te1, self.te2 = te1, te2
        self.tok1, self.tok2 = CLIPTokenizer(), CLIPTokenizer(pad_token_id=0)
        self.chunks = check_max_tokens(max_tokens)

    def __call__(self, prompts: list[str]) -> Cond:
        b, k = len(prompts), self.chunks
        out1 = encode_chunks(self.te1, self.tok1.chunked(prompts, k))
        out2 = encode_chunks(self.te2, self.tok2.chunked(prompts, k))
        context = torch.cat([out1.hidden, out2.hidden.to(out1.hidden.dtype)], dim=-1)  # (B·k, 77, D1 + D2)
        pooled = out2.pooled.reshape(b, k, -1)[:, 0]  # (B, P), the first chunk's
        return {"context": context.reshape(b, -1, context.shape[-1]), "pooled": pooled}  # (B, 77·k, D1 + D2)


@dataclass(frozen=True)
class StableDiffusionXL(StableDiffusion):
    cond_keys = ("context", "pooled")
    empty_negative = "zeros"

    @classmethod
    def sdxl(cls) -> StableDiffusionXL:
        return cls._make("sdxl", UNetConfig.sdxl(), VAEConfig.sdxl(), CLIPTextConfig.clip_l(), OpenCLIPTextConfig.bigg())

    @classmethod
    def sdxl_tiny(cls) -> StableDiffusionXL:
        return cls._make("sdxl-tiny", UNetConfig.tiny(), VAEConfig.tiny(), CLIPTextConfig.tiny(), OpenCLIPTextConfig.tiny())

    @classmethod
    def sdxl_micro(cls) -> StableDiffusionXL:
        """The shipped shapes model (eridiffusion/tiny/weights): tiny's VAE, smaller UNet and text encoders."""
        return cls._make("sdxl-micro", UNetConfig.micro(), VAEConfig.tiny(), CLIPTextConfig.micro(), OpenCLIPTextConfig.micro())

    @classmethod
    def _make(cls, name: str, unet, vae, te1, te2=None) -> StableDiffusionXL:
        return cls(
            name, "SDXL", {"unet": unet, "vae": vae, "te1": te1, "te2": te2}, CLASSES, PREFIXES,
            base_model_version="sdxl_base_v1-0", architecture="stable-diffusion-xl-v1-base",
            implementation="https://github.com/Stability-AI/generative-models",
            lora_parts={"unet": "unet", "te1": "te1", "te2": "te2"}, unet_lora_naming="ldm",
            text_parts=("te1", "te2"), default_size=(1024, 1024),
        )  # fmt: skip

    def text_encoder(self, components: Components, max_tokens: int = 75) -> DualClipText:
        return DualClipText(components.te1, components.te2, max_tokens)

    def denoiser_inputs(self, cond: Cond, time_ids: Tensor | None) -> dict[str, Tensor]:
        # time_ids stay fp32 (a bf16 pooled must not round orig sizes like 1237 to 1240)
        y = sdxl_vector(cond["pooled"], time_ids, self.configs["unet"].addition_time_embed_dim)
        return {"context": cond["context"], "y": y}

    def time_ids(self, size: tuple[int, int], batch: int, device) -> Tensor:
        """Sampling micro-conditioning: original = target = size, crop (0, 0)."""
        w, h = size
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=device).expand(batch, 6)

    def lora_targets(self, kind: str, conv: bool = False) -> tuple[str, ...]:
        return TE2_TARGETS if kind == "te2" else super().lora_targets(kind, conv)
