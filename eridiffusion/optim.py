"""Optimizers by name, their `optim.args`, and LR schedules.

`OPTIMIZERS` maps `optim.optimizer` to a `Spec`: how to build it from param groups, which of
the config's fields it takes (lr, betas, eps, weight_decay) and what `optim.args` may add. A
name whose library is an optional extra imports it inside `build` and says which `pip install`
is missing. The param-group keys the config sets are `Optim.config_keys`: on resume those are
this run's, every other key (an optimizer's own state such as Prodigy's `d`) is the saved one's.

Add an optimizer: one `register(Spec(...))` line with a builder that imports its library.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from eridiffusion.errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Spec:
    """How to build one optimizer. `make(groups, **kwargs)` returns it; `takes` lists the config
    fields it accepts (passed as keyword arguments unless `optim.args` sets them); `fast` adds
    fused / foreach kernels on devices that have them."""

    name: str
    make: Callable[..., torch.optim.Optimizer]
    takes: tuple[str, ...] = ("lr", "weight_decay")
    fast: bool = False
    notes: str = ""  # shown in docs and errors (e.g. "lr is a multiplier")
    extra: str = ""  # the optional extra that brings its library
    defaults: dict = field(default_factory=dict)


OPTIMIZERS: dict[str, Spec] = {}


def register(spec: Spec) -> Spec:
    OPTIMIZERS[spec.name] = spec
    return spec


register(Spec("adamw", torch.optim.AdamW, ("lr", "betas", "eps", "weight_decay"), fast=True))
register(Spec("adam", torch.optim.Adam, ("lr", "betas", "eps", "weight_decay"), fast=True))
register(Spec("sgd", torch.optim.SGD, ("lr", "weight_decay")))


@dataclass
class Optim:
    """The built optimizer and the param-group keys its config owns (see the module docstring)."""

    optimizer: torch.optim.Optimizer
    spec: Spec
    config_keys: frozenset[str]

    @contextlib.contextmanager
    def eval_mode(self):
        """Around previews and saving: an optimizer with separate evaluation weights (schedule-free:
        `optimizer.eval()` / `.train()`) switches to them; others do nothing."""
        switch = callable(getattr(self.optimizer, "eval", None)) and callable(getattr(self.optimizer, "train", None))
        if switch:
            self.optimizer.eval()
        try:
            yield
        finally:
            if switch:
                self.optimizer.train()


def accepted_args(spec: Spec) -> list[str]:
    """Keyword arguments the optimizer's constructor takes (for `optim.args` and its errors)."""
    try:
        params = inspect.signature(spec.make).parameters
    except (TypeError, ValueError):  # a builtin without a signature: accept anything
        return []
    return [n for n, p in params.items() if n not in ("params", "self") and p.kind is not p.VAR_POSITIONAL]


def build(cfg, groups: list[dict], device: torch.device) -> Optim:
    """The optimizer of `cfg` (the `[optim]` section) over `groups` (dicts with params, lr, name)."""
    spec = OPTIMIZERS.get(cfg.optimizer)
    if spec is None:
        raise ConfigError(f"optim.optimizer = {cfg.optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}")
    accepted = accepted_args(spec)
    unknown = [k for k in cfg.args if accepted and k not in accepted]
    if unknown:
        raise ConfigError(f"optim.args.{unknown[0]} is not an argument of {spec.name}; it takes: "
                          f"{', '.join(a for a in accepted if a != 'lr')}")  # fmt: skip
    kwargs = {**spec.defaults, **{k: getattr(cfg, k) for k in spec.takes if k != "lr"}, **cfg.args}
    if spec.fast and "fused" not in cfg.args and "foreach" not in cfg.args:
        kwargs["fused" if device.type == "cuda" else "foreach"] = True  # one kernel, not one per tensor
    for g in groups:
        g["base_lr"] = g["lr"]
    try:
        optimizer = spec.make(groups, **kwargs)
    except (TypeError, ValueError) as e:  # a bad value in optim.args, in the library's words
        raise ConfigError(f"optim.args for {spec.name}: {str(e).splitlines()[0]}") from None
    return Optim(optimizer, spec, frozenset({"lr", "base_lr", "name", *kwargs}))


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
    raise ConfigError(f"optim.schedule = {schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


def load_state(optim: Optim, state: dict) -> None:
    """Restore an optimizer state dict, keeping this run's config-owned group keys (LRs,
    betas, weight decay, fused / foreach) and the saved optimizer-owned ones (Prodigy's d, …)."""
    own = [{k: g[k] for k in optim.config_keys if k in g} for g in optim.optimizer.param_groups]
    optim.optimizer.load_state_dict(state)
    for group, keys in zip(optim.optimizer.param_groups, own):
        group.update(keys)
