"""Text to image: prompts → text encoders → sampler with CFG → VAE decode → PIL images.

    prompt ─► family.text_encoder ─► context (B, 77, D) (+ pooled for SDXL)
    family.denoiser_inputs(text, family.time_ids(size)) ─► UNet keywords (SDXL: y from pooled + size)
    noise (CPU generator per image: seed, seed+1, …) ─► SAMPLERS[name](cfg_model(Denoiser(unet)))
    latents / scaling_factor ─► VAE decode (tiled above TILE_ABOVE) ─► uint8 ─► PIL

Conditioning (sgm `GeneralConditioner`, diffusers `StableDiffusionXLPipeline.encode_prompt`):
SDXL context = cat(CLIP-L penultimate, bigG penultimate), pooled = bigG pooled; SD1.5 context
= CLIP-L last layer after the final norm. The unconditional branch of SDXL for an **empty**
negative prompt is all zeros (context and pooled), as the sgm sampling scripts do
(`force_uc_zero_embeddings=["txt"]`) and diffusers does by default (`force_zeros_for_empty_prompt`);
a non-empty negative is encoded like a prompt. SD1.5 encodes the empty string, as CompVis
`txt2img.py` and diffusers do. Both branches get the same time_ids.

Reproducibility: the start noise and the ancestral noise of image k are drawn on the CPU from
`torch.Generator().manual_seed(seed + k)`, so a seed gives the same latents on any device;
`png_info` writes every setting into the PNG so `eri sample` can be repeated from a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor, nn

from eridiffusion import __version__, checkpoint, networks, samplers, speed
from eridiffusion.io import atomic_write
from eridiffusion.devices import DTYPES, resolve_device
from eridiffusion.errors import PipelineError
from eridiffusion.faults import DiskFull, is_disk_full
from eridiffusion.models.tokenizer import CLIPTokenizer

TILE_ABOVE = 128 * 128  # latent pixels (1024² images) above which the VAE decodes in tiles
VAE_TILE, VAE_OVERLAP = 64, 16  # latent pixels (512 / 128 image pixels)
A1111_SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M", "ddim": "DDIM"}

Cond = dict[str, Tensor]  # UNet keywords: context (B, 77, D) and, for SDXL, y (B, adm)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → RGB images, rounded like diffusers' `numpy_to_pil`."""
    pixels = (images.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(p, "RGB") for p in pixels]


def sampling_defaults(zero_terminal_snr: bool) -> tuple[str, float]:
    """(timestep spacing, CFG rescale) for a model: "leading" and 0 as diffusers' SDXL / SD1.5
    schedulers; for a zero-terminal-SNR model "trailing" (so the first step is the pure-noise
    t = 999) and 0.7, the values of Lin et al. 2023 (sections 3.3 and 3.4)."""
    return ("trailing", 0.7) if zero_terminal_snr else ("leading", 0.0)


class Pipeline:
    """SDXL / SD1.5 text-to-image on loaded components (modules are held, not copied).

    `Pipeline(components, loras=[(file, scale), …])` wraps the layers with the LoRAs (the
    components stay usable and `remove_loras()` undoes it); `Pipeline.from_checkpoint` loads a
    file and folds the LoRAs into its weights (no extra work per step). A float16 VAE is cast
    to float32: the SDXL VAE overflows in fp16 (black / NaN images).
    """

    def __init__(self, components: checkpoint.Components, loras: Sequence[tuple[str | os.PathLike, float]] = (),
                 merge_loras: bool = False, prediction: str | None = None, zero_terminal_snr: bool = False,
                 max_tokens: int = 75):  # fmt: skip
        missing = [p for p in components.family.parts if getattr(components, p) is None]
        if missing:
            raise PipelineError(f"Pipeline: components lack {', '.join(missing)}; load them with checkpoint.load(parts=...)")
        self.family = components.family
        # zero-terminal SNR: the rescaled schedule, v-prediction, trailing steps, CFG rescale (`sampling_defaults`)
        self.zero_terminal_snr = zero_terminal_snr
        auto = "v_prediction" if zero_terminal_snr else components.family.prediction
        self.prediction = prediction or auto  # "epsilon" or "v_prediction"
        self.max_tokens = max_tokens  # prompts are encoded in max_tokens / 75 chunks of 75 tokens
        self.unet, self.vae = components.unet, components.vae
        if self.vae.dtype == torch.float16:
            self.vae.float()
        self.text_encoder = components.family.text_encoder(components, max_tokens)  # prompts -> conditioning
        self.text_modules = components.text_modules()  # for their train/eval mode
        self.networks: dict[str, networks.LoRANetwork] = {}
        if loras:
            files, scales = [p for p, _ in loras], [s for _, s in loras]
            self.networks = networks.apply_lora(components, files, scales, merge=merge_loras)
        self.graphed: speed.GraphedForward | None = None  # kept across images once compiled (`compile`)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, loras: Sequence[tuple[str | os.PathLike, float]] = (),
                        allow_pickle: bool = False, **options) -> Pipeline:  # fmt: skip
        """Load a single-file checkpoint on `device` in `dtype`, LoRAs merged into the weights;
        `options`: `prediction`, `zero_terminal_snr`, `max_tokens` as for the constructor."""
        components = checkpoint.load(path, dtype=dtype, device=device, allow_pickle=allow_pickle)
        return cls(components, loras, merge_loras=True, **options)

    def remove_loras(self) -> None:
        for net in self.networks.values():
            net.remove()
        self.networks = {}
        if self.graphed is not None:  # its graphs replay the removed layers
            self.graphed = speed.GraphedForward(self.unet)

    def compile(self, backend: str = "inductor") -> Pipeline:
        """Faster sampling of many images (`eri sample --compile`): the family's UNet regions and
        the VAE decoder compiled (inference graphs), and on CUDA the UNet's graphs kept from one
        image to the next instead of captured per image. The first image pays the compilation
        (docs/benchmarks.md gives the figures); images equal the eager ones up to fused-kernel
        rounding. Returns self."""
        self.family.compile_regions(self.unet, dynamic=None, backend=backend)
        speed.optimize_vae(self.vae, parts=("decoder",), backend=backend, channels_last=self.device.type == "cuda")
        if self.device.type == "cuda":
            self.graphed = speed.GraphedForward(self.unet)
        return self

    @property
    def device(self) -> torch.device:
        return _device_of(self.unet)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (the family's bucket multiple)."""
        return self.family.bucket_multiple

    def drop_text_encoders(self) -> None:
        """Forget the text encoders (after encoding what is needed) so their memory can be freed."""
        self.text_encoder, self.text_modules = None, []

    # -- text ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Prompts → the family's conditioning (`family.cond_keys`: context (B, 77, D), and
        for SDXL pooled (B, P))."""
        if self.text_encoder is None:
            raise PipelineError("Pipeline: the text encoders were dropped; encode the prompts before drop_text_encoders()")
        return self.text_encoder(prompts)

    def encode(self, prompts: list[str], negative: str = "") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(cond, uncond) text outputs, one row per prompt; see the module docstring for the
        empty negative (zeros for SDXL, the encoded "" for SD1.5)."""
        cond = self.encode_text(prompts)
        if negative == "" and self.family.empty_negative == "zeros":
            uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
        else:
            one = self.encode_text([negative])
            uncond = {k: v.expand(len(prompts), *v.shape[1:]) for k, v in one.items()}
        return cond, uncond

    def unet_inputs(self, text: dict[str, Tensor], size: tuple[int, int]) -> Cond:
        """Text outputs → the denoiser's keywords, with the family's micro-conditioning for
        `size` (SDXL: original = target = size, crop (0, 0))."""
        text = {k: v.float() for k, v in text.items()}  # the size embedding in fp32; the UNet casts back
        context = text["context"]
        time_ids = self.family.time_ids(size, context.shape[0], context.device)
        return self.family.denoiser_inputs(text, time_ids)

    # -- sampling --------------------------------------------------------------------------
    def check_size(self, size: tuple[int, int]) -> None:
        m = self.multiple
        if len(size) != 2 or any(s <= 0 or s % m for s in size):
            raise PipelineError(
                f"size {'x'.join(map(str, size))} is invalid for {self.family.name}: width and height must be "
                f"positive multiples of {m}, e.g. {max(m, round(size[0] / m) * m)}x{max(m, round(size[-1] / m) * m)}"
            )

    @torch.no_grad()
    def generate(self, cond: dict[str, Tensor], uncond: dict[str, Tensor], seeds: Sequence[int], steps: int = 30,
                 cfg: float = 7.0, sampler: str = "dpmpp_2m", karras: bool = False,
                 size: tuple[int, int] = (1024, 1024), callback: Callable | None = None,
                 spacing: str | None = None, guidance_rescale: float | None = None) -> list[Image.Image]:  # fmt: skip
        """One image per row of `cond`/`uncond` (text outputs from `encode`), image k seeded with
        seeds[k]; size is (width, height). Sigmas and start scale follow diffusers' schedulers
        (`samplers.sigmas_for`); spacing / guidance_rescale None: `sampling_defaults`."""
        if sampler not in samplers.SAMPLERS:
            raise PipelineError(f"sampler {sampler!r} is unknown: use one of {', '.join(samplers.SAMPLERS)}")
        if steps < 1:
            raise PipelineError(f"steps = {steps} is invalid: use 1 or more")
        self.check_size(size)
        if len(seeds) != cond["context"].shape[0]:
            raise PipelineError(f"generate: {len(seeds)} seeds for {cond['context'].shape[0]} prompts; give one per image")
        device, (w, h) = self.device, size
        f = self.family.vae.factor
        default_spacing, default_rescale = sampling_defaults(self.zero_terminal_snr)
        spacing = spacing or default_spacing
        guidance_rescale = default_rescale if guidance_rescale is None else guidance_rescale
        if spacing not in samplers.SPACINGS:
            raise PipelineError(f"spacing {spacing!r} is unknown: use one of {', '.join(samplers.SPACINGS)}")
        ac = self.family.schedule(device, zero_terminal_snr=self.zero_terminal_snr)
        sigmas = samplers.sigmas_for(steps, ac, spacing=spacing, karras=karras, sampler=sampler)
        net = self.graphed or (speed.GraphedForward(self.unet) if device.type == "cuda" else self.unet)  # no launches
        denoiser = samplers.Denoiser(net, ac, self.prediction, quantize=karras and sampler == "dpmpp_2m")
        model = samplers.cfg_model(denoiser, self.unet_inputs(cond, size), self.unet_inputs(uncond, size), cfg,
                                   guidance_rescale)  # fmt: skip

        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = (1, self.family.unet.in_channels, h // f, w // f)

        def cpu_noise(*_: Tensor) -> Tensor:  # (B, 4, h/8, w/8), one generator per image
            return torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device)

        # x_T = noise, in the sigma form x_T / sqrt(alpha_bar); diffusers' Euler with "linspace" /
        # "trailing" starts from noise·sigma_max instead (`samplers.sigmas_for`)
        euler_like = sampler in ("euler", "euler_a") and spacing != "leading"
        x = cpu_noise() * (sigmas[0] if euler_like else (sigmas[0] ** 2 + 1) ** 0.5)
        was_training = [(m, m.training) for m in (self.unet, self.vae)]
        self.unet.eval()
        self.vae.eval()
        try:
            latents = samplers.SAMPLERS[sampler](model, x, sigmas, callback=callback, noise_sampler=cpu_noise)
            return to_pil(self.decode(latents))
        finally:
            for m, mode in was_training:
                m.train(mode)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, 4, h, w) → images (B, 3, 8h, 8w) in [-1, 1], one image at a time,
        in tiles above TILE_ABOVE latent pixels."""
        z = latents / self.family.vae.scaling_factor
        tile = VAE_TILE if z.shape[2] * z.shape[3] > TILE_ABOVE else None
        return self.vae.decode(z, tile=tile, overlap=VAE_OVERLAP, slice_batch=True)

    def __call__(self, prompt: str | list[str], negative: str = "", steps: int = 30, cfg: float = 7.0,
                 sampler: str = "dpmpp_2m", karras: bool = False, seed: int = 0,
                 size: tuple[int, int] = (1024, 1024), batch: int = 1) -> list[Image.Image]:  # fmt: skip
        """`batch` images per prompt, prompt-major; image k gets seed + k. size = (width, height)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.check_size(size)
        cond, uncond = self.encode(prompts, negative)
        cond = {k: v.repeat_interleave(batch, dim=0) for k, v in cond.items()}
        uncond = {k: v.repeat_interleave(batch, dim=0) for k, v in uncond.items()}
        seeds = [seed + k for k in range(len(prompts) * batch)]
        return self.generate(cond, uncond, seeds, steps, cfg, sampler, karras, size)


# -- PNG files with their parameters -------------------------------------------------------
def sha256_prefix(path: str | os.PathLike, n: int = 10) -> str:
    """First `n` hex digits of the file's SHA-256 (A1111's "Model hash" uses 10)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:n]


@dataclass(frozen=True)
class SampleParams:
    """Everything needed to render one image again (the JSON `eridiffusion` PNG chunk)."""

    prompt: str
    negative: str
    seed: int
    sampler: str
    karras: bool
    steps: int
    cfg: float
    size: tuple[int, int]  # width, height
    model: str = ""  # file name
    model_sha256: str = ""  # first 10 hex digits
    family: str = ""
    dtype: str = ""
    loras: tuple[tuple[str, str, float], ...] = ()  # (file name, sha256 prefix, scale)
    prediction: str = "epsilon"
    zero_terminal_snr: bool = False  # the rescaled schedule (train.zero_terminal_snr)
    spacing: str = "leading"  # timestep spacing (samplers.SPACINGS)
    guidance_rescale: float = 0.0  # CFG rescale (Lin et al. 2023)
    max_tokens: int = 75  # prompt tokens encoded, in 75-token chunks

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt, "negative": self.negative, "seed": self.seed, "sampler": self.sampler,
            "karras": self.karras, "steps": self.steps, "cfg": self.cfg, "size": list(self.size),
            "model": {"file": self.model, "sha256": self.model_sha256, "family": self.family},
            "dtype": self.dtype,
            "loras": [{"file": f, "sha256": h, "scale": s} for f, h, s in self.loras],
            "prediction": self.prediction, "zero_terminal_snr": self.zero_terminal_snr, "spacing": self.spacing,
            "guidance_rescale": self.guidance_rescale, "max_tokens": self.max_tokens,
            "version": f"eridiffusion {__version__}",
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> SampleParams:
        m = d.get("model", {})
        loras = tuple((x["file"], x["sha256"], float(x["scale"])) for x in d.get("loras", []))
        return cls(d["prompt"], d["negative"], int(d["seed"]), d["sampler"], bool(d["karras"]), int(d["steps"]),
                   float(d["cfg"]), tuple(d["size"]), m.get("file", ""), m.get("sha256", ""), m.get("family", ""),
                   d.get("dtype", ""), loras, d.get("prediction", "epsilon"), bool(d.get("zero_terminal_snr", False)),
                   d.get("spacing", "leading"), float(d.get("guidance_rescale", 0.0)),
                   int(d.get("max_tokens", 75)))  # fmt: skip

    def a1111(self) -> str:
        """A1111 "parameters" text: prompt (with `<lora:name:scale>` tags), negative, settings line."""
        tags = "".join(f" <lora:{Path(f).stem}:{s:g}>" for f, _, s in self.loras)
        fields = [f"Steps: {self.steps}", f"Sampler: {A1111_SAMPLERS[self.sampler]}"]
        if self.karras:
            fields.append("Schedule type: Karras")
        fields += [f"CFG scale: {self.cfg:g}", f"Seed: {self.seed}", f"Size: {self.size[0]}x{self.size[1]}"]
        if self.guidance_rescale:
            fields.append(f"CFG Rescale: {self.guidance_rescale:g}")
        if self.model_sha256:
            fields.append(f"Model hash: {self.model_sha256}")
        if self.model:
            fields.append(f"Model: {Path(self.model).stem}")
        if self.loras:
            fields.append('Lora hashes: "' + ", ".join(f"{Path(f).stem}: {h}" for f, h, _ in self.loras) + '"')
        fields.append(f"Version: eridiffusion {__version__}")
        return f"{self.prompt}{tags}\nNegative prompt: {self.negative}\n{', '.join(fields)}"

    def png_info(self) -> PngInfo:
        info = PngInfo()
        info.add_text("parameters", self.a1111())
        info.add_text("eridiffusion", json.dumps(self.to_json(), ensure_ascii=False))
        return info


def read_params(path: str | os.PathLike) -> SampleParams:
    """The settings written into a PNG by `eri sample`."""
    with Image.open(path) as im:
        text = im.text.get("eridiffusion")  # type: ignore[attr-defined]
    if text is None:
        raise PipelineError(f"{path}: has no 'eridiffusion' PNG text chunk; it was not written by eri sample")
    return SampleParams.from_json(json.loads(text))


def save_new_png(image: Image.Image, folder: str | os.PathLike, stem: str, info: PngInfo | None = None) -> Path:
    """Save as `folder/NNNNN-stem.png` with the next free number; never overwrites a file and
    never leaves a torn one (written aside, then claimed with an exclusive link, so parallel
    runs cannot collide either)."""
    folder = writable_folder(folder)
    numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    n = max(numbers, default=-1) + 1
    while True:
        path = folder / f"{n:05d}-{stem}.png"
        try:
            return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), exclusive=True)
        except FileExistsError:
            n += 1
        except DiskFull:
            raise DiskFull(path, then="free some space or pass --out on another disk") from None


def writable_folder(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """`folder`, created if missing, after a test write; one line when it is a file, read-only or
    on a full disk (checked before a model loads, so nothing is rendered in vain)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"{flag} {folder}: is a file, not a folder; pass a folder (images are numbered inside it)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".eri-write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(folder / "x", then="free some space or pass --out on another disk") from None
        raise PipelineError(f"{flag} {folder}: cannot write there ({e.strerror or e}); pass a folder you can write") from None
    return folder


# -- `eri sample` ---------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """"1024x768" → (1024, 768) = (width, height); one number means a square."""
    w, _, h = text.lower().partition("x")
    try:
        size = (int(w), int(h or w))
    except ValueError:
        raise PipelineError(f"--size {text!r} is not WIDTHxHEIGHT; write e.g. 1024x1024") from None
    return size


def parse_lora(spec: str) -> tuple[str, float]:
    """"style.safetensors:0.8" → (path, 0.8); without ":SCALE" the scale is 1 (a Windows
    drive colon is kept, since what follows the last colon must be a number)."""
    path, sep, scale = spec.rpartition(":")
    if not sep or os.path.isfile(spec) or (len(path) == 1 and scale[:1] in "/\\"):  # no scale, or C:\x.safetensors
        return spec, 1.0
    try:
        return path, float(scale)
    except ValueError:
        raise PipelineError(f"--lora {spec}: bad strength {scale!r}; write FILE[:SCALE] with a number, "
                            f"e.g. {path}:0.8") from None  # fmt: skip


def sample_files(model: str | os.PathLike, prompts: Sequence[str], out: str | os.PathLike, negative: str = "",
                 steps: int = 30, cfg: float = 7.0, sampler: str = "dpmpp_2m", karras: bool = False,
                 seed: int = 0, size: tuple[int, int] | None = None, batch: int = 1,
                 loras: Sequence[tuple[str, float]] = (), device: str = "auto", dtype: str = "auto",
                 allow_pickle: bool = False, log: Callable[[str], None] = print, prediction: str | None = None,
                 zero_terminal_snr: bool = False, spacing: str | None = None, guidance_rescale: float | None = None,
                 max_tokens: int = 75, compile: bool = False) -> list[Path]:  # fmt: skip
    """`eri sample`: render `batch` images per prompt (image k seeded seed + k) into
    `out/NNNNN-SEED.png`, each alone (batch 1) so its metadata repeats it exactly.

    size None: 1024x1024 for SDXL, 512x512 for SD1.5. dtype "auto": bf16 on CUDA, else fp32.
    zero_terminal_snr: the rescaled schedule and v-prediction; spacing / guidance_rescale None:
    `sampling_defaults`. max_tokens: 75, 150 or 225 (75-token chunks; longer prompts are cut).
    compile: `Pipeline.compile` (pays off from a few images on).
    """
    if max_tokens not in (75, 150, 225):
        raise PipelineError(f"--max-tokens {max_tokens} is invalid: use 75, 150 or 225")
    if zero_terminal_snr and prediction == "epsilon":
        raise PipelineError("--zero-terminal-snr needs a v-prediction model: leave out --prediction epsilon")
    for path, _ in loras:
        if not os.path.isfile(path):
            raise PipelineError(f"--lora {path}: file not found; pass FILE[:SCALE] with an existing .safetensors file")
    if batch < 1:
        raise PipelineError(f"--batch {batch} is invalid: use 1 or more")
    if os.path.isdir(model):
        raise PipelineError(f"--model {model}: is a folder; diffusers folders are not read: pass the single-file "
                            "checkpoint (.safetensors)")  # fmt: skip
    writable_folder(out)
    dev = resolve_device(device, "--device", prefer_mps=True)
    dtype = ("bf16" if dev.type == "cuda" else "fp32") if dtype == "auto" else dtype
    if dtype not in DTYPES:
        raise PipelineError(f"--dtype {dtype} is unknown: use auto, bf16, fp16 or fp32")
    log(f"loading {model} ({dtype}) on {dev}")
    pipe = Pipeline.from_checkpoint(model, dev, DTYPES[dtype], loras, allow_pickle, prediction=prediction,
                                    zero_terminal_snr=zero_terminal_snr, max_tokens=max_tokens)  # fmt: skip
    size = size or pipe.family.default_size
    pipe.check_size(size)
    if compile:
        log("compiling the UNet and the VAE decoder (the first image waits for it)")
        pipe.compile()
    default_spacing, default_rescale = sampling_defaults(zero_terminal_snr)
    spacing = spacing or default_spacing
    guidance_rescale = default_rescale if guidance_rescale is None else guidance_rescale
    tokenizer = CLIPTokenizer()
    for prompt in prompts:
        if (n := len(tokenizer.encode(prompt))) > max_tokens:
            log(f"prompt of {n} tokens cut to --max-tokens {max_tokens}: {prompt[:60]}…")
    lora_info = tuple((Path(p).name, sha256_prefix(p), float(s)) for p, s in loras)
    base = dict(negative=negative, sampler=sampler, karras=karras, steps=steps, cfg=float(cfg), size=tuple(size),
                model=Path(model).name, model_sha256=sha256_prefix(model), family=pipe.family.name, dtype=dtype,
                loras=lora_info, prediction=pipe.prediction, zero_terminal_snr=zero_terminal_snr, spacing=spacing,
                guidance_rescale=float(guidance_rescale), max_tokens=max_tokens)  # fmt: skip
    paths, k = [], 0
    for prompt in prompts:
        cond, uncond = pipe.encode([prompt], negative)
        for _ in range(batch):
            params = SampleParams(prompt=prompt, seed=seed + k, **base)
            image = pipe.generate(cond, uncond, [params.seed], steps, cfg, sampler, karras, params.size,
                                  spacing=spacing, guidance_rescale=guidance_rescale)[0]  # fmt: skip
            paths.append(save_new_png(image, out, str(params.seed), params.png_info()))
            log(f"wrote {paths[-1]}")
            k += 1
    return paths


# -- validation images during training -----------------------------------------------------
def make_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Images of one size in a grid, row-major, `cols` per row."""
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


class Validation:
    """Validation grids during training: every prompt of `[sample]` (rows) × every seed (columns;
    none given = seed 0), the same seeds each call, to `out_dir/samples/step{N:06d}.png`.

    Build it before the trainer frees the VAE / text encoders: it keeps the VAE, and with
    `encode_now=True` (text encoders not trained) encodes the prompts once and drops the text
    encoders, so they can be freed; otherwise it re-encodes each call (their LoRA changes).
    Uses its own CPU generators only: the training RNG streams are untouched.
    """

    def __init__(self, components: checkpoint.Components, cfg, out_dir: str | os.PathLike, encode_now: bool = False,
                 prediction: str | None = None, zero_terminal_snr: bool = False, max_tokens: int = 75):  # fmt: skip
        # zero-terminal SNR: trailing spacing and CFG rescale 0.7 (`sampling_defaults`) in `generate`
        self.pipe = Pipeline(components, prediction=prediction, zero_terminal_snr=zero_terminal_snr,
                             max_tokens=max_tokens)  # fmt: skip
        self.pipe.check_size(tuple(cfg.size))  # at start-up, not at the first preview mid-run
        self.cfg = cfg
        self.folder = Path(out_dir) / "samples"
        self.seeds = list(cfg.seeds) or [0]
        self.text: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
        if encode_now:
            self.text = self.pipe.encode(list(cfg.prompts), cfg.negative)
            self.pipe.drop_text_encoders()

    def render(self) -> Image.Image:
        c, pipe = self.cfg, self.pipe
        modes = [(m, m.training) for m in pipe.text_modules]
        try:
            for m, _ in modes:
                m.eval()
            cond, uncond = self.text or pipe.encode(list(c.prompts), c.negative)
        finally:
            for m, mode in modes:
                m.train(mode)
        n = len(self.seeds)
        images = []
        for i in range(len(c.prompts)):  # one prompt at a time: little memory next to training
            rows = {k: v[i : i + 1].expand(n, *v.shape[1:]) for k, v in cond.items()}
            un = {k: v[i : i + 1].expand(n, *v.shape[1:]) for k, v in uncond.items()}
            images += pipe.generate(rows, un, self.seeds, c.steps, c.cfg, c.sampler, False, tuple(c.size))
        return make_grid(images, cols=n)

    def __call__(self, step: int, writer=None) -> Path:
        """Render, write `samples/step{step:06d}.png` atomically, and add it to `writer`
        (a tensorboard SummaryWriter) when given; returns the path."""
        grid = self.render()
        info = PngInfo()
        meta = {"step": step, "prompts": list(self.cfg.prompts), "negative": self.cfg.negative, "seeds": self.seeds,
                "sampler": self.cfg.sampler, "steps": self.cfg.steps, "cfg": self.cfg.cfg, "size": list(self.cfg.size)}
        info.add_text("eridiffusion", json.dumps(meta, ensure_ascii=False))
        path = self.folder / f"step{step:06d}.png"
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG", pnginfo=info))
        if writer is not None:
            import numpy as np

            writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        return path
