"""Optimizers by name, their `optim.args`, LR schedules and a resumable optimizer state.

`OPTIMIZERS` maps `optim.optimizer` to a `Spec`: how to build it from param groups, which of
the config's fields it takes (lr, betas, eps, weight_decay) and what `optim.args` may add. A
name whose library is an optional extra imports it inside `load` and, when it is missing, says
which `pip install` brings it. The param-group keys the config sets are `Optim.config_keys`: on
resume those are this run's, every other key (an optimizer's own state such as Prodigy's `d`)
is the saved one's.

Add an optimizer: one `register(Spec(...))` line with a constructor, or a `load` that imports
its library and returns one.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from eridiffusion.errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
INSTALL = "pip install 'eridiffusion[optim]'"


@dataclass(frozen=True)
class Spec:
    """How to build one optimizer: `make(groups, **kwargs)` (or the constructor `load(optim.args)`
    imports) returns it; `takes` lists the config fields it accepts (passed as keyword arguments
    unless `optim.args` sets them); `fast` adds fused / foreach kernels on devices that have them;
    `options` are `optim.args` keys `load` reads itself (not passed on)."""

    name: str
    make: Callable[..., torch.optim.Optimizer] | None = None
    takes: tuple[str, ...] = ("lr", "weight_decay")
    fast: bool = False
    notes: str = ""  # shown in docs and in the start line (e.g. "lr is a multiplier")
    extra: str = ""  # the optional extra that brings its library
    defaults: dict = field(default_factory=dict)
    load: Callable[[dict], Callable[..., torch.optim.Optimizer]] | None = None
    options: tuple[str, ...] = ()
    schedule_free: bool = False  # no LR schedule; the warmup goes to the optimizer's own warmup_steps
    one_lr: bool = False  # every param group at one LR (or 0): Prodigy estimates one step size

    def constructor(self, args: dict) -> Callable[..., torch.optim.Optimizer]:
        return self.make if self.load is None else self.load(args)


OPTIMIZERS: dict[str, Spec] = {}
ADAM = ("lr", "betas", "eps", "weight_decay")


def register(spec: Spec) -> Spec:
    OPTIMIZERS[spec.name] = spec
    return spec


def _library(module: str, optimizer: str):
    """Import an optional library (quietly: torchao logs every CUDA kernel it cannot load on CPU)."""
    quiet = logging.getLogger(module.split(".")[0])
    level, quiet.level = quiet.level, logging.ERROR
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"optim.optimizer = {optimizer!r} needs the {module.split('.')[0]} package: "
                          f"{INSTALL}") from None  # fmt: skip
    finally:
        quiet.level = level


def _low_bit(bits: int):
    """`adamw8bit` / `adamw4bit`: AdamW with block-quantized moments; `optim.args.backend` picks the
    library: bitsandbytes for 8 bits (the default: its fused kernel stepped SDXL rank-16 LoRA
    parameters in 70 ms on an H200, torchao's per-tensor compiled step in 840 ms,
    bench/results/optim_step_h200_2026-11-29.json), torchao (PyTorch-native) for 4 bits."""
    name = f"adamw{bits}bit"
    backends = ("torchao", "bitsandbytes") if bits == 8 else ("torchao",)

    def load(args: dict):
        backend = args.get("backend", backends[-1])
        if backend not in backends:
            raise ConfigError(f"optim.args.backend = {backend!r} is not a backend of {name}: use {' or '.join(backends)}")
        if backend == "torchao":
            return getattr(_library("torchao.optim", name), f"AdamW{bits}bit")
        return _library("bitsandbytes", name).optim.AdamW8bit

    return load


def _adafactor(args: dict):
    """torch.optim.Adafactor, or the transformers-style rule when `optim.args` names one of its
    options (kohya's recipe: scale_parameter=false, relative_step=false, warmup_init=false)."""
    from eridiffusion.adafactor import Adafactor

    return Adafactor if TRANSFORMERS_ADAFACTOR & set(args) else torch.optim.Adafactor


TRANSFORMERS_ADAFACTOR = {"scale_parameter", "relative_step", "warmup_init", "clip_threshold", "decay_rate", "beta1"}


def _from(module: str, attr: str, name: str):
    return lambda args: getattr(_library(module, name), attr)


register(Spec("adamw", torch.optim.AdamW, ADAM, fast=True))
register(Spec("adam", torch.optim.Adam, ADAM, fast=True))
register(Spec("sgd", torch.optim.SGD, ("lr", "weight_decay")))
register(Spec("adamw8bit", takes=ADAM, load=_low_bit(8), options=("backend",), extra="optim",
              notes="AdamW with 8-bit moments (bitsandbytes; optim.args.backend = \"torchao\" for torchao)"))
register(Spec("adamw4bit", takes=ADAM, load=_low_bit(4), options=("backend",), extra="optim",
              notes="AdamW with 4-bit moments (torchao)"))
register(Spec("prodigy", takes=ADAM, load=_from("prodigyopt", "Prodigy", "prodigy"), extra="optim",
              one_lr=True, notes="the LR is a multiplier of Prodigy's own estimated step size d: 1.0 typical"))
register(Spec("adafactor", takes=("lr", "weight_decay"), load=_adafactor,
              notes="torch.optim.Adafactor; transformers-style (kohya) when optim.args sets relative_step, "
                    "scale_parameter or warmup_init"))
register(Spec("lion", takes=("lr", "weight_decay"), load=_from("lion_pytorch", "Lion", "lion"), extra="optim",
              notes="LR 3-10x below AdamW's, weight decay 3-10x above; betas via optim.args (default 0.9, 0.99)"))
register(Spec("schedulefree_adamw", takes=ADAM, load=_from("schedulefree", "AdamWScheduleFree", "schedulefree_adamw"),
              extra="optim", schedule_free=True,
              notes="no LR schedule (optim.schedule = constant); warmup goes to its own warmup_steps"))
register(Spec("came", takes=("lr", "weight_decay"), load=_from("came_pytorch", "CAME", "came"), extra="optim",
              notes="betas (3 numbers) and eps (2) via optim.args"))  # fmt: skip


@dataclass
class Optim:
    """The built optimizer, the param-group keys its config owns (see the module docstring) and
    the `[optim]` section its schedule comes from."""

    optimizer: torch.optim.Optimizer
    spec: Spec
    config_keys: frozenset[str]
    cfg: Any = None

    @contextlib.contextmanager
    def eval_mode(self):
        """Around previews and saving: an optimizer with separate evaluation weights (schedule-free:
        `optimizer.eval()` / `.train()`) switches to them and back; others do nothing. The training
        weights come back bit for bit: `.train()` recomputes them from the evaluation weights with
        rounding, so a save or preview would otherwise change the run (and a resume from a state
        saved there would not repeat the uninterrupted run)."""
        if not _switches(self.optimizer):
            yield
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        kept = [_copy(p) for p in params]
        self.optimizer.eval()
        try:
            yield
        finally:
            self.optimizer.train()
            with torch.no_grad():
                for p, k in zip(params, kept):
                    p.copy_(k)

    def warmup(self, total: int) -> int:
        return self.cfg.warmup_steps or round(self.cfg.warmup_ratio * total)

    def set_lr(self, step: int, total: int) -> None:
        """The LRs of optimizer step `step` (0-based) of `total`: the schedule's factor times each
        group's base LR; a schedule-free optimizer keeps its LR and gets the warmup instead."""
        c = self.cfg
        if self.spec.schedule_free:
            set_lr(self.optimizer, 1.0)
            if "warmup_steps" not in c.args:
                for g in self.optimizer.param_groups:
                    g["warmup_steps"] = self.warmup(total)
            return
        set_lr(self.optimizer, lr_factor(step, total, self.warmup(total), c.schedule, num_cycles=c.num_cycles,
                                         power=c.power, lr_end=c.lr_end))  # fmt: skip

    def describe(self) -> str:
        """The start line: name, LRs, its arguments and what its LR means."""
        lrs = ", ".join(f"{g.get('name', i)} {g['base_lr']:g}" for i, g in enumerate(self.optimizer.param_groups))
        args = "".join(f", {k}={v}" for k, v in self.cfg.args.items())
        notes = f" ({self.spec.notes})" if self.spec.notes else ""
        return f"optimizer: {self.spec.name}{notes}, lr {lrs}{args}"


def _copy(p: torch.Tensor) -> torch.Tensor:
    """A copy of a weight, in host memory where it is a plain tensor (a DTensor stays where it is)."""
    t = p.detach()
    return t.to("cpu", copy=True) if type(t) is torch.Tensor else t.clone()


def _switches(optimizer) -> bool:
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


def accepted_args(spec: Spec, args: dict | None = None) -> list[str]:
    """Keyword arguments `optim.args` may give (the constructor's and the spec's options)."""
    try:
        params = inspect.signature(spec.constructor(args or {})).parameters
    except (TypeError, ValueError):  # a builtin without a signature: accept anything
        return []
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [n for n, p in params.items() if n not in ("params", "self") and p.kind not in skip] + list(spec.options)


def build(cfg, groups: list[dict], device: torch.device) -> Optim:
    """The optimizer of `cfg` (the `[optim]` section) over `groups` (dicts with params, lr, name)."""
    spec = OPTIMIZERS.get(cfg.optimizer)
    if spec is None:
        raise ConfigError(f"optim.optimizer = {cfg.optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}")
    if spec.schedule_free and cfg.schedule != "constant":
        raise ConfigError(f"optim.schedule = {cfg.schedule!r} cannot be used with {spec.name}, which replaces the LR "
                          "schedule (warmup: optim.warmup_steps); set optim.schedule=constant")  # fmt: skip
    lrs = {g["lr"] for g in groups} - {0.0}
    if spec.one_lr and len(lrs) > 1:
        raise ConfigError(f"{spec.name} takes one LR for every part: set optim.text_encoder_lr = optim.unet_lr "
                          f"({cfg.unet_lr:g})")  # fmt: skip
    make = spec.constructor(cfg.args)
    accepted = accepted_args(spec, cfg.args)
    unknown = [k for k in cfg.args if accepted and k not in accepted]
    if unknown:
        raise ConfigError(f"optim.args.{unknown[0]} is not an argument of {spec.name}; it takes: "
                          f"{', '.join(a for a in accepted if a != 'lr')}")  # fmt: skip
    args = {k: v for k, v in cfg.args.items() if k not in spec.options}
    kwargs = {**spec.defaults, **{k: getattr(cfg, k) for k in spec.takes if k != "lr"}, **args}
    if "lr" in spec.takes and groups:
        kwargs.setdefault("lr", groups[0]["lr"])  # each group has its own; some constructors check this one
    if spec.fast and "fused" not in cfg.args and "foreach" not in cfg.args:
        kwargs["fused" if device.type == "cuda" else "foreach"] = True  # one kernel, not one per tensor
    for g in groups:
        g["base_lr"] = g["lr"]
    try:
        optimizer = make(groups, **kwargs)
    except (TypeError, ValueError) as e:  # a bad value in optim.args, in the library's words
        raise ConfigError(f"optim.args for {spec.name}: {str(e).splitlines()[0]}") from None
    if _switches(optimizer):
        optimizer.train()  # schedule-free starts in eval mode
    return Optim(optimizer, spec, frozenset({"lr", "base_lr", "name", *kwargs}), cfg)


def lr_factor(step: int, total: int, warmup: int, schedule: str, *, num_cycles: float = 1.0, power: float = 1.0,
              lr_end: float = 0.0) -> float:  # fmt: skip
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup, then decay.

    Warmup ramps (step+1)/(warmup+1); then with progress p = (step − warmup) / (total − warmup):
    "constant" 1, "linear" 1 − p, "cosine" 0.5·(1 + cos(πp)) (Loshchilov & Hutter 2017),
    "cosine_with_restarts" 0.5·(1 + cos(π·(num_cycles·p mod 1))) (transformers' / diffusers'
    `get_cosine_with_hard_restarts_schedule_with_warmup`), "polynomial" (1 − lr_end)·(1 − p)^power
    + lr_end with lr_end a fraction of the base LR (their `get_polynomial_decay_schedule_with_warmup`,
    whose lr_end is absolute: ours is lr_end / lr_init).
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
    if schedule == "cosine_with_restarts":
        return 0.0 if progress >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
    if schedule == "polynomial":
        return (1.0 - lr_end) * (1.0 - progress) ** power + lr_end
    raise ConfigError(f"optim.schedule = {schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        if torch.is_tensor(g["lr"]):  # torchao keeps it a tensor (its compiled step reads it)
            g["lr"].fill_(g["base_lr"] * factor)
        else:
            g["lr"] = g["base_lr"] * factor


# -- a state dict of plain tensors and JSON scalars (train/state.py writes it) -----------------
# bitsandbytes nests its quantized state in a dict, torchao keeps its moments as tensor subclasses
# (codes, scale, qmap): both become entries "name/key" (dict) and "name@part" (a subclass's inner
# tensors, with "name@" its class and constructor attributes), rebuilt on load bit for bit.
_SUBCLASSES = {"OptimState8bit": "torchao.optim.subclass_8bit", "OptimState4bit": "torchao.optim.subclass_4bit",
               "OptimStateFp8": "torchao.optim.subclass_fp8"}  # fmt: skip


def state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` whose per-parameter values are plain tensors or JSON scalars."""
    sd = optimizer.state_dict()
    state, seen = {}, set()
    for idx, st in sd["state"].items():
        state[idx] = flat = {}
        for k, v in st.items():
            if isinstance(v, dict):
                flat.update({f"{k}/{kk}": vv for kk, vv in v.items()})
            elif torch.is_tensor(v) and type(v).__name__ in _SUBCLASSES:
                names, ctx = v.__tensor_flatten__()
                flat.update({f"{k}@{n}": getattr(v, n) for n in names})
                flat[f"{k}@"] = {"type": type(v).__name__, "ctx": [_encode(c) for c in ctx]}
            else:
                flat[k] = v
        for k, v in flat.items():  # bitsandbytes shares one qmap between parameters: a file holds each once
            if torch.is_tensor(v):
                if v.untyped_storage().data_ptr() in seen:
                    flat[k] = v.clone()
                seen.add(flat[k].untyped_storage().data_ptr())
    groups = [{k: v.item() if torch.is_tensor(v) else v for k, v in g.items()} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}  # torchao's lr is a tensor


def _encode(v):
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    return v


def _decode(v):
    if isinstance(v, dict) and "dtype" in v:
        return getattr(torch, v["dtype"])
    return torch.Size(v["size"]) if isinstance(v, dict) and "size" in v else v


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        if "/" in k:
            name, sub = k.split("/", 1)
            out.setdefault(name, {})[sub] = v
        elif "@" not in k:
            out[k] = v
    for k, meta in flat.items():
        if k.endswith("@"):
            name, kind = k[:-1], meta["type"]
            if kind not in _SUBCLASSES:
                raise ConfigError(f"optimizer state {name}: unknown tensor type {kind!r}")
            cls = getattr(importlib.import_module(_SUBCLASSES[kind]), kind)
            inner = {n: flat[f"{name}@{n}"] for n in cls.tensor_attrs}
            out[name] = cls.__tensor_unflatten__(inner, [_decode(c) for c in meta["ctx"]], None, None)
    return out


def load_state(optim: Optim, state: dict) -> None:
    """Restore a `state_dict(...)`, keeping this run's config-owned group keys (LRs, betas, weight
    decay, fused / foreach) and the saved optimizer-owned ones (Prodigy's d, schedule-free's
    weight_sum, …); a schedule-free optimizer saved in eval mode goes back to train mode."""
    opt = optim.optimizer
    own = [{k: g[k] for k in optim.config_keys if k in g} for g in opt.param_groups]
    tuples = [{k for k, v in g.items() if isinstance(v, tuple)} for g in opt.param_groups]
    opt.load_state_dict({"state": {int(i): _unflatten(st) for i, st in state["state"].items()},
                         "param_groups": state["param_groups"]})  # fmt: skip
    for group, keys, tup in zip(opt.param_groups, own, tuples):
        group.update(keys)
        group.update({k: tuple(group[k]) for k in tup if isinstance(group.get(k), list)})  # JSON made them lists
    if _switches(opt):
        opt.train()
