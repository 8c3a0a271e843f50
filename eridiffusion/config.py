"""Training configuration: frozen dataclasses loaded from a commented TOML file.

One dataclass per TOML section (`[model]`, `[data]`, `[lora]`, `[optim]`, `[train]`,
`[cache]`, `[save]`, `[log]`, `[sample]`); `TrainConfig` holds one of each. Values come
from the file, then from command-line overrides `section.field=value` (TOML value syntax;
a bare word is taken as a string, so `model.path=/models/x.safetensors` needs no quotes).
Every problem is a `ConfigError` whose message is one line naming the key, what was
expected and how to fix it. Every field is documented in docs/config.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from eridiffusion.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # single-file checkpoint (.safetensors)
    family: str = "auto"  # "auto" (from the file) or a name in eridiffusion.families.FAMILIES
    # frozen weights; fp8 (= fp8_e4m3) / fp8_e5m2: the UNet (and untrained text encoders) stored in
    # float8, each Linear / Conv cast to bf16 for its matmul (eridiffusion/fp8.py); LoRA params stay fp32
    dtype: Literal["bf16", "fp16", "fp32", "fp8", "fp8_e4m3", "fp8_e5m2"] = "bf16"
    allow_pickle: bool = False


@dataclass(frozen=True)
class SubsetConfig:
    """One `[[data.subsets]]` table: a folder and its options; None = the `[data]` field of that name."""

    dir: str = ""
    is_reg: bool = False  # regularization (prior-preservation) images, weighted by data.prior_loss_weight
    repeats: int | None = None
    resolution: int | None = None
    bucket_min: int | None = None
    bucket_max: int | None = None
    caption_ext: str | None = None
    default_caption: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout: float | None = None
    tag_dropout: float | None = None
    shuffle_tags: bool | None = None
    keep_tags: int | None = None
    random_crop: bool | None = None
    flip: bool | None = None
    upscale_small: bool | None = None
    alpha_mask: bool | None = None


# fields a subset inherits from [data] when it leaves them out
SUBSET_INHERITED = tuple(f.name for f in dataclasses.fields(SubsetConfig) if f.name not in ("dir", "is_reg"))


@dataclass(frozen=True)
class DataConfig:
    dir: str = ""  # "" = only the [[data.subsets]]
    resolution: int = 1024  # bucket area = resolution²
    bucket_step: int = 64
    bucket_min: int = 512
    bucket_max: int = 2048
    repeats: int = 1  # for images not in a kohya `N_name` folder
    caption_ext: str = ".txt"
    default_caption: str = ""  # "" = the `N_name` folder's name, else the file stem
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0  # per-tag drop probability (kohya caption_tag_dropout_rate)
    shuffle_tags: bool = False
    keep_tags: int = 0
    max_tokens: int = 75  # 75, 150 or 225: caption tokens encoded (in 75-token chunks); longer ones are cut
    random_crop: bool = False
    flip: bool = False
    upscale_small: bool = True  # images below the smallest bucket are upscaled (False: skipped)
    alpha_mask: bool = False  # an image's alpha channel is its loss mask when it has no mask file
    prior_loss_weight: float = 1.0  # loss weight of is_reg subsets' images
    validation_split: float = 0.0  # share of each subset's images held out for the validation loss
    validation_dir: str = ""  # a folder of validation images (instead of validation_split)
    subsets: tuple[SubsetConfig, ...] = ()

    def _resolve(self, s: SubsetConfig) -> SubsetConfig:
        return dataclasses.replace(s, **{k: getattr(self, k) for k in SUBSET_INHERITED if getattr(s, k) is None})

    def resolved_subsets(self) -> tuple[SubsetConfig, ...]:
        """`data.dir` (if set) then each `[[data.subsets]]`, every None filled from `[data]`."""
        own = (SubsetConfig(dir=self.dir),) if self.dir else ()
        return tuple(self._resolve(s) for s in own + self.subsets)

    def validate(self, source: str = "config") -> None:
        """Reject impossible values of `[data]` and of every subset; one line naming the field."""
        step = self.bucket_step
        _check(source, "data.bucket_step", step, step > 0 and step % 8 == 0, "a positive multiple of 8")
        _check(source, "data.prior_loss_weight", self.prior_loss_weight, self.prior_loss_weight >= 0, ">= 0")
        _check(source, "data.max_tokens", self.max_tokens, self.max_tokens in (75, 150, 225), "75, 150 or 225")
        _check(source, "data.validation_split", self.validation_split, 0.0 <= self.validation_split < 1.0,
               "in [0, 1) (0 = no images held out)")
        _check(source, "data.validation_split", self.validation_split, not (self.validation_split and self.validation_dir),
               "0 when data.validation_dir is set (one or the other)")
        tables = [("data", self)] + [(f"data.subsets[{j}]", self._resolve(s)) for j, s in enumerate(self.subsets)]
        for prefix, d in tables:
            checks = [
                ("resolution", d.resolution > 0 and d.resolution % 8 == 0, "a positive multiple of 8"),
                ("bucket_min", d.bucket_min > 0 and d.bucket_min % step == 0,
                 f"a positive multiple of data.bucket_step ({step})"),
                ("bucket_max", d.bucket_max % step == 0, f"a multiple of data.bucket_step ({step})"),
                ("bucket_min", d.bucket_min <= d.resolution, f"<= the resolution ({d.resolution})"),
                ("bucket_max", d.bucket_max >= d.resolution, f">= the resolution ({d.resolution})"),
                ("repeats", d.repeats >= 1, ">= 1"),
                ("caption_ext", re.fullmatch(r"\.[^/\\\s]+", d.caption_ext) is not None,
                 'an extension beginning with "." such as ".txt" or ".caption"'),
                ("caption_dropout", 0.0 <= d.caption_dropout <= 1.0, "between 0 and 1"),
                ("tag_dropout", 0.0 <= d.tag_dropout <= 1.0, "between 0 and 1"),
                ("keep_tags", d.keep_tags >= 0, ">= 0"),
            ]
            if prefix != "data":
                checks.insert(0, ("dir", bool(d.dir), "a folder of images (each subset needs its dir)"))
            for name, ok, expected in checks:
                _check(source, f"{prefix}.{name}", getattr(d, name), ok, expected)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 16.0
    conv_rank: int = 0  # 0 = no LoCon on ResBlock convs
    conv_alpha: float = 0.0  # 0 = same as conv_rank
    dropout: float = 0.0
    unet_targets: tuple[str, ...] = ()  # () = networks.UNET_TARGETS: attention/ff/proj
    train_text_encoder: bool = False
    type: Literal["lora", "locon", "loha", "lokr"] = "lora"  # the adapter (networks.TYPES); locon = lora + conv_rank
    factor: int = -1  # lokr: Kronecker split of each dimension near this factor; -1 = balanced (LyCORIS)
    decompose_both: bool = False  # lokr: the small factor low-rank too (LyCORIS decompose_both)
    dora: bool = False  # DoRA: a trainable magnitude (dora_scale) per input column over the adapter
    init_from: str = ""  # an adapter file of the same type/rank/targets to start from (kohya --network_weights)


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"  # a name in eridiffusion.optim.OPTIMIZERS
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the optimizer (its own names)
    unet_lr: float = 1e-4
    text_encoder_lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"] = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warmup as a share of the run's steps (instead of warmup_steps)
    num_cycles: float = 1.0  # cosine_with_restarts: cosine cycles over the run
    power: float = 1.0  # polynomial: decay exponent (1 = linear)
    lr_end: float = 0.0  # polynomial: final LR as a fraction of the base LR


@dataclass(frozen=True)
class TrainSection:
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps; 0 = run `epochs` epochs
    epochs: int = 0  # 0 = no epoch limit
    seed: int = 42
    gradient_checkpointing: bool = False
    compile: bool = False  # regional torch.compile of the UNet blocks (eridiffusion/speed.py)
    cuda_graph: bool = False  # replay forward + backward from CUDA graphs (one per bucket shape)
    fp8_matmul: bool = False  # LoRA: the frozen base's transformer GEMMs in float8 (eridiffusion/fp8_matmul.py; CUDA ≥ 8.9)
    memory_budget: float = 1.0  # with compile: share of activations the compiled regions keep (< 1 recomputes)
    keep_activations: bool = False  # with compile: keep GEGLU / LayerNorm outputs for backward (faster, more memory)
    cudnn_benchmark: bool = False  # CUDA: cuDNN times its convolution algorithms at each new shape (seconds per bucket)
    compile_workers: int = 0  # with compile + cache.precompile: processes compiling block graphs at once (0 = auto)
    max_grad_norm: float = 1.0  # 0 = no clipping
    lora_dtype: Literal["fp32", "bf16"] = "fp32"  # the trained adapter weights and their optimizer state
    prediction: Literal["auto", "epsilon", "v_prediction"] = "auto"
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0  # 0 = plain MSE
    loss: Literal["l2", "huber", "smooth_l1"] = "l2"  # huber / smooth_l1: kohya's pseudo-Huber losses
    huber_c: float = 0.1  # Huber threshold (kohya huber_c)
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"  # how the threshold varies with t
    debiased_estimation: bool = False  # weight the loss by 1/sqrt(snr) (eps) or 1/(snr+1) (v)
    ip_noise_gamma: float = 0.0  # input perturbation: x_t from noise + gamma·N(0,1), target from noise
    multires_noise_iterations: int = 0  # multi-resolution (pyramid) noise levels; 0 = off
    multires_noise_discount: float = 0.3  # weight of level i is discount^i
    min_timestep: int = 0  # training timesteps drawn from [min_timestep, max_timestep)
    max_timestep: int = 1000
    zero_terminal_snr: bool = False  # rescaled betas (Lin et al. 2023); v-prediction; trailing + CFG rescale previews
    device: str = "auto"  # auto = cuda if available else cpu
    resume: bool = False
    max_nonfinite: int = 5  # NaN/inf steps in a row that stop the run (each is skipped); 0 = no check
    fsdp: bool = False  # torchrun: shard the frozen UNet per block (FSDP2), see docs/distributed.md
    mode: Literal["lora", "finetune"] = "lora"  # finetune: the UNet's own weights train (train/finetune.py)
    finetune_text_encoders: bool = False  # finetune: the text encoders' weights train too (optim.text_encoder_lr)
    master_weights: bool = True  # finetune, bf16/fp16 weights: the optimizer updates an fp32 copy (fp32 state)
    ema_decay: float = 0.0  # finetune: EMA of the trained weights (e.g. 0.9999); 0 = off
    ema_device: Literal["gpu", "cpu"] = "gpu"  # where the fp32 EMA lives ("gpu": the training device)
    ema_every_n_steps: int = 1  # optimizer steps between EMA updates


@dataclass(frozen=True)
class CacheConfig:
    latents: bool = True
    text: bool = True  # ignored (off) while the text encoder is trained
    dir: str = ""  # "" = <save.output_dir>/cache
    compile: bool = True  # with train.compile: keep the compiled kernels in <dir>/compile for the next run
    precompile: bool = True  # with compile: keep the traced block graphs too (torch's AOT precompile, torch >= 2.10)


@dataclass(frozen=True)
class SaveConfig:
    output_dir: str = "runs/lora"
    every_n_steps: int = 0  # 0 = only at the end
    every_n_epochs: int = 0  # 0 = not per epoch
    keep_last: int = 0  # intermediate (-step) files kept, the newest; 0 = all
    save_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    name: str = "lora"  # file stem and modelspec title
    overwrite: bool = False  # replace the outputs of an earlier run in save.output_dir
    finetune_weights: Literal["ema", "raw"] = "ema"  # finetune: the checkpoint's UNet (raw when EMA is off)


@dataclass(frozen=True)
class LogConfig:
    every: int = 10  # steps between loss.csv rows / progress-bar updates
    tensorboard: bool = True
    validation_every_n_steps: int = 0  # with a validation set; 0 = once per epoch
    wandb: bool = False  # Weights & Biases (pip install 'eridiffusion[log]'; WANDB_MODE=offline works)
    wandb_project: str = "eridiffusion"


@dataclass(frozen=True)
class SampleConfig:
    prompts: tuple[str, ...] = ()  # each may carry kohya options: "a cat --n blurry --w 832 --d 3"
    prompt_file: str = ""  # kohya .txt prompt file, one prompt per line (used with prompts)
    negative: str = ""
    seeds: tuple[int, ...] = ()
    every_n_steps: int = 0
    every_n_epochs: int = 0
    at_start: bool = False  # a grid at step 0, before training
    steps: int = 30
    cfg: float = 7.0
    sampler: Literal["euler", "euler_a", "dpmpp_2m", "ddim"] = "euler"
    size: tuple[int, int] = (1024, 1024)  # width, height


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoRAConfig,
    "optim": OptimConfig,
    "train": TrainSection,
    "cache": CacheConfig,
    "save": SaveConfig,
    "log": LogConfig,
    "sample": SampleConfig,
}


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    cache: CacheConfig = field(default_factory=CacheConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a nested dict (as TOML parses it), checking names, types and values."""
        sections = {}
        for name, value in raw.items():
            if name not in SECTIONS:
                raise ConfigError(f"{source}: unknown section [{name}]{_suggest(name, SECTIONS)}")
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{name}] must be a table of fields, got {value!r}")
            sections[name] = _build_section(SECTIONS[name], name, value, source)
        cfg = cls(**sections)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_toml(cls, path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        """Load a TOML file and apply `section.field=value` overrides on top."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        if overrides:
            try:
                cls.from_dict(raw, source=path)
            except ConfigError:  # the file alone is at fault (or the command line completes it)
                return cls.from_dict(apply_overrides(raw, overrides), source=path)
            return cls.from_dict(apply_overrides(raw, overrides), source="command line")  # the file alone is valid
        return cls.from_dict(raw, source=path)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists), the inverse of `from_dict`."""
        out = {}
        for name in SECTIONS:
            sec = getattr(self, name)
            out[name] = {f.name: _plain(getattr(sec, f.name)) for f in dataclasses.fields(sec)}
        return out

    def to_toml(self) -> str:
        """The full config as TOML text (written next to a run so it can be repeated)."""
        lines = []
        for name, sec in self.to_dict().items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in sec.items()]
            lines.append("")
        return "\n".join(lines)

    def replace(self, **sections: dict[str, Any]) -> TrainConfig:
        """A copy with some fields changed: `cfg.replace(train={"max_steps": 50})`."""
        raw = self.to_dict()
        for name, fields_ in sections.items():
            if name not in raw:
                raise ConfigError(f"unknown section [{name}]{_suggest(name, SECTIONS)}")
            raw[name] = {**raw[name], **fields_}
        return TrainConfig.from_dict(raw, source="replace()")

    def validate(self, source: str = "config") -> None:
        """Reject impossible values; one line naming the field."""
        self.data.validate(source)
        lo, o, t = self.lora, self.optim, self.train
        checks = [
            ("lora.rank", lo.rank > 0, "> 0"),
            ("lora.alpha", lo.alpha > 0, "> 0"),
            ("lora.conv_rank", lo.conv_rank >= 0, ">= 0 (0 = off)"),
            ("lora.conv_alpha", lo.conv_alpha >= 0, ">= 0 (0 = same as conv_rank)"),
            ("lora.dropout", 0.0 <= lo.dropout < 1.0, "in [0, 1)"),
            ("lora.conv_rank", lo.type != "locon" or lo.conv_rank > 0, '> 0 with lora.type = "locon" (the conv rank)'),
            ("lora.factor", lo.factor == -1 or lo.factor > 0, "-1 (balanced) or > 0"),
            ("model.family", self.model.family in ("auto", *_families()), f"auto or one of {', '.join(_families())}"),
            ("optim.optimizer", o.optimizer in _optimizers(), f"one of {', '.join(_optimizers())}"),
            ("optim.unet_lr", o.unet_lr >= 0, ">= 0"),
            ("optim.text_encoder_lr", o.text_encoder_lr >= 0, ">= 0"),
            ("optim.weight_decay", o.weight_decay >= 0, ">= 0"),
            ("optim.betas", all(0.0 <= b < 1.0 for b in o.betas), "two numbers in [0, 1)"),
            ("optim.eps", o.eps > 0, "> 0"),
            ("optim.warmup_steps", o.warmup_steps >= 0, ">= 0"),
            ("optim.warmup_ratio", 0.0 <= o.warmup_ratio < 1.0, "in [0, 1)"),
            ("optim.warmup_ratio", not (o.warmup_ratio and o.warmup_steps), "0 when optim.warmup_steps is set"),
            ("optim.num_cycles", o.num_cycles > 0, "> 0"),
            ("optim.power", o.power > 0, "> 0"),
            ("optim.lr_end", 0.0 <= o.lr_end <= 1.0, "in [0, 1] (a fraction of the base LR)"),
            ("train.batch_size", t.batch_size > 0, "> 0"),
            ("train.grad_accum", t.grad_accum > 0, "> 0"),
            ("train.max_steps", t.max_steps >= 0, ">= 0 (0 = use train.epochs)"),
            ("train.epochs", t.epochs >= 0, ">= 0"),
            ("train.max_steps", t.max_steps > 0 or t.epochs > 0, "> 0, or set train.epochs > 0"),
            ("train.max_grad_norm", t.max_grad_norm >= 0, ">= 0 (0 = no clipping)"),
            ("train.memory_budget", 0.0 < t.memory_budget <= 1.0, "in (0, 1] (1 = no budget)"),
            ("train.compile_workers", t.compile_workers >= 0, ">= 0 (0 = auto, 1 = compile in the training process)"),
            ("train.memory_budget", t.memory_budget == 1.0 or t.compile,
             "1 without train.compile (the budget applies to compiled regions): set train.compile=true"),
            ("train.keep_activations", not t.keep_activations or t.compile,
             "false without train.compile (it applies to compiled regions): set train.compile=true"),
            ("train.noise_offset", t.noise_offset >= 0, ">= 0"),
            ("train.min_snr_gamma", t.min_snr_gamma >= 0, ">= 0 (0 = off)"),
            ("train.huber_c", 0.0 < t.huber_c <= 1.0, "in (0, 1]"),
            ("train.ip_noise_gamma", t.ip_noise_gamma >= 0, ">= 0 (0 = off)"),
            ("train.multires_noise_iterations", t.multires_noise_iterations >= 0, ">= 0 (0 = off)"),
            ("train.multires_noise_discount", 0.0 < t.multires_noise_discount <= 1.0, "in (0, 1]"),
            ("train.min_timestep", 0 <= t.min_timestep < t.max_timestep,
             f">= 0 and below train.max_timestep ({t.max_timestep})"),
            ("train.max_timestep", t.max_timestep <= 1000, "<= 1000 (exclusive upper bound)"),
            ("train.prediction", not (t.zero_terminal_snr and t.prediction == "epsilon"),
             'auto or v_prediction with train.zero_terminal_snr (epsilon learns nothing at SNR 0)'),
            ("train.device", re.fullmatch(r"auto|cpu|(cuda|mps)(:\d+)?", t.device) is not None,
             "auto, cpu, cuda, cuda:N or mps"),
            ("train.max_nonfinite", t.max_nonfinite >= 0, ">= 0 (0 = no check)"),
            ("train.ema_decay", 0.0 <= t.ema_decay < 1.0, "in [0, 1) (0 = off)"),
            ("train.ema_every_n_steps", t.ema_every_n_steps >= 1, ">= 1"),
            ("train.fp8_matmul", not (t.fp8_matmul and t.device.split(":")[0] in ("cpu", "mps")),
             "false on a cpu / mps device (float8 GEMMs need a CUDA GPU of compute capability 8.9 or newer, H100 / "
             "H200): set train.fp8_matmul=false or train.device=cuda"),
            ("train.fp8_matmul", not (t.fp8_matmul and (t.mode == "finetune" or t.fsdp)),
             'false with train.mode = "finetune" or train.fsdp (it quantises the frozen, unsharded base of a LoRA '
             "run): set train.fp8_matmul=false"),
            ("train.fsdp", not (t.fsdp and t.mode == "finetune"), 'false with train.mode = "finetune": FSDP2 would '
             "shard the trained weights and optimizer state, which rank 0's checkpoint and state files do not "
             "gather yet; use DDP (train.fsdp=false)"),
            ("save.every_n_steps", self.save.every_n_steps >= 0, ">= 0 (0 = only at the end)"),
            ("save.every_n_epochs", self.save.every_n_epochs >= 0, ">= 0 (0 = not per epoch)"),
            ("save.keep_last", self.save.keep_last >= 0, ">= 0 (0 = keep every file)"),
            ("save.name", _is_file_stem(self.save.name), "a plain file name (no / \\ : or leading dot)"),
            ("log.every", self.log.every > 0, "> 0"),
            ("log.validation_every_n_steps", self.log.validation_every_n_steps >= 0, ">= 0 (0 = once per epoch)"),
            ("sample.every_n_steps", self.sample.every_n_steps >= 0, ">= 0"),
            ("sample.every_n_epochs", self.sample.every_n_epochs >= 0, ">= 0"),
            ("sample.steps", self.sample.steps > 0, "> 0"),
            ("sample.cfg", self.sample.cfg >= 0, ">= 0"),
            ("sample.size", all(s > 0 and s % 8 == 0 for s in self.sample.size), "[width, height], multiples of 8"),
        ]
        for key, ok, expected in checks:
            if not ok:
                section, name = key.split(".")
                value = getattr(getattr(self, section), name)
                raise ConfigError(f"{source}: {key} = {_toml_value(_plain(value))} is invalid: must be {expected}")
        from eridiffusion.prompts import parse_prompt

        for j, prompt in enumerate(self.sample.prompts):
            parse_prompt(prompt, f"{source}: sample.prompts[{j}]")

    def check_paths(self) -> None:
        """Check the input paths exist (done when training starts, not at parse time)."""
        if not self.model.path:
            raise ConfigError("model.path is empty: set it in the config or pass model.path=/path/to/model.safetensors")
        if os.path.isdir(self.model.path):
            raise ConfigError(f"model.path = {self.model.path!r} is a folder: diffusers folders are not read; pass the "
                              "single-file checkpoint, e.g. model.path=/models/sd_xl_base_1.0.safetensors")  # fmt: skip
        if not os.path.isfile(self.model.path):
            raise ConfigError(
                f"model.path = {self.model.path!r} does not exist: pass model.path=/path/to/model.safetensors"
            )
        if not self.data.dir and not self.data.subsets:
            raise ConfigError("data.dir is empty: set it (or add [[data.subsets]]) or pass data.dir=/path/to/images")
        if self.data.dir and not os.path.isdir(self.data.dir):
            raise ConfigError(f"data.dir = {self.data.dir!r} is not a folder: pass data.dir=/path/to/images")
        for j, subset in enumerate(self.data.subsets):
            if not os.path.isdir(subset.dir):
                raise ConfigError(f"data.subsets[{j}].dir = {subset.dir!r} is not a folder: set it to a folder of images")
        if self.data.validation_dir and not os.path.isdir(self.data.validation_dir):
            raise ConfigError(f"data.validation_dir = {self.data.validation_dir!r} is not a folder: set it to a folder of images")
        if self.lora.init_from and not os.path.isfile(self.lora.init_from):
            raise ConfigError(f"lora.init_from = {self.lora.init_from!r} does not exist: set it to an adapter .safetensors file")
        if self.sample.prompt_file and not os.path.isfile(self.sample.prompt_file):
            raise ConfigError(f"sample.prompt_file = {self.sample.prompt_file!r} does not exist: set it to a .txt file")

    @property
    def cache_dir(self) -> str:
        return self.cache.dir or os.path.join(self.save.output_dir, "cache")

    @property
    def text_encoder_key(self) -> str:
        """The field that trains the text encoders in this `train.mode`."""
        return "train.finetune_text_encoders" if self.train.mode == "finetune" else "lora.train_text_encoder"

    @property
    def trains_text_encoders(self) -> bool:
        section, name = self.text_encoder_key.split(".")
        return getattr(getattr(self, section), name)


# ---------------------------------------------------------------- overrides


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of `raw` with each `section.field=value` applied.

    The value is parsed as a TOML value (`true`, `1e-4`, `[1, 2]`, `"text"`); anything that
    does not parse, and any value for a string field, is taken as the raw text.
    """
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key.count(".") != 1:
            raise ConfigError(f"override {item!r}: expected section.field=value, e.g. train.max_steps=500")
        section, name = key.split(".")
        if section not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section [{section}]{_suggest(section, SECTIONS)}")
        hints = _hints(SECTIONS[section])
        if name not in hints:
            raise ConfigError(f"override {item!r}: unknown key {key}{_suggest(name, hints, section + '.')}")
        text = text.strip()
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        if hints[name] is str or _literal_choices(hints[name]) is not None:
            value = value if isinstance(value, str) else text
        raw.setdefault(section, {})[name] = value
    return raw


# ---------------------------------------------------------------- helpers


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(name: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; valid: {', '.join(prefix + v for v in valid)}"


def _literal_choices(tp: Any) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _optional_of(tp: Any) -> Any:
    """`X` for `X | None` (a subset field that inherits from [data] when left out), else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return args[0] if args[1] is type(None) else args[1]
    return None


def _table_list_of(tp: Any) -> type | None:
    """The dataclass `C` of a `tuple[C, ...]` field (a TOML array of tables), else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _type_name(tp: Any) -> str:
    if _optional_of(tp) is not None:
        return _type_name(_optional_of(tp))
    if _table_list_of(tp) is not None:
        return "a list of tables"
    choices = _literal_choices(tp)
    if choices is not None:
        return "one of " + ", ".join(repr(c) for c in choices)
    plural = {str: "strings", int: "integers", float: "numbers"}
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural[args[0]]}"
        return f"a list of {len(args)} {plural[args[0]]}"
    if typing.get_origin(tp) is dict:
        return "a table, e.g. {name = value}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]


def _coerce(tp: Any, value: Any) -> Any:
    """Return `value` as type `tp`, or raise TypeError. int→float is the only widening."""
    if _optional_of(tp) is not None:
        return _coerce(_optional_of(tp), value)
    choices = _literal_choices(tp)
    if choices is not None:
        if value in choices:
            return value
        raise TypeError
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if len(value) != len(args):
            raise TypeError
        return tuple(_coerce(a, v) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if typing.get_origin(tp) is dict:  # a TOML table of plain values, checked by its user
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise TypeError
    raise TypeError(f"unsupported config type {tp}")


def _build_section(cls: type, section: str, values: dict[str, Any], source: str):
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in hints:
            raise ConfigError(f"{source}: unknown key {section}.{name}{_suggest(name, hints, section + '.')}")
        table = _table_list_of(hints[name])
        if table is not None and isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value):
            kwargs[name] = tuple(_build_section(table, f"{section}.{name}[{j}]", v, source) for j, v in enumerate(value))
            continue
        try:
            kwargs[name] = _coerce(hints[name], value)
        except TypeError:
            raise ConfigError(
                f"{source}: {section}.{name} expects {_type_name(hints[name])}, got {_toml_value(_plain(value))}"
            ) from None
    return cls(**kwargs)


def _families() -> tuple[str, ...]:
    from eridiffusion.families import FAMILIES

    return tuple(FAMILIES)


def _optimizers() -> tuple[str, ...]:
    from eridiffusion.optim import OPTIMIZERS  # the registry imports torch: only when validating

    return tuple(OPTIMIZERS)


def _is_file_stem(name: str) -> bool:
    """True for a name that stays inside its folder: no separator or drive, not hidden (`..`), printable."""
    return bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0:") and name.isprintable()


def _plain(value: Any) -> Any:
    """TOML-ready value: tuples as lists, a dataclass as a table of its fields that are not None."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if getattr(value, f.name) is not None}
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _check(source: str, key: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {key} = {_toml_value(_plain(value))} is invalid: must be {expected}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)
