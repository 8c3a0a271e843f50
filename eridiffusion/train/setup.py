"""What a run needs before its first step: the models, the dataset and the filled cache.

`load_setup(cfg)` loads the checkpoint (frozen, `model.dtype`), scans the dataset and decides
what is cached; `fill_cache` encodes the latents and text outputs not yet in the cache (under
torchrun each rank encodes its share); `build_cache(cfg)` does both for `eri cache`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eridiffusion import checkpoint, faults, fp8, speed
from eridiffusion.config import TrainConfig
from eridiffusion.data.cache import TensorCache, latent_settings, make_key, text_settings
from eridiffusion.data.dataset import ImageDataset, build_datasets, downsample_mask
from eridiffusion.devices import resolve_device
from eridiffusion.models.tokenizer import CLIPTokenizer
from eridiffusion.errors import ConfigError
from eridiffusion.weights import PickleRefused

Log = Callable[[str], None]


@dataclass
class Setup:
    cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype
    components: checkpoint.Components
    dataset: ImageDataset
    cache: TensorCache
    cache_latents: bool
    cache_text: bool
    vae_id: str
    text_id: str

    @property
    def family(self):
        return self.components.family

    def latent_key(self, i: int, flip: bool) -> str:
        item = self.dataset[i]
        return make_key(self.dataset.content_key(i), latent_settings(self.vae_id, item.bucket, flip, torch.float32))

    def text_key(self, caption: str) -> str:
        return make_key(None, text_settings(self.text_id, caption, torch.float32, self.cfg.data.max_tokens))

    def cached(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        """A cache entry `fill_cache` wrote; one line if it was deleted or damaged since."""
        entry = self.cache.get(kind, key)
        if entry is None:
            raise faults.FaultError(f"{self.cache.path(kind, key)}: cache entry unreadable or missing; delete it and "
                                    "run again (train.resume=true continues from the last saved state)")  # fmt: skip
        return entry


def fingerprint(module: nn.Module) -> str:
    """Cheap identity of a model's weights for cache keys: names, shapes, dtypes and a strided
    sample of every tensor (any fine-tune changes it; reading a 6 GB file would not be cheap)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if "lora_" in name:
            continue
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)].float().cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def encode_latents(vae: nn.Module, pixels: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """pixels (B, 3, H, W) in [-1, 1] → scaled posterior mean and std (B, 4, H/8, W/8).

    The distribution is kept, not one sample of it, so every step draws a fresh latent
    (x0 = mean + std·ε) as training on the images themselves would.
    """
    dist = vae.encode(pixels.to(vae.dtype))
    return {"mean": (dist.mean * scale).float(), "std": (dist.std * scale).float()}


def load_components(cfg: TrainConfig, device: torch.device, log: Log) -> checkpoint.Components:
    dtype = fp8.compute_dtype(cfg.model.dtype)  # fp8: loaded in bf16, the frozen weights stored in float8 below
    if cfg.model.dtype in fp8.FP8:
        fp8.check_device(cfg.model.dtype, device)
    family = None if cfg.model.family == "auto" else cfg.model.family
    log(f"loading {cfg.model.path} ({cfg.model.dtype}) on {device}")
    try:
        components = checkpoint.load(cfg.model.path, dtype=dtype, device=device, family=family,
                                     allow_pickle=cfg.model.allow_pickle)  # fmt: skip
    except PickleRefused:
        if cfg.model.allow_pickle:  # refused by weights_only=True itself: its message says why
            raise
        raise ConfigError(f"model.path = {cfg.model.path!r} is a pickle file, which can run code when loaded: convert "
                          "it to .safetensors, or set model.allow_pickle=true (read with weights_only=True)") from None
    if dtype == torch.float16:  # the SDXL VAE overflows in fp16 (formats.md): encode in fp32
        components.vae = components.vae.float()
    log(f"model: {components.family.name}")
    if cfg.model.dtype in fp8.FP8:  # kohya --fp8_base: the frozen UNet (and untrained text encoders)
        train_text = getattr(cfg, "trains_text_encoders", cfg.lora.train_text_encoder)
        if getattr(cfg.train, "mode", "lora") != "lora":
            raise ConfigError(f"model.dtype = {cfg.model.dtype!r} stores frozen weights in float8, and train.mode = "
                              f"{cfg.train.mode!r} trains them: use model.dtype=bf16")  # fmt: skip
        parts = [components.unet, *([] if train_text else components.text_modules())]
        saved = sum(fp8.store_float8(m, fp8.FP8[cfg.model.dtype]) for m in parts)
        log(f"model: frozen Linear / Conv weights stored as {fp8.FP8[cfg.model.dtype]} ({saved / 2**30:.2f} GiB saved)")
    multiple = components.family.bucket_multiple
    if cfg.data.bucket_step % multiple:
        raise ConfigError(f"data.bucket_step = {cfg.data.bucket_step} must be a multiple of {multiple} "
                          f"for {components.family.name}")  # fmt: skip
    return components


def load_dataset(cfg: TrainConfig, log: Log) -> ImageDataset:
    """Every subset of `[data]` as one dataset; the run's own folders inside a data folder
    (outputs, cache) are not scanned as images."""
    dataset = build_datasets(cfg.data, exclude=[cfg.save.output_dir, cfg.cache_dir])
    log(str(dataset.report))
    return dataset


def report_cut_captions(dataset: ImageDataset, max_tokens: int, log: Log) -> int:
    """Log how many images have a caption (with prefix / suffix) longer than `data.max_tokens`
    tokens, which the text encoders cut; returns that number."""
    tok = CLIPTokenizer()
    lengths = [(len(tok.encode(dataset.subsets[it.subset].captions.fixed(it.caption))), it.path) for it in dataset.items]
    cut = [(n, path) for n, path in lengths if n > max_tokens]
    if cut:
        longest, path = max(cut, key=lambda x: x[0])
        more = "; data.max_tokens = 150 or 225 keeps more" if max_tokens < 225 else ""
        log(f"captions: {len(cut)} of {len(lengths)} images have captions longer than data.max_tokens = {max_tokens} "
            f"tokens, cut to it (longest: {longest} tokens, {path}){more}")  # fmt: skip
    return len(cut)


def load_setup(cfg: TrainConfig, log: Log, device: torch.device | None = None) -> Setup:
    cfg.check_paths()
    device = device or resolve_device(cfg.train.device)
    dataset = load_dataset(cfg, log)  # before the model: a bad folder costs no model load
    components = load_components(cfg, device, log)
    if cfg.cache.latents and dataset.random_crop:
        log("cache: random crop cannot use cached latents, encoding images every step")
    report_cut_captions(dataset, cfg.data.max_tokens, log)
    varies = dataset.caption_set() is None  # shuffled / dropped tags: a new caption every step
    cache_text = cfg.cache.text and not cfg.trains_text_encoders and not varies
    if cfg.cache.text and varies:
        log("cache: shuffled or dropped tags make a new caption every step, encoding text every step")
    fam = components.family
    vae_id = f"{fam.name}-vae-{fingerprint(components.vae)}"
    text_id = f"{fam.name}-te-" + "".join(fingerprint(m) for m in components.text_modules())
    return Setup(cfg, device, fp8.compute_dtype(cfg.model.dtype), components, dataset, TensorCache(cfg.cache_dir),
                 cfg.cache.latents and not dataset.random_crop, cache_text, vae_id, text_id)  # fmt: skip


@torch.no_grad()
def fill_cache(s: Setup, log: Log, progress: bool, rank: int = 0, world: int = 1) -> None:
    """Encode every image (both flips when flipping) and caption not yet in the cache; under
    torchrun rank r encodes every world-th missing entry (the caller then waits at a barrier)."""
    from tqdm import tqdm

    c, data = s.components, s.dataset
    share = f" (rank 0's share of {world} processes)" if world > 1 else ""
    if s.cache_latents:
        keys = {(i, f): s.latent_key(i, f) for i in range(len(data))
                for f in ((False, True) if data.subset_of(i).flip else (False,))}  # fmt: skip
        # split by position in the full list: ranks see other ranks' writes at different times
        todo = [i_f for n, (i_f, key) in enumerate(keys.items())
                if not s.cache.path("latent", key).is_file() and n % world == rank]  # fmt: skip
        log(f"cache: {len(keys)} latents, encoding {len(todo)}{share} in {s.cache.root}")
        if s.cfg.train.compile and s.device.type == "cuda" and len(todo) >= speed.VAE_COMPILE_MIN_IMAGES:
            log("cache: compiling the VAE encoder (train.compile); the first two bucket shapes compile")
            speed.optimize_vae(c.vae, parts=("encoder",), dynamic=None)  # shape-generic after the 2nd bucket
        for i, f in tqdm(todo, desc="latents", disable=not progress or not todo, leave=False):
            item = data.load_item(i, torch.Generator().manual_seed(0), flip=f)  # leaves the global RNG alone
            enc = encode_latents(c.vae, item["pixels"][None].to(s.device), c.family.vae.scaling_factor)
            entry = {"time_ids": item["time_ids"], **{k: v[0] for k, v in enc.items()}}
            if item["mask"] is not None:  # the loss mask on the latent grid
                entry["mask"] = downsample_mask(item["mask"], c.family.vae.factor)
            s.cache.put("latent", keys[i, f], entry)
    if s.cache_text:
        captions = sorted(data.caption_set())  # prefixes, suffixes and the dropped ("") caption included
        todo = [cap for n, cap in enumerate(captions)
                if not s.cache.path("text", s.text_key(cap)).is_file() and n % world == rank]  # fmt: skip
        log(f"cache: {len(captions)} captions, encoding {len(todo)}{share}")
        encode = c.family.text_encoder(c, s.cfg.data.max_tokens)
        for cap in tqdm(todo, desc="text", disable=not progress or not todo, leave=False):
            s.cache.put("text", s.text_key(cap), {k: v[0].float() for k, v in encode([cap]).items()})


def build_cache(cfg: TrainConfig, log: Log = print, progress: bool = True) -> TensorCache:
    """`eri cache`: fill the latent / text cache for `cfg` and return it (with its stats)."""
    s = load_setup(cfg, log)
    if not (s.cache_latents or s.cache_text):
        log("cache: nothing to cache with this config (cache.latents and cache.text are off)")
    fill_cache(s, log, progress)
    return s.cache
