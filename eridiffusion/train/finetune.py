"""Full fine-tuning (`train.mode = "finetune"`): the UNet's own weights train, and with
`train.finetune_text_encoders` the text encoders' too; the VAE stays frozen.

`FullModel` is the trainable of this mode (the protocol in train/trainable.py). Precision:
with bf16 / fp16 weights and `train.master_weights` the optimizer updates an fp32 copy of each
trained weight, so its state is fp32 as well, and the model's weights are that copy rounded
after every step (mixed-precision training, Micikevicius et al. 2018, §3.1: small updates are
lost when added to fp16/bf16 weights directly). Without it the optimizer updates the model's
weights in place (its state in their dtype, or its own, such as 8-bit).

`EMA` keeps an fp32 exponential moving average of the trained weights; previews use it, and
the saved checkpoint holds it or the raw weights (`save.finetune_weights`). The checkpoint is
one file in the original key layout: the trained parts plus the VAE and text encoders as
loaded (re-read from `model.path` when the run freed them after caching).
"""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path

import torch

from eridiffusion import checkpoint, optim
from eridiffusion.checkpoint import Components
from eridiffusion.config import TrainConfig
from eridiffusion.devices import DTYPES
from eridiffusion.errors import ConfigError


class EMA:
    """An fp32 exponential moving average of `params` on `device`, updated every `every` calls of
    `step()` (one per optimizer step).

    The k-th update (k = 1, 2, …) uses diffusers' `EMAModel.get_decay(k)` with its defaults
    (`update_after_step=0`, `use_ema_warmup=False`, diffusers/training_utils.py): 0 for k = 1, so
    the average starts at the weights, then min(decay, (1 + (k−1)) / (10 + (k−1))), a warm-up
    that reaches 0.999 after ~9,000 updates. Each update is diffusers' `EMAModel.step`:
    s ← s − (1 − d)·(s − p). fp32 because a bf16 average would not move: (1 − 0.9999)·(s − p) is
    below half a bf16 ulp of s for all but the largest differences.
    """

    def __init__(self, params: list[torch.Tensor], decay: float, device: torch.device, every: int = 1):
        self.params, self.decay, self.every = list(params), decay, every
        self.shadow = [p.detach().to(device, torch.float32, copy=True) for p in self.params]
        self.steps = 0  # optimizer steps seen
        self.updates = 0  # updates made (k − 1 before the k-th)

    def decay_at(self, k: int) -> float:
        """The decay of the k-th update (diffusers `EMAModel.get_decay(k)`)."""
        step = k - 1
        return 0.0 if step <= 0 else min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        if self.steps % self.every:
            return
        self.updates += 1
        one_minus_decay = 1 - self.decay_at(self.updates)
        for s, p in zip(self.shadow, self.params):  # one tensor at a time: no second copy of the model
            s.sub_(one_minus_decay * (s - p.detach().to(s.device, s.dtype)))

    def state_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {f"ema.{n}": s for n, s in zip(names, self.shadow)}
        out["ema.counts"] = torch.tensor([self.steps, self.updates], dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
        for n, s in zip(names, self.shadow):
            s.copy_(tensors[f"ema.{n}"])
        self.steps, self.updates = (int(v) for v in tensors["ema.counts"])


@contextlib.contextmanager
def swapped(params: list[torch.Tensor], source: list[torch.Tensor] | None):
    """Within the block `params` hold `source` (cast to their dtype); the old values come back
    after it. The old values wait on the CPU, so the swap costs no device memory."""
    if source is None:
        yield
        return
    stash = [p.detach().to("cpu", copy=True) for p in params]
    with torch.no_grad():
        for p, s in zip(params, source):
            p.copy_(s)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, stash):
                p.copy_(s)


class FullModel:
    """Fine-tune mode: the weights of the UNet (and the text encoders), one param group per part
    ("unet" at `optim.unet_lr`, "te1" / "te2" / "te" at `optim.text_encoder_lr`)."""

    def __init__(self, cfg: TrainConfig, components: Components):
        self.cfg, self.family, self.components = cfg, components.family, components
        t, fam = cfg.train, components.family
        parts = ["unet"] + (list(fam.text_parts) if t.finetune_text_encoders else [])
        self.names: list[str] = []  # "part.key", the state's names
        self.params: list[torch.nn.Parameter] = []  # the model's weights: gradients land here
        self.part_of: list[str] = []
        for part in parts:
            model = getattr(components, part)
            model.requires_grad_(True)
            for key, p in model.named_parameters():
                self.names.append(f"{part}.{key}")
                self.params.append(p)
                self.part_of.append(part)
        low = t.master_weights and any(p.dtype != torch.float32 for p in self.params)
        # what the optimizer updates: fp32 copies of low-precision weights, or the weights themselves
        self.master = [torch.nn.Parameter(p.detach().float()) for p in self.params] if low else None
        self.updated = self.master if low else self.params
        device = torch.device("cpu") if t.ema_device == "cpu" else self.params[0].device
        self.ema = EMA(self.updated, t.ema_decay, device, t.ema_every_n_steps) if t.ema_decay > 0 else None
        self.networks = {}  # no adapter networks in this mode
        self.final_name = f"{cfg.save.name}.safetensors"
        self.metadata: dict[str, str] = {}  # set by train(): the run's kohya ss_* keys

    # -- what the optimizer sees --------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        o, groups = self.cfg.optim, {}
        for part, p in zip(self.part_of, self.updated):
            groups.setdefault(part, []).append(p)
        return [{"params": ps, "lr": o.unet_lr if part == "unet" else o.text_encoder_lr, "name": part}
                for part, ps in groups.items()]  # fmt: skip

    def parameters(self) -> list[torch.nn.Parameter]:
        """The model's trained weights (where backward puts gradients; clipped, all-reduced)."""
        return self.params

    def build_optimizer(self, device: torch.device) -> optim.Optim:
        """`optim.build` over `param_groups()`; with fp32 master weights the step copies the
        gradients in before and the weights out after, and the EMA follows each step."""
        opt = optim.build(self.cfg.optim, self.param_groups(), device)
        if self.master is not None:
            opt.optimizer.register_step_pre_hook(self._grads_to_master)
            opt.optimizer.register_step_post_hook(self._master_to_model)
        if self.ema is not None:
            opt.optimizer.register_step_post_hook(lambda *_: self.ema.step())
        return opt

    def _grads_to_master(self, *_) -> None:
        for m, p in zip(self.master, self.params):
            m.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def _master_to_model(self, *_) -> None:
        for m, p in zip(self.master, self.params):
            p.copy_(m)  # in place: CUDA graphs and DDP keep the same tensors
            m.grad = None

    # -- previews, saving, resume ---------------------------------------------------------------
    def eval_weights(self):
        """Around previews: the EMA weights when EMA is on (the fp32 masters, as rounded, else)."""
        return swapped(self.params, self.ema.shadow if self.ema is not None else self.master)

    def describe(self) -> str:
        t, parts = self.cfg.train, ", ".join(dict.fromkeys(self.part_of))
        n = sum(p.numel() for p in self.params)
        dtype = str(self.params[0].dtype).removeprefix("torch.")
        text = f"finetune: {n:,} trainable parameters in {parts} ({dtype}"
        text += ", fp32 master weights)" if self.master is not None else ")"
        if self.ema is not None:
            text += f"; EMA decay {t.ema_decay} on {self.ema.shadow[0].device.type} every {t.ema_every_n_steps} steps"
        return text

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = dict(zip(self.names, self.updated))
        if self.ema is not None:
            out.update(self.ema.state_tensors(self.names))
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = set(self.state_tensors())
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or extra:
            what = f"{len(missing)} missing (e.g. {missing[0]})" if missing else f"{len(extra)} unexpected (e.g. {extra[0]})"
            raise ConfigError(f"{source}: the saved weights do not fit this fine-tune ({what}); resume with the same "
                              "train.mode, train.finetune_text_encoders, train.master_weights and EMA on or off")  # fmt: skip
        for name, p in zip(self.names, self.updated):
            p.copy_(tensors[name])
        if self.master is not None:
            self._master_to_model()
        if self.ema is not None:
            self.ema.load_state_tensors(tensors, self.names)

    def step_name(self, step: int) -> str:
        return f"{self.cfg.save.name}-step{step}.safetensors"

    def save(self, path: Path, step: int, epoch: int, num_images: int, prediction: str) -> None:
        """A single-file checkpoint: the trained parts (EMA or raw) and the rest as loaded."""
        cfg, fam, c = self.cfg, self.family, self.components
        dtype = DTYPES[cfg.save.save_dtype]
        freed = tuple(p for p in fam.parts if getattr(c, p) is None)  # the VAE / text encoders after caching
        loaded = checkpoint.load(cfg.model.path, dtype=dtype, parts=freed, family=fam.name,
                                 allow_pickle=cfg.model.allow_pickle) if freed else None  # fmt: skip
        whole = Components(fam, **{p: getattr(c, p) if p not in freed else getattr(loaded, p) for p in fam.parts})
        use_ema = self.ema is not None and cfg.save.finetune_weights == "ema"
        meta = {
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": fam.architecture,
            "modelspec.implementation": fam.implementation, "modelspec.title": cfg.save.name,
            "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
            "modelspec.prediction_type": prediction, "eridiffusion.steps": str(step), "eridiffusion.epoch": str(epoch),
            "eridiffusion.num_images": str(num_images), "eridiffusion.weights": "ema" if use_ema else "raw",
            **self.metadata,
        }  # fmt: skip
        with swapped(self.params, self.ema.shadow if use_ema else self.master):
            checkpoint.save(whole, path, dtype=dtype, metadata=meta)
