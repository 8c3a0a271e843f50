"""Single-file SDXL / SD1.5 checkpoints: detect the family, load strictly, save.

Key layout (Stability-AI generative-models `sgm` for SDXL, CompVis `ldm` for SD1.5; see
docs formats.md): every part's keys are the original module paths behind one prefix, so each
part is ``load_state_dict(strict=True)`` after stripping it. Parts are built on the meta
device and each tensor is read from the memory-mapped file straight into its target
dtype/device and assigned (``assign=True``): no random init, no full fp32 copy in RAM.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from eridiffusion.families import FAMILIES, Components, Family
from eridiffusion.families.sd import unet_signature
from eridiffusion.errors import ConfigError
from eridiffusion.io import atomic_write
from eridiffusion.weights import ShapeMismatch, WeightError, WeightLoader

PARTS = ("unet", "vae", "te1", "te2")  # every part name a family may have, in load order

# Keys a released checkpoint carries that no part loads: (pattern, families or None = all, why).
_DDPM_BUFFERS = (
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod "
    "posterior_variance posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 "
    "lvlb_weights logvar scale_factor"
).split()
IGNORED: tuple[tuple[str, tuple[str, ...] | None, str], ...] = (
    ("*.position_ids", None, "HF CLIP arange buffer; positions are recomputed"),
    ("conditioner.embedders.1.model.logit_scale", None, "open_clip contrastive temperature, unused for text"),
    *((name, None, "ldm DDPM schedule buffer; the schedule lives in diffusion.py") for name in _DDPM_BUFFERS),
    ("denoiser.sigmas", None, "sgm DiscreteDenoiser buffer; the schedule lives in diffusion.py"),
    ("model_ema.*", None, "ldm EMA copy of the UNet; the main weights are used"),
    ("first_stage_model.loss.*", None, "VAE training loss (LPIPS / discriminator)"),
    ("cond_stage_model.*", ("sdxl", "sdxl-tiny"), "SD1.x text-encoder leftovers in a merged SDXL file"),
)


def ignored(key: str, family: str | None = None) -> bool:
    """True if `key` is in the IGNORED table (for `family`, or for every family when None)."""
    return any(
        fnmatch.fnmatchcase(key, pattern) and (fams is None or family in fams) for pattern, fams, _ in IGNORED
    )


class NotAModel(WeightError):
    """The file is not an SDXL / SD1.5 base checkpoint (a LoRA, an SD2 model, a lone VAE, …)."""

    def __init__(self, file: str | os.PathLike, what: str):
        self.file = str(file)
        super().__init__(f"{self.file}: {what}")


class FamilyMismatch(WeightError):
    def __init__(self, file: str | os.PathLike, found: str, wanted: str):
        self.file, self.found, self.wanted = str(file), found, wanted
        super().__init__(
            f"{self.file}: is an {FAMILIES[found].title} checkpoint ({found}), but {wanted} was asked; "
            f"pass an {FAMILIES[wanted].title} checkpoint or use the {found} family"
        )


class KeyMismatch(WeightError):
    def __init__(self, file: str | os.PathLike, part: str, missing: list[str], unexpected: list[str]):
        self.file, self.part = str(file), part
        self.missing, self.unexpected = missing, unexpected
        bits = []
        if missing:
            bits.append(f"{len(missing)} missing ({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''})")
        if unexpected:
            more = ", …" if len(unexpected) > 5 else ""
            bits.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])}{more})")
        super().__init__(
            f"{self.file}: {part} keys do not match the model: {'; '.join(bits)}; "
            "the file is damaged or of another architecture"
        )


# -- detection ------------------------------------------------------------------------
def lora_modules(keys) -> list[str]:
    """Names of kohya / LyCORIS modules (`lora_unet_…`, `lora_te1_…`, …) among `keys`, sorted: a
    kohya prefix and a suffix some adapter class reads (or a LyCORIS one, `networks.base`)."""
    from eridiffusion.networks import base, naming

    prefixes = tuple(naming.PREFIXES.values())
    return sorted({split[0] for k in keys if k.startswith(prefixes) and (split := base.split_key(k, known=True))})


_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def _describe_unknown(keys: list[str]) -> str:
    """One line saying what a file without an ldm UNet looks like."""
    ks = set(keys)
    if any(".lora_A." in k or ".lora_B." in k or "lora_linear_layer" in k or ".lora.down" in k for k in keys):
        return "is a diffusers/peft LoRA file, not a base model; pass it with --lora"
    if {"encoder.conv_in.weight", "decoder.conv_in.weight"} <= ks:
        return "is a standalone VAE, not a full checkpoint; pass an SDXL or SD1.5 single-file checkpoint"
    if "conv_in.weight" in ks and any(k.startswith("down_blocks.") for k in keys):
        return "is a diffusers-layout UNet, unsupported; pass the single-file (.safetensors) checkpoint"
    if "input_blocks.0.0.weight" in ks:
        return "is a bare UNet without the model.diffusion_model. prefix; pass the full single-file checkpoint"
    if "text_model.embeddings.token_embedding.weight" in ks or "token_embedding.weight" in ks:
        return "is a standalone text encoder, not a full checkpoint; pass an SDXL or SD1.5 single-file checkpoint"
    heads = sorted({k.split(".", 1)[0] for k in keys})
    shown = ", ".join(heads[:5]) + (", …" if len(heads) > 5 else "")
    return f"has no {_UNET_IN} ({len(keys)} tensors under {shown}); not an SDXL or SD1.5 checkpoint"


def detect(loader: WeightLoader) -> Family:
    """The family of a checkpoint, from its keys (which parts) and shapes (which variant)."""
    keys = loader.keys()
    lora = lora_modules(keys)
    if lora:
        raise NotAModel(loader.path, f"is a LoRA file ({len(lora)} modules), not a base model; pass it with --lora")
    for fam in FAMILIES.values():
        if fam.matches(loader):
            return fam
    if _UNET_IN not in loader:
        raise NotAModel(loader.path, _describe_unknown(keys))
    channels, in_channels, context, adm = unet_signature(loader)
    found = f"a UNet with model_channels {channels}, in_channels {in_channels}, context dim {context}, adm {adm}"
    if context == 1024:
        hint = "context dim 1024 = SD2.x, unsupported"
    elif context == 1280 or adm == 2560:
        hint = "= the SDXL refiner, unsupported"
    elif in_channels != 4:
        hint = f"{in_channels} input channels = an inpainting/instruct model, unsupported"
    else:
        hint = "unknown architecture"
    raise NotAModel(loader.path, f"has {found} ({hint}); eridiffusion trains SDXL and SD1.5 base checkpoints")


# -- checking a file against the models ---------------------------------------------------
@dataclass
class PartCheck:
    """How the file's keys under one part's prefix compare with that part's state dict."""

    part: str
    prefix: str
    expected: dict[str, torch.Size]
    missing: list[str]
    unexpected: list[str]
    shapes: list[tuple[str, list[int], list[int]]]  # (model key, expected, found)


def check(loader: WeightLoader, family: Family, models: dict[str, nn.Module]) -> tuple[list[PartCheck], list[str]]:
    """Compare the file with `models` (part -> module, meta is fine). Returns (per-part checks,
    unclaimed file keys: under no part prefix of the family and not in IGNORED)."""
    checks = []
    for part, model in models.items():
        prefix = family.prefixes[part]
        expected = {k: v.shape for k, v in model.state_dict().items()}
        present = {k[len(prefix) :] for k in loader.keys() if k.startswith(prefix) and not ignored(k, family.name)}
        shapes = [
            (k, list(shape), list(loader.shape(prefix + k)))
            for k, shape in expected.items()
            if k in present and loader.shape(prefix + k) != shape
        ]
        missing, unexpected = sorted(expected.keys() - present), sorted(present - expected.keys())
        checks.append(PartCheck(part, prefix, expected, missing, unexpected, shapes))
    prefixes = tuple(family.prefixes.values())
    unclaimed = sorted(k for k in loader.keys() if not k.startswith(prefixes) and not ignored(k, family.name))
    return checks, unclaimed


# -- load / save ------------------------------------------------------------------------
def load(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    parts: tuple[str, ...] = PARTS,
    *,
    family: str | None = None,
    allow_pickle: bool = False,
) -> Components:
    """Load the `parts` of a single-file checkpoint, strictly, in eval mode with frozen weights.

    All parts are read at once by ``WeightLoader.read_many`` (parallel reads through small host
    buffers; floating tensors cast to `dtype` on `device`); `family` (a FAMILIES name) makes a
    checkpoint of another family an error instead of a surprise.
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"load: unknown parts {sorted(unknown)}; choose from {PARTS}")
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"model.family = {family!r} is unknown; choose from {', '.join(sorted(FAMILIES))}")
    with WeightLoader(path, allow_pickle=allow_pickle) as loader:
        asked = FAMILIES.get(family) if family is not None else None
        fam = asked if asked is not None and asked.matches(loader) else detect(loader)
        if family is not None and family != fam.name:
            raise FamilyMismatch(loader.path, fam.name, family)
        models = {p: fam.build(p, "meta") for p in fam.parts if p in parts}
        checks, unclaimed = check(loader, fam, models)
        for c in checks:
            if c.missing or c.unexpected:
                if not c.unexpected and len(c.missing) == len(c.expected):
                    raise KeyMismatch(loader.path, c.part, [f"all {len(c.missing)} keys under {c.prefix}"], [])
                missing, unexpected = [c.prefix + k for k in c.missing], [c.prefix + k for k in c.unexpected]
                raise KeyMismatch(loader.path, c.part, missing, unexpected)
            if c.shapes:
                key, expected, found = c.shapes[0]
                raise ShapeMismatch(c.prefix + key, expected, found, loader.path)
        if unclaimed:
            raise KeyMismatch(loader.path, "file", [], unclaimed)
        requests = [
            (c.prefix + k, meta.shape, dtype if meta.is_floating_point() else None)
            for c in checks
            for k, meta in models[c.part].state_dict().items()
        ]
        tensors = loader.read_many(requests, device=device)
        out = Components(fam)
        for c in checks:
            model = models[c.part]
            state = {k: tensors.pop(c.prefix + k) for k in model.state_dict()}
            model.load_state_dict(state, strict=True, assign=True)
            del state
            left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
            if left:  # a non-persistent buffer: the model must compute it in forward instead
                raise RuntimeError(f"checkpoint.load: {c.part} tensors {left[:5]} are not in the state dict")
            setattr(out, c.part, _frozen(model))
    return out


def _frozen(model: nn.Module) -> nn.Module:
    model.eval().requires_grad_(False)
    return model


def save(
    components: Components, path: str | os.PathLike, dtype: torch.dtype | None = None, metadata: dict | None = None
) -> Path:
    """Write the loaded parts as one single-file checkpoint with the original prefixes.

    Atomic: written to a temporary file in the same folder, fsynced, then renamed over `path`.
    """
    path = Path(path)
    prefixes = components.family.prefixes
    tensors = {}
    for part, model in components.items():
        for k, t in model.state_dict().items():
            t = t.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[prefixes[part] + k] = t.to("cpu").contiguous()
    header = {"format": "pt", **(metadata or {})}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=header))
    return path


def tiny_components(family: str = "sdxl-tiny", seed: int = 0) -> Components:
    """Randomly initialised tiny models of `family` (deterministic in `seed`), eval mode, frozen."""
    if family not in ("sdxl-tiny", "sd15-tiny"):
        raise ValueError(f"tiny_components: family {family!r} is not tiny; use 'sdxl-tiny' or 'sd15-tiny'")
    fam = FAMILIES[family]
    out = Components(fam)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for part in fam.parts:
            setattr(out, part, _frozen(fam.build(part)))
    return out
