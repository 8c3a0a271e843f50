"""What a run trains, and how it is saved and resumed.

`Adapters` (LoRA mode) injects the configured adapters into the family's parts and writes a
kohya-format adapter file. A full fine-tune is another class with the same methods (train/
stays unaware of which): `param_groups`, `parameters` (the tensors backward fills),
`build_optimizer(device)`, `eval_weights()` (a context around previews), `state_tensors` /
`load_state_tensors` (resume), `save(path, step, epoch, num_images, prediction)`, `final_name`, `step_name(step)`,
`networks` (the adapter networks by kind; {} for a full fine-tune), `describe()` and `metadata`
(the run's kohya `ss_*` keys from train/metadata.py, written into every saved file).
The full fine-tune is `FullModel` in train/finetune.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from eridiffusion import networks, optim
from eridiffusion.checkpoint import Components
from eridiffusion.config import TrainConfig
from eridiffusion.devices import DTYPES


def conv_rank_alpha(lo) -> tuple[int | None, float | None]:
    """`[lora]`'s LoCon rank and alpha: (None, None) without `conv_rank`; `conv_alpha` 0 means the rank."""
    if not lo.conv_rank:
        return None, None
    return lo.conv_rank, lo.conv_alpha or lo.conv_rank


def inject_adapters(cfg: TrainConfig, c: Components) -> dict:
    """Adapters on the denoiser and (lora.train_text_encoder) the family's text encoders, by kohya kind."""
    lo, fam = cfg.lora, c.family
    conv_rank, conv_alpha = conv_rank_alpha(lo)
    nets = {}
    for kind, part in fam.lora_parts.items():
        is_unet = part == "unet"
        if not is_unet and not lo.train_text_encoder:
            continue
        targets = (list(lo.unet_targets) if is_unet else []) or list(fam.lora_targets(kind, conv=bool(conv_rank)))
        nets[kind] = networks.inject(getattr(c, part), kind, lo.rank, lo.alpha, targets=targets,
                                     conv_rank=conv_rank if is_unet else None, conv_alpha=conv_alpha if is_unet else None,
                                     dropout=lo.dropout, naming=fam.unet_lora_naming if is_unet else None,
                                     algo=lo.type, dora=lo.dora, options=adapter_options(lo))  # fmt: skip
        if not is_unet:
            getattr(c, part).train()  # LoRA dropout on; previews restore the mode they find
    return nets


def adapter_options(lo) -> dict:
    """The adapter types' own settings (`networks.inject` passes each type those it takes)."""
    return {"factor": lo.factor, "decompose_both": lo.decompose_both}


class Adapters:
    """LoRA mode: the adapters by kohya kind ("unet", "te1", ...), one param group per kind."""

    def __init__(self, cfg: TrainConfig, components: Components):
        self.cfg, self.family = cfg, components.family
        self.nets = inject_adapters(cfg, components)
        if cfg.lora.init_from:  # kohya --network_weights: start from a file's adapters
            networks.load_into(self.nets, cfg.lora.init_from)
        if cfg.train.lora_dtype != "fp32":  # created fp32; bf16 halves weights and optimizer state
            for p in self.parameters():
                p.data = p.data.to(DTYPES[cfg.train.lora_dtype])
        self.networks = self.nets  # TrainResult.networks (a full fine-tune has none)
        self.final_name = f"{cfg.save.name}.safetensors"
        self.metadata: dict[str, str] = {}  # set by train(): train.metadata.training_metadata

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        return [{"params": net.lora_parameters(), "lr": o.unet_lr if kind == "unet" else o.text_encoder_lr,
                 "name": kind} for kind, net in self.nets.items()]  # fmt: skip

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for net in self.nets.values() for p in net.lora_parameters()]

    def build_optimizer(self, device: torch.device) -> optim.Optim:
        return optim.build(self.cfg.optim, self.param_groups(), device)

    def eval_weights(self):
        return contextlib.nullcontext()  # previews run the adapters as trained

    def describe(self) -> str:
        lo, n = self.cfg.lora, sum(p.numel() for p in self.parameters())
        kind = f"{lo.type}{' + DoRA' if lo.dora else ''}" + (f" from {lo.init_from}" if lo.init_from else "")
        return f"{kind}: rank {lo.rank}, alpha {lo.alpha}, {n:,} trainable parameters in {', '.join(self.nets)}"

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{kind}.{k}": v for kind, net in self.nets.items() for k, v in net.lora_state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        for kind, net in self.nets.items():
            prefix = f"{kind}."
            net.load_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, source)

    def step_name(self, step: int) -> str:
        return f"{self.cfg.save.name}-step{step}.safetensors"

    def save(self, path: Path, step: int, epoch: int, num_images: int, prediction: str) -> None:
        cfg, lo = self.cfg, self.cfg.lora
        conv_rank, conv_alpha = conv_rank_alpha(lo)
        meta = networks.lora_metadata(
            self.family, rank=lo.rank, alpha=lo.alpha, steps=step, epoch=epoch, resolution=cfg.data.resolution,
            num_images=num_images, title=cfg.save.name, conv_rank=conv_rank, conv_alpha=conv_alpha,
            prediction_type=prediction,
            algo=lo.type, dora=lo.dora, options=adapter_options(lo), **self.metadata,
        )  # fmt: skip
        networks.save_lora(path, list(self.nets.values()), metadata=meta, dtype=DTYPES[cfg.save.save_dtype])
