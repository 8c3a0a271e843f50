"""What a model family is and what it does: the one place where families differ.

The trainer (`train/`), the sampling pipeline and the adapters call a `Family` object; none of
them asks which family it is. A family is a frozen dataclass (its data: part configs, key
prefixes, file metadata) with methods (its behaviour). `sd.StableDiffusion` is SD1.x;
`sdxl.StableDiffusionXL` overrides only text conditioning and the UNet's extra inputs.

A new family (say a DiT with a T5 encoder and flow matching) is a module here plus its models
under `models/`, registered in `families.FAMILIES`. It implements:

- data: `name`, `title`, `configs` (part -> model config), `model_classes` (part -> nn.Module
  class), `prefixes` (part -> key prefix in the single file), `base_model_version`,
  `architecture`, `implementation` (kohya / SAI model-spec metadata), `prediction` (default
  target), `lora_parts` (kohya prefix kind -> part) and `unet_lora_naming`;
- `matches(loader)`: True when a checkpoint's keys and shapes are this family's (detection);
- `text_encoder(components, max_tokens=75)`: prompts -> conditioning dict (`cond_keys` names
  its tensors; `max_tokens` > 75 encodes 75-token chunks and concatenates them);
  `empty_negative`: whether an empty negative prompt is all zeros (SDXL) or encoded (SD1.x);
- `denoiser_inputs(cond, time_ids)`: the keyword arguments of the denoiser besides x and t
  (SDXL builds `y` from the pooled output and the size/crop `time_ids`);
- the noise objective: `schedule(device, zero_terminal_snr)`, `add_noise`, `target`,
  `sample_timesteps(n, generator, device, low, high)`, `loss_weight` (DDPM here; flow matching
  overrides these five);
- `lora_targets(kind, conv)`: default adapter target patterns; `compile_regions(denoiser, ...)`;
  `bucket_multiple`: image sides must be multiples of it; `default_size` for sampling.

The denoiser is the `unet` part whatever its architecture; text encoders are the parts in
`text_parts`, the autoencoder is `vae`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from eridiffusion import diffusion

Cond = dict[str, Tensor]
TextEncoder = Callable[[list[str]], Cond]


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    configs: dict[str, object] = field(hash=False)  # part -> model config (a part absent here is absent)
    model_classes: dict[str, type[nn.Module]] = field(hash=False)
    prefixes: dict[str, str] = field(hash=False)
    base_model_version: str = ""  # kohya `ss_base_model_version`
    architecture: str = ""  # SAI model spec `modelspec.architecture` (LoRA files add "/lora")
    implementation: str = ""  # `modelspec.implementation`
    prediction: str = "epsilon"
    lora_parts: dict[str, str] = field(default_factory=dict, hash=False)  # kohya kind -> part
    unet_lora_naming: str = "ldm"  # kohya names of the denoiser's modules: "ldm" or "diffusers"
    text_parts: tuple[str, ...] = ("te1",)
    default_size: tuple[int, int] = (1024, 1024)  # sampling (width, height)

    # -- parts ---------------------------------------------------------------------------
    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.configs)

    def __getattr__(self, part: str):  # fam.unet, fam.vae, fam.te2 (None when the family has none)
        if part.startswith("_"):
            raise AttributeError(part)
        configs = object.__getattribute__(self, "configs")
        if part in ("unet", "vae", "te1", "te2") or part in configs:
            return configs.get(part)
        raise AttributeError(f"{type(self).__name__} has no attribute {part!r}")

    def build(self, part: str, device: torch.device | str | None = None) -> nn.Module:
        """A fresh `part` model; on `device="meta"` nothing is allocated or initialised."""
        with torch.device(device or "cpu"):
            return self.model_classes[part](self.configs[part])

    def replace(self, **changes) -> Family:
        return dataclasses.replace(self, **changes)

    def matches(self, loader) -> bool:
        raise NotImplementedError

    @property
    def bucket_multiple(self) -> int:
        raise NotImplementedError

    # -- conditioning --------------------------------------------------------------------
    cond_keys: ClassVar[tuple[str, ...]] = ("context",)  # the tensors `text_encoder` returns
    empty_negative: ClassVar[str] = "encode"  # "encode": encode ""; "zeros": all-zero conditioning

    def text_encoder(self, components, max_tokens: int = 75) -> TextEncoder:
        raise NotImplementedError

    def denoiser_inputs(self, cond: Cond, time_ids: Tensor | None) -> dict[str, Tensor]:
        return {"context": cond["context"]}

    # -- the noise objective (DDPM, scaled-linear betas) ---------------------------------
    def schedule(self, device: torch.device | str | None = None, zero_terminal_snr: bool = False) -> Tensor:
        """alphas_cumprod (1000,) of the training noise schedule; `zero_terminal_snr` rescales
        the betas so the last entry is 0 (`train.zero_terminal_snr`, v-prediction only)."""
        betas = diffusion.scaled_linear_betas()
        if zero_terminal_snr:
            betas = diffusion.rescale_zero_terminal_snr(betas)
        return diffusion.alphas_cumprod(betas).to(device)

    def sample_timesteps(self, n: int, generator: torch.Generator | None, device, low: int = 0,
                         high: int = 1000) -> Tensor:  # fmt: skip
        """n training timesteps in [low, high) (`train.min_timestep` / `max_timestep`)."""
        return diffusion.sample_timesteps(n, generator=generator, device=device, low=low, high=high)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor, schedule: Tensor) -> Tensor:
        return diffusion.add_noise(x0, noise, t, schedule)

    def target(self, prediction: str, x0: Tensor, noise: Tensor, t: Tensor, schedule: Tensor) -> Tensor:
        return diffusion.target(prediction, x0, noise, t, schedule)

    def loss_weight(self, t: Tensor, schedule: Tensor, prediction: str, min_snr_gamma: float,
                    debiased: bool = False) -> Tensor | None:  # fmt: skip
        """Per-sample weight (B,) of the loss, or None: min-SNR-gamma, times the debiased-
        estimation weight when `debiased` (both as kohya applies them, in that order)."""
        weight = diffusion.min_snr_weight(t, schedule, min_snr_gamma, prediction) if min_snr_gamma > 0 else None
        if debiased:
            d = diffusion.debiased_weight(t, schedule, prediction)
            weight = d if weight is None else weight * d
        return weight

    # -- adapters and speed --------------------------------------------------------------
    def lora_targets(self, kind: str, conv: bool = False) -> tuple[str, ...]:
        raise NotImplementedError

    def compile_regions(self, denoiser: nn.Module, **kwargs) -> int:
        from eridiffusion import speed

        return speed.compile_regions(denoiser, **kwargs)


@dataclass
class Components:
    """The loaded parts of one checkpoint, by part name; a part not loaded (or not in the
    family, like SD1.5's te2) reads as None."""

    family: Family
    unet: nn.Module | None = None
    vae: nn.Module | None = None
    te1: nn.Module | None = None
    te2: nn.Module | None = None

    def items(self) -> list[tuple[str, nn.Module]]:
        return [(p, getattr(self, p, None)) for p in self.family.parts if getattr(self, p, None) is not None]

    def text_modules(self) -> list[nn.Module]:
        return [m for p in self.family.text_parts if (m := getattr(self, p, None)) is not None]

    def drop_text_encoders(self) -> None:
        for p in self.family.text_parts:
            setattr(self, p, None)
