"""The LoRA training loop, readable top to bottom.

    config ─► checkpoint.load ─► frozen UNet / VAE / text encoders (+ LoRA, fp32)
    images ─► dataset, buckets ─► cache (VAE latents × scale, text outputs) ─► batches
    loop:  t ~ U{0..999}, noise (+ offset), x_t = add_noise(x0, noise, t)
           pred = unet(x_t, t, context, y)  ─► (min-SNR weighted) MSE vs eps / v target
           backward, grad accumulation, clip, optimizer, LR schedule
           every N steps: loss.csv, progress, LoRA file + resumable state

`train(cfg)` runs it; `build_cache(cfg)` only fills the cache (`eri cache`). The resumable
state is not a pickle: tensors go to a safetensors file and everything else to JSON, so a
resumed run continues exactly (bit-identical losses on CPU).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from eridiffusion import checkpoint, diffusion, distributed, faults, lora, pipeline, speed
from eridiffusion.config import ConfigError, TrainConfig
from eridiffusion.data.buckets import BucketBatchSampler, BucketConfig
from eridiffusion.data.cache import TensorCache, latent_settings, make_key, text_settings
from eridiffusion.data.dataset import CaptionConfig, ImageDataset, build_dataset, process_caption
from eridiffusion.io import atomic_write, remove_temp_files, write_text
from eridiffusion.models.tokenizer import CLIPTokenizer
from eridiffusion.models.unet import sdxl_vector
from eridiffusion.weights import PickleRefused

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STATE_FORMAT = "eridiffusion-train-state/1"

Log = Callable[[str], None]


@dataclass
class TrainResult:
    """What a run produced; `losses` has one value per optimizer step since step 1."""

    output_dir: Path
    lora_path: Path | None
    step: int
    losses: list[float]
    components: checkpoint.Components
    networks: dict[str, lora.LoRANetwork] = field(default_factory=dict)
    interrupted: bool = False
    stop_signal: int = 0  # SIGINT / SIGTERM that stopped the run (eri train exits 128 + it)
    nonfinite_skipped: int = 0  # steps skipped for a NaN/inf loss or gradient


# ---------------------------------------------------------------- small helpers


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup, then decay.

    Warmup ramps (step+1)/(warmup+1); then "constant" stays 1, "linear" falls to 0 at `total`,
    "cosine" follows 0.5·(1 + cos(π·progress)) (Loshchilov & Hutter 2017, without restarts).
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule = {schedule!r} is unknown: use constant, linear or cosine")


def resolve_device(name: str) -> torch.device:
    """`train.device` as a torch device; under torchrun `cuda` (and `auto` on a GPU host) is cuda:LOCAL_RANK."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but no CUDA device is available: use train.device=cpu")
    return distributed.local_device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)  # also seeds every CUDA device


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


# ---------------------------------------------------------------- text conditioning


class TextConditioner:
    """Captions → (context, pooled) as the family's UNet wants them.

    SDXL: context = cat(CLIP-L penultimate, bigG penultimate) (B, 77, 768+1280), pooled = bigG
    pooled (B, 1280); TE1 pads with EOS, TE2 with 0 (comfy/sdxl_clip.py). SD1.5: context =
    CLIP-L last layer after the final norm (B, 77, 768), no pooled.
    """

    def __init__(self, components: checkpoint.Components):
        self.te1, self.te2 = components.te1, components.te2
        self.tok1 = CLIPTokenizer()
        self.tok2 = CLIPTokenizer(pad_token_id=0) if self.te2 is not None else None

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.te1.parameters()).device
        out1 = self.te1(self.tok1(captions).to(device))
        if self.te2 is None:
            return {"context": out1.last}
        out2 = self.te2(self.tok2(captions).to(device))
        context = torch.cat([out1.hidden, out2.hidden.to(out1.hidden.dtype)], dim=-1)  # (B, 77, D1+D2)
        return {"context": context, "pooled": out2.pooled}


def encode_latents(vae: nn.Module, pixels: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """pixels (B, 3, H, W) in [-1, 1] → scaled posterior mean and std (B, 4, H/8, W/8).

    The distribution is kept, not one sample of it, so every step draws a fresh latent
    (x0 = mean + std·ε) as training on the images themselves would.
    """
    dist = vae.encode(pixels.to(vae.dtype))
    return {"mean": (dist.mean * scale).float(), "std": (dist.std * scale).float()}


# ---------------------------------------------------------------- the loss


def diffusion_loss(
    unet: nn.Module,
    x0: torch.Tensor,
    cond: dict[str, torch.Tensor],
    time_ids: torch.Tensor | None,
    t: torch.Tensor,
    noise: torch.Tensor,
    ac: torch.Tensor,
    prediction: str,
    min_snr_gamma: float = 0.0,
) -> torch.Tensor:
    """Mean (min-SNR weighted) MSE between the UNet's output at x_t and the eps / v target."""
    x_t = diffusion.add_noise(x0, noise, t, ac)
    y = None
    if "pooled" in cond:  # time_ids stay fp32 (a bf16 pooled must not round orig sizes like 1237 to 1240)
        y = sdxl_vector(cond["pooled"], time_ids, unet.cfg.addition_time_embed_dim)
    pred = unet(x_t, t, cond["context"], y)
    target = diffusion.target(prediction, x0, noise, t, ac)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if min_snr_gamma > 0:
        loss = loss * diffusion.min_snr_weight(t, ac, min_snr_gamma, prediction)
    return loss.mean()


# ---------------------------------------------------------------- setup: models, data, cache


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


def _load_setup(cfg: TrainConfig, log: Log, device: torch.device | None = None) -> Setup:
    cfg.check_paths()
    d = cfg.data
    if d.caption_ext != ".txt":  # data/dataset.py reads same-stem .txt files only
        raise ConfigError(f"data.caption_ext = {d.caption_ext!r} is not supported yet: rename the captions to .txt")
    device, dtype = device or resolve_device(cfg.train.device), DTYPES[cfg.model.dtype]
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
    levels = len(components.family.unet.channel_mult)
    multiple = components.family.vae.factor * 2 ** (levels - 1)
    if cfg.data.bucket_step % multiple:
        raise ConfigError(
            f"data.bucket_step = {cfg.data.bucket_step} must be a multiple of {multiple} for {components.family.name}"
        )

    cache_latents = cfg.cache.latents and not d.random_crop
    if cfg.cache.latents and d.random_crop:
        log("cache: random crop cannot use cached latents, encoding images every step")
    dataset = build_dataset(
        d.dir,
        BucketConfig(resolution=d.resolution, step=d.bucket_step, min_side=d.bucket_min, max_side=d.bucket_max),
        default_caption=d.default_caption or None,
        captions=CaptionConfig(dropout=d.caption_dropout, shuffle_tags=d.shuffle_tags, keep_tags=d.keep_tags),
        crop="random" if d.random_crop else "center",
        flip=d.flip,
        default_repeats=d.repeats,  # images outside kohya `N_name` folders (those carry their own N)
    )
    log(str(dataset.report))
    cache_text = cfg.cache.text and not cfg.lora.train_text_encoder and not d.shuffle_tags
    if cfg.cache.text and d.shuffle_tags:
        log("cache: shuffled tags make a new caption every step, encoding text every step")
    vae_id = f"{components.family.name}-vae-{fingerprint(components.vae)}"
    text_id = f"{components.family.name}-te-{fingerprint(components.te1)}"
    if components.te2 is not None:
        text_id += fingerprint(components.te2)
    return Setup(cfg, device, dtype, components, dataset, TensorCache(cfg.cache_dir),
                 cache_latents, cache_text, vae_id, text_id)  # fmt: skip


def _latent_key(s: Setup, i: int, flip: bool) -> str:
    item = s.dataset[i]
    return make_key(s.dataset.content_key(i), latent_settings(s.vae_id, item.bucket, flip, torch.float32))


def _text_key(s: Setup, caption: str) -> str:
    return make_key(None, text_settings(s.text_id, caption, torch.float32))


def _cached(s: Setup, kind: str, key: str) -> dict[str, torch.Tensor]:
    """A cache entry `_fill_cache` wrote; one line if it was deleted or damaged since."""
    entry = s.cache.get(kind, key)
    if entry is None:
        raise faults.FaultError(f"{s.cache.path(kind, key)}: cache entry unreadable or missing; delete it and run "
                                "again (train.resume=true continues from the last saved state)")  # fmt: skip
    return entry


@torch.no_grad()
def _fill_cache(s: Setup, log: Log, progress: bool, rank: int = 0, world: int = 1) -> None:
    """Encode every image (both flips when flipping) and caption not yet in the cache; under
    torchrun rank r encodes every world-th missing entry (the caller then waits at a barrier)."""
    from tqdm import tqdm

    c, data = s.components, s.dataset
    share = f" (rank 0's share of {world} processes)" if world > 1 else ""
    if s.cache_latents:
        flips = (False, True) if data.flip else (False,)
        keys = {(i, f): _latent_key(s, i, f) for i in range(len(data)) for f in flips}
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
            s.cache.put("latent", keys[i, f], {"time_ids": item["time_ids"], **{k: v[0] for k, v in enc.items()}})
    if s.cache_text:
        captions = sorted({it.caption for it in data.items} | ({""} if s.cfg.data.caption_dropout > 0 else set()))
        todo = [cap for n, cap in enumerate(captions)
                if not s.cache.path("text", _text_key(s, cap)).is_file() and n % world == rank]  # fmt: skip
        log(f"cache: {len(captions)} captions, encoding {len(todo)}{share}")
        encode = TextConditioner(c)
        for cap in tqdm(todo, desc="text", disable=not progress or not todo, leave=False):
            s.cache.put("text", _text_key(s, cap), {k: v[0].float() for k, v in encode([cap]).items()})


def build_cache(cfg: TrainConfig, log: Log = print, progress: bool = True) -> TensorCache:
    """`eri cache`: fill the latent / text cache for `cfg` and return it (with its stats)."""
    s = _load_setup(cfg, log)
    if not (s.cache_latents or s.cache_text):
        log("cache: nothing to cache with this config (cache.latents and cache.text are off)")
    _fill_cache(s, log, progress)
    return s.cache


# ---------------------------------------------------------------- resumable state


def save_state(folder: Path, step: int, networks: dict[str, lora.LoRANetwork], optimizer: torch.optim.Optimizer,
               sampler_state: dict, generators: dict[str, torch.Generator], history: list[list[float]],
               elapsed: float, cfg: TrainConfig) -> None:  # fmt: skip
    """Tensors (LoRA, optimizer moments, RNG states) → `state-step{N}.safetensors`; the rest →
    `state.json`, written last and naming the tensor file, so a crash mid-save keeps the old state."""
    tensors: dict[str, torch.Tensor] = {}
    for kind, net in networks.items():
        for k, v in net.lora_state_dict().items():
            if not k.endswith(".alpha"):
                tensors[f"lora.{kind}.{k}"] = v
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict] = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                opt_scalars.setdefault(str(idx), {})[k] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    for name, g in generators.items():
        tensors[f"rng.gen.{name}"] = g.get_state()
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    py_state = random.getstate()
    tensors["rng.python"] = torch.tensor(py_state[1], dtype=torch.int64)
    name = f"state-step{step}.safetensors"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(folder / name, lambda tmp: save_file(tensors, tmp, metadata={"step": str(step)}))
    meta = {
        "format": STATE_FORMAT,
        "step": step,
        "tensors": name,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
        "rng": {"numpy": [np_state[0], *np_state[2:]], "python": [py_state[0], py_state[2]]},
        "sampler": sampler_state,
        "history": history,
        "elapsed": elapsed,
        "config": cfg.to_dict(),
    }
    write_text(folder / "state.json", json.dumps(meta))
    for old in folder.glob("state-step*.safetensors"):
        if old.name != name:
            old.unlink()


def load_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = folder / "state.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no training state to resume from; train without train.resume first")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != STATE_FORMAT:
        raise ConfigError(f"{path}: format {meta.get('format')!r} is not {STATE_FORMAT!r}; start a new run")
    return meta, load_file(folder / meta["tensors"])


def _check_resumable(folder: Path, saved: dict, cfg: TrainConfig) -> None:
    """What a state is tied to: the LoRA layout, the optimizer's kind of state and the data order
    (train.seed). The rest (LRs, schedule, steps, ...) may change on resume."""
    now = cfg.to_dict()
    if saved["lora"] != now["lora"]:
        raise ConfigError(f"{folder}: the saved run used other [lora] settings; resume with the same ones")
    for section, key in (("optim", "optimizer"), ("train", "seed")):
        old, new = saved[section][key], now[section][key]
        if old != new:
            raise ConfigError(f"{folder}: {section}.{key} = {json.dumps(new)} but the saved run used {json.dumps(old)}; "
                              f"resume with {section}.{key}={old} or start a new run")  # fmt: skip


def _load_lora_state(networks: dict[str, lora.LoRANetwork], tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of `save_state`'s `lora.{kind}.{name}.lora_{down,up}.weight` tensors."""
    with torch.no_grad():
        for kind, net in networks.items():
            for name, m in net.loras.items():
                m.lora_down.weight.copy_(tensors[f"lora.{kind}.{name}.lora_down.weight"])
                m.lora_up.weight.copy_(tensors[f"lora.{kind}.{name}.lora_up.weight"])


def _load_optimizer(optimizer: torch.optim.Optimizer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Moments and step counts from the state; LRs, betas, weight decay (and fused / foreach)
    stay this run's: `load_state_dict` would bring back the saved groups' settings."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(_optimizer_state(meta, tensors))
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def _restore_rng(meta: dict, tensors: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    for name, g in generators.items():
        state = tensors[f"rng.gen.{name}"]
        if state.numel() != g.get_state().numel():  # a CPU generator's state is not a CUDA one's
            raise ConfigError(f"the saved state's {name} generator comes from another device type than "
                              f"{g.device.type}; resume on the device the run started on (train.device)")  # fmt: skip
        g.set_state(state)
    kind, pos, has_gauss, cached = meta["rng"]["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss = meta["rng"]["python"]
    random.setstate((version, tuple(tensors["rng.python"].tolist()), gauss))


def _optimizer_state(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, scalars in meta["optimizer"]["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    return {"state": state, "param_groups": meta["optimizer"]["param_groups"]}


# ---------------------------------------------------------------- outputs


def _csv_row(h: list[float]) -> str:
    step, loss, lr, t = h
    return f"{int(step)},{loss:.6g},{lr:.6g},{t:.3f}\n"


def write_loss_csv(path: Path, history: list[list[float]]) -> None:
    write_text(path, "step,loss,lr,time\n" + "".join(_csv_row(h) for h in history))


def plot_loss(path: Path, history: list[list[float]], title: str = "training loss") -> None:
    """Draw the loss curve (raw in light blue, EMA-smoothed in dark blue) with PIL (no matplotlib)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 720, 400, 64, 16, 28, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((left, 8), title, fill="black", font=font)
    steps = [h[0] for h in history]
    losses = [h[1] for h in history if math.isfinite(h[1])]
    if len(history) >= 2 and losses:
        beta = 1.0 - min(0.5, 30.0 / len(history))  # smooth over about 1/30 of the run
        smooth, ema = [], None
        for h in history:
            ema = h[1] if ema is None else beta * ema + (1.0 - beta) * h[1]
            smooth.append(ema)
        ordered = sorted(losses)
        lo, hi = ordered[0], ordered[min(len(ordered) - 1, int(0.98 * len(ordered)))]  # clip rare spikes
        hi = hi if hi > lo else lo + 1e-6
        x0, x1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

        def xy(step: float, loss: float) -> tuple[float, float]:
            fx = (step - x0) / (x1 - x0)
            fy = (min(max(loss, lo), hi) - lo) / (hi - lo)
            return left + fx * (width - left - right), height - bottom - fy * (height - top - bottom)

        for i in range(5):  # horizontal grid lines with loss labels
            v = lo + (hi - lo) * i / 4
            _, y = xy(x0, v)
            draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
            draw.text((4, y - 6), f"{v:.4g}", fill="black", font=font)
        for i in range(5):
            s = x0 + (x1 - x0) * i / 4
            x, _ = xy(s, lo)
            draw.text((x - 10, height - bottom + 6), f"{int(round(s))}", fill="black", font=font)
        draw.line([xy(s, h[1]) for s, h in zip(steps, history)], fill=(150, 190, 235), width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((width // 2 - 12, height - 16), "step", fill="black", font=font)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _tensorboard(folder: Path, enabled: bool, log: Log):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("log: tensorboard is not installed, skipping event files (pip install tensorboard)")
        return None
    return SummaryWriter(str(folder / "tensorboard"))


# ---------------------------------------------------------------- the run


def _check_cuda_graph(cfg: TrainConfig, device: torch.device, processes: int) -> None:
    why = None
    if device.type != "cuda":
        why = f"needs a CUDA device, and this run is on {device}"
    elif processes > 1:
        why = f"runs in one process, and this run has {processes} under torchrun"
    elif cfg.lora.train_text_encoder:
        why = "does not capture the text encoders: set lora.train_text_encoder=false"
    if why:
        raise ConfigError(f"train.cuda_graph = true {why}; or set train.cuda_graph=false")


def train(
    cfg: TrainConfig,
    *,
    resume_dir: str | os.PathLike | None = None,
    stop_after: int | None = None,
    log: Log = print,
    progress: bool = True,
) -> TrainResult:
    """Train a LoRA as `cfg` says; resume from `resume_dir` (or `save.output_dir/state` when
    `train.resume`). `stop_after=N` stops after step N as an interruption would (state saved)."""
    from tqdm import tqdm

    out = Path(cfg.save.output_dir)
    t_cfg, o_cfg = cfg.train, cfg.optim
    faults.check_outputs(out, cfg.save.name, cfg.save.overwrite or t_cfg.resume or resume_dir is not None)

    w = distributed.init(resolve_device(t_cfg.device))  # torchrun: join the group; else one process
    if t_cfg.cuda_graph:
        _check_cuda_graph(cfg, w.device, w.size)
    if not w.main:  # only rank 0 logs and writes files
        log, progress = (lambda msg: None), False

    # -- models, data, cache --------------------------------------------------------------
    s = _load_setup(cfg, log, w.device)
    c, device = s.components, s.device
    prediction = c.family.prediction if t_cfg.prediction == "auto" else t_cfg.prediction
    _fill_cache(s, log, progress, w.rank, w.size)
    distributed.barrier()  # every rank's share of the cache is written
    validation = None  # built before the VAE / text encoders are freed: it keeps what it needs
    fsdp = t_cfg.fsdp and w.distributed
    if cfg.sample.prompts and cfg.sample.every_n_steps and fsdp:
        log("sample: previews are off under FSDP (every rank would have to sample the sharded UNet)")
    elif cfg.sample.prompts and cfg.sample.every_n_steps and w.main:
        validation = pipeline.Validation(c, cfg.sample, out, encode_now=not cfg.lora.train_text_encoder,
                                         prediction=prediction)  # fmt: skip
    if s.cache_latents:
        c.vae = None  # no longer needed: free its memory
    if s.cache_text:
        c.te1 = c.te2 = None
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # -- LoRA networks: fp32 trainable params over the frozen weights ----------------------
    seed_everything(t_cfg.seed)  # here, so the LoRA init does not depend on what the cache had to do
    lo = cfg.lora
    targets = list(lo.unet_targets) or None
    conv_rank = lo.conv_rank or None
    conv_alpha = (lo.conv_alpha or lo.conv_rank) if lo.conv_rank else None
    networks = {"unet": lora.inject(c.unet, "unet", lo.rank, lo.alpha, targets=targets, conv_rank=conv_rank,
                                    conv_alpha=conv_alpha, dropout=lo.dropout)}  # fmt: skip
    if lo.train_text_encoder:
        if c.te2 is None:
            networks["te"] = lora.inject(c.te1, "te", lo.rank, lo.alpha, dropout=lo.dropout)
        else:
            networks["te1"] = lora.inject(c.te1, "te1", lo.rank, lo.alpha, dropout=lo.dropout)
            networks["te2"] = lora.inject(c.te2, "te2", lo.rank, lo.alpha, dropout=lo.dropout)
        for te in (c.te1, c.te2):  # loaded in eval mode; previews restore the mode they find
            if te is not None:
                te.train()  # LoRA dropout on
    c.unet.gradient_checkpointing = t_cfg.gradient_checkpointing
    # train mode, TF32 and cuDNN autotune on CUDA, self-attention q/k/v (and LoRA) as one GEMM;
    # compiled regions go shape-generic after one recompile (buckets)
    speed.optimize_for_training(c.unet, compile=t_cfg.compile, dynamic=None, fused_qkv=True)
    text_encoder = None if s.cache_text else TextConditioner(c)
    n_params = sum(p.numel() for net in networks.values() for p in net.lora_parameters())
    log(f"lora: rank {lo.rank}, alpha {lo.alpha}, {n_params:,} trainable parameters in {', '.join(networks)}")
    # data parallel: DDP over the UNet (and trained text encoders); FSDP2 shards the frozen UNet
    model, synced = c.unet, []
    if fsdp:
        distributed.broadcast_params([p for net in networks.values() for p in net.lora_parameters()])
        distributed.shard_unet(c.unet, networks["unet"].lora_parameters())
        log(f"fsdp: frozen UNet sharded per block over {w.size} processes")
    elif w.distributed:
        model = distributed.wrap_ddp(c.unet, w)
        synced = [model]
        if text_encoder is not None and lo.train_text_encoder:
            text_encoder.te1 = distributed.wrap_ddp(c.te1, w, find_unused=True)
            synced.append(text_encoder.te1)
            if c.te2 is not None:
                text_encoder.te2 = distributed.wrap_ddp(c.te2, w, find_unused=True)
                synced.append(text_encoder.te2)

    # -- optimizer: one param group per component, each with its own LR --------------------
    groups = [{"params": net.lora_parameters(), "lr": o_cfg.unet_lr if kind == "unet" else o_cfg.text_encoder_lr,
               "name": kind} for kind, net in networks.items()]  # fmt: skip
    for g in groups:
        g["base_lr"] = g["lr"]
    if o_cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=o_cfg.unet_lr, weight_decay=o_cfg.weight_decay)
    else:
        opt_cls = torch.optim.AdamW if o_cfg.optimizer == "adamw" else torch.optim.Adam
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}  # one kernel, not one per tensor
        optimizer = opt_cls(groups, lr=o_cfg.unet_lr, betas=o_cfg.betas, eps=o_cfg.eps,
                            weight_decay=o_cfg.weight_decay, **fast)  # fmt: skip

    # -- sampler and step budget ----------------------------------------------------------
    repeats = s.dataset.repeats
    # global batches (batch_size × processes, one bucket); each rank runs its slice of each
    sampler = BucketBatchSampler(s.dataset.buckets, t_cfg.batch_size * w.size, t_cfg.seed, repeats=repeats)
    if t_cfg.batch_size * w.size > sum(repeats):
        procs = f" × {w.size} processes" if w.size > 1 else ""
        raise ConfigError(f"train.batch_size = {t_cfg.batch_size}{procs} is larger than the {sum(repeats)} samples "
                          f"per epoch in {cfg.data.dir}: lower train.batch_size or add images")  # fmt: skip
    steps_per_epoch = max(1, len(sampler) // t_cfg.grad_accum)
    total = t_cfg.max_steps or t_cfg.epochs * steps_per_epoch
    if t_cfg.max_steps and t_cfg.epochs:
        total = min(total, t_cfg.epochs * steps_per_epoch)
    data_gen = torch.Generator().manual_seed(t_cfg.seed + 1)  # flips, caption dropout, tag order
    noise_gen = torch.Generator(device).manual_seed(t_cfg.seed + 2)  # timesteps, noise, latents
    generators = {"data": data_gen, "noise": noise_gen}
    ac = diffusion.alphas_cumprod(diffusion.scaled_linear_betas()).to(device)

    # -- resume ---------------------------------------------------------------------------
    step, history, elapsed0 = 0, [], 0.0
    if resume_dir is None and t_cfg.resume:
        resume_dir = out / "state"
    if resume_dir is not None:
        meta, tensors = load_state(Path(resume_dir))
        _check_resumable(Path(resume_dir), meta["config"], cfg)
        _load_lora_state(networks, tensors)
        _load_optimizer(optimizer, meta, tensors)
        if not distributed.restore_sampler(sampler, meta["sampler"]):
            log(f"resume: global batch {meta['sampler']['global_batch']} → {sampler.batch_size}, "
                "continuing at the same epoch and sample count (not the same batches)")  # fmt: skip
        _restore_rng(meta, tensors, generators)
        step, history, elapsed0 = meta["step"], meta["history"], meta["elapsed"]
        log(f"resumed from {resume_dir} at step {step}")
    if w.rank:  # LoRA dropout masks differ per rank (global torch RNG); data / noise generators do not
        torch.manual_seed((t_cfg.seed * 1_000_003 + w.rank * 65_537 + step) % (1 << 63))

    def batches() -> Iterator[list[int]]:
        while True:
            yield from sampler

    batch_iter = batches()
    captions_cfg = s.dataset.captions

    def next_batch() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, slice, int, float]:
        """This rank's part of the next global batch of n: x0 (b,4,h,w), text conditioning,
        time_ids (b,6), its rows of the global batch, n, and its loss scale (`slice_weights`)."""
        idx = next(batch_iter)
        rows, scale = distributed.slice_weights(len(idx), w.rank, w.size)
        # one generator per sample, seeded from data_gen for the whole global batch: every rank
        # stays in step, and a sample's flip / crop / caption do not depend on which rank loads it
        gens = [torch.Generator().manual_seed(int(torch.randint(1 << 62, (), generator=data_gen))) for _ in idx]
        latents, captions, time_ids = [], [], []
        for i, item_gen in zip(idx[rows], gens[rows]):
            if s.cache_latents:  # same random draws, in the same order, as dataset.load_item
                flip = s.dataset.flip and float(torch.rand((), generator=item_gen)) < 0.5
                caption = process_caption(s.dataset[i].caption, captions_cfg, item_gen)
                entry = _cached(s, "latent", _latent_key(s, i, flip))
                latents.append(entry)
                time_ids.append(entry["time_ids"])
            else:
                item = s.dataset.load_item(i, item_gen)
                caption, pixels = item["caption"], item["pixels"][None].to(device)
                with torch.no_grad():
                    enc = encode_latents(c.vae, pixels, c.family.vae.scaling_factor)
                latents.append({k: v[0] for k, v in enc.items()})
                time_ids.append(item["time_ids"])
            captions.append(caption)
        mean = torch.stack([d["mean"] for d in latents]).to(device)
        std = torch.stack([d["std"] for d in latents]).to(device)
        eps = torch.randn((len(idx), *mean.shape[1:]), generator=noise_gen, device=device)[rows]  # global draw
        x0 = mean + std * eps
        if s.cache_text:
            entries = [_cached(s, "text", _text_key(s, cap)) for cap in captions]
            cond = {k: torch.stack([e[k] for e in entries]).to(device) for k in entries[0]}
        else:
            with torch.set_grad_enabled(lo.train_text_encoder):
                cond = text_encoder(captions)
        return x0, cond, torch.stack(time_ids).to(device), rows, len(idx), scale

    # -- the loop -------------------------------------------------------------------------
    if w.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in remove_temp_files(out) + remove_temp_files(out / "state"):
            log(f"removed {stale}, a partial write of a killed run")
        write_text(out / "config.toml", cfg.to_toml())
    writer = _tensorboard(out, cfg.log.tensorboard and w.main, log)
    params = [p for g in groups for p in g["params"]]

    def micro_step(x0, time_ids, t, noise, *cond_values, scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients accumulate); returns the loss.
        `scale` (this rank's share of the global batch) is 1 in one process, as in a graph."""
        cond = dict(zip(cond_keys, cond_values))
        # no autocast: the UNet casts its inputs to its weights' dtype and LoRA casts its fp32
        # weights to the activations' dtype, so nothing is cast twice
        loss = scale * diffusion_loss(model, x0, cond, time_ids, t, noise, ac, prediction, t_cfg.min_snr_gamma)
        (loss / t_cfg.grad_accum).backward()
        return loss.detach()

    cond_keys = ("context", "pooled") if c.family.te2 is not None else ("context",)  # TextConditioner's
    # the graphs keep the .grad tensors they write into: clear them, never drop them
    graphed = speed.GraphedBackward(micro_step, params) if t_cfg.cuda_graph else None
    clear_grads = functools.partial(optimizer.zero_grad, set_to_none=graphed is None)
    pending: list[tuple[int, torch.Tensor, float, float]] = []  # (step, loss on device, lr, time): synced at log
    ema = history[-1][1] if history else None
    t_start = time.perf_counter() - elapsed0
    log(f"training {total} steps (batch {t_cfg.batch_size} × {w.size} processes × accumulation {t_cfg.grad_accum}"
        f" = global batch {t_cfg.batch_size * w.size * t_cfg.grad_accum}, {steps_per_epoch} steps per epoch) → {out}")
    bar = tqdm(total=total, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    lora_path = None

    if w.main:
        write_loss_csv(out / "loss.csv", history)  # the header (and, when resuming, the rows so far)
    n_written = len(history)

    def flush() -> None:
        nonlocal ema, n_written
        if not pending or not w.main:  # other ranks keep no history and write nothing
            pending.clear()
            return
        values = torch.stack([p[1] for p in pending]).tolist()  # one device sync per log interval
        for (st, _, lr, t), v in zip(pending, values):
            history.append([st, v, lr, t])
            ema = v if ema is None else 0.95 * ema + 0.05 * v
            if writer is not None:
                writer.add_scalar("loss", v, st)
                writer.add_scalar("lr", lr, st)
        pending.clear()
        with open(out / "loss.csv", "a", encoding="utf-8") as f:  # append: a crash loses at most a line
            f.writelines(_csv_row(h) for h in history[n_written:])
        n_written = len(history)
        post = {"loss": f"{ema:.4f}", "lr": f"{history[-1][2]:.2e}"}
        if device.type == "cuda":
            post["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
        bar.set_postfix(post, refresh=False)

    def save(final: bool) -> Path | None:
        """Rank 0: flush the log, write the LoRA (final name or -step{N}), the state and loss.png."""
        if not w.main:
            return None
        flush()
        meta = lora.lora_metadata(
            c.family.name, rank=lo.rank, alpha=lo.alpha, steps=step, epoch=sampler.epoch,
            resolution=cfg.data.resolution, num_images=len(s.dataset), title=cfg.save.name,
            conv_rank=conv_rank, conv_alpha=conv_alpha, prediction_type=prediction,
        )  # fmt: skip
        name = f"{cfg.save.name}.safetensors" if final else f"{cfg.save.name}-step{step}.safetensors"
        path = out / name
        lora.save_lora(path, list(networks.values()), metadata=meta, dtype=DTYPES[cfg.save.save_dtype])
        save_state(out / "state", step, networks, optimizer, distributed.sampler_state(sampler), generators, history,
                   time.perf_counter() - t_start, cfg)  # fmt: skip
        plot_loss(out / "loss.png", history, title=f"{cfg.save.name}: loss per step")
        return path

    interrupted, saved_at, fault = False, 0, None
    guard = faults.NonFiniteGuard(t_cfg.max_nonfinite)
    stop = faults.StopSignals(log).install()  # SIGINT / SIGTERM: finish this step, save, exit 130 / 143
    try:
        with speed.activation_budget(t_cfg.memory_budget):  # read when the regions compile
            while step < total:
                if w.distributed:  # all ranks stop at the same step
                    stop.signum = distributed.agree_max(stop.signum, device)
                if stop.signum:
                    break
                lr_scale = lr_factor(step, total, o_cfg.warmup_steps, o_cfg.schedule)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * lr_scale
                step_loss = torch.zeros((), device=device)
                for micro in range(t_cfg.grad_accum):
                    # DDP all-reduces once per step: the micro-steps before the last run their forwards
                    # (the trained text encoders' in next_batch too) and backward in no_sync
                    with distributed.no_sync(synced, skip=micro < t_cfg.grad_accum - 1):
                        x0, cond, time_ids, rows, n, scale = next_batch()
                        # drawn for the global batch and sliced: N processes = one with the N× batch
                        t = diffusion.sample_timesteps(n, generator=noise_gen, device=device)[rows]
                        noise = torch.randn((n, *x0.shape[1:]), generator=noise_gen, device=device)
                        noise = diffusion.offset_noise(noise, t_cfg.noise_offset, noise_gen)[rows]
                        args = (x0, time_ids, t, noise, *(cond[k] for k in cond_keys))
                        loss = graphed(*args) if graphed is not None else micro_step(*args, scale=scale)
                    step_loss += loss / t_cfg.grad_accum
                if fsdp:
                    distributed.all_reduce_grads(params)
                if w.distributed:  # the logged loss is the global batch's
                    step_loss = distributed.all_reduce_sum_(step_loss) / w.size
                norm = torch.nn.utils.clip_grad_norm_(params, t_cfg.max_grad_norm) if t_cfg.max_grad_norm > 0 else None
                if guard.enabled and not guard.observe(faults.all_finite(step_loss, norm)):  # skip: no update
                    clear_grads()
                    norm_value = None if norm is None else float(norm)
                    log(f"step {step + 1}: loss {float(step_loss)}, gradient norm {norm_value}: step skipped "
                        f"({guard.in_row} in a row, {guard.skipped} in all)")  # fmt: skip
                    if guard.exhausted:
                        interrupted, fault = True, guard.error(step, out / "state")
                        break
                    continue
                optimizer.step()
                clear_grads()
                step += 1
                pending.append((step, step_loss, optimizer.param_groups[0]["lr"], time.perf_counter() - t_start))
                bar.update(1)
                if step % cfg.log.every == 0 or step == total:
                    flush()
                if cfg.save.every_n_steps and step % cfg.save.every_n_steps == 0 and step < total:
                    lora_path, saved_at = save(final=False), step
                if validation is not None and (step % cfg.sample.every_n_steps == 0 or step == total):
                    validation(step, writer)
                if stop_after is not None and step >= stop_after and step < total:
                    interrupted = True
                    break
    except KeyboardInterrupt:
        interrupted = True
        stop.keyboard_interrupt()
        log(f"\ninterrupted at step {step}: saving state, resume with train.resume=true")
    except torch.OutOfMemoryError:
        clear_grads()
        interrupted = True
        fault = faults.out_of_memory(step + 1, t_cfg.batch_size, cfg.data.resolution, t_cfg.gradient_checkpointing,
                                     s.cache_latents and s.cache_text)  # fmt: skip
    finally:
        bar.close()
        stop.restore()
    if device.type == "cuda" and fault is not None:
        torch.cuda.empty_cache()
    interrupted = interrupted or (bool(stop.signum) and step < total)  # a signal in the last step: the run is done
    if interrupted and step and saved_at != step:
        lora_path = save(final=False)
    elif not interrupted:
        lora_path = save(final=True)
        log(f"saved {lora_path}, {out / 'loss.csv'}, {out / 'loss.png'}")
    if writer is not None:
        writer.close()
    if fault is not None:
        raise fault
    if guard.skipped:
        log(f"{guard.skipped} steps skipped for a NaN/inf loss or gradient")
    distributed.barrier()  # rank 0's files are written when train() returns on any rank
    distributed.cleanup(w)
    return TrainResult(out, lora_path, step, [h[1] for h in history], c, networks, interrupted,
                       stop.signum if interrupted else 0, guard.skipped)  # fmt: skip

