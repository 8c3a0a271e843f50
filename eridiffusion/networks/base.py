"""The adapter protocol, and the registry from file-key suffix to the adapter class that reads it.

An adapter adds a learned update ΔW to one frozen layer's weight W (a Linear, a Conv2d, or a row
block of a fused weight such as open_clip's q/k/v `in_proj_weight`):

    y = layer(x) + multiplier · ΔW x        (merged: W ← W + multiplier · ΔW)

File layout (kohya / LyCORIS, as ComfyUI `comfy/weight_adapter/` reads it): per adapted module
NAME, keys `NAME.<suffix>`. Each adapter class claims its suffixes (`suffixes`) and an
`identifying` suffix that only it writes (or a tuple of them, any one present); readers (`load_lora`, `apply_lora`, `eri inspect`,
`checkpoint.lora_modules`) group a file's keys by NAME and look the class up here, instead of
knowing suffix names themselves.

An adapter class provides (torchtune's `AdapterModule` shape, plus files):
- `adapter_params()`: the trainable parameters (fp32 master copies).
- `delta_weight()`: ΔW in fp32, shaped like the base weight, `multiplier` not applied.
- `update(x)`: the adapter's addition to the layer output, `multiplier` applied, in x.dtype;
  `base_forward(x)`: the frozen layer alone. `forward(x)` = base_forward + update.
- `state_tensors()`: {suffix: tensor}, e.g. `lora_down.weight`, `lora_up.weight`, `alpha`; the
  parameters' tensors are detached views (copying into them loads), `alpha` a new fp32 scalar.
- `from_tensors(base, tensors)` (classmethod): an adapter on `base` (a Linear / Conv2d, or the
  weight rows a fused q/k/v slice folds into) holding `tensors` ({suffix: fp32 tensor}), not
  installed anywhere; raises `LoRAError` when they do not fit `base`.
- `check(shapes)` (classmethod): (rank, [problems]) from a file's {suffix: shape}, no tensor read.
- `merge()` / `unmerge()`: fold multiplier · ΔW into the base weight (`target()`) and back.
- `multiplier` (user strength, 1.0) and `merged`; `hyper`: suffixes that are settings, not
  parameters (`alpha`): written fp32, compared by value on resume.
Several adapters on one layer (one per file) sit in an `AdapterStack`, applied in sequence.

Training builds fresh adapters by type name (`lora.type`): each class lists its names in `algo`
(`TYPES`: "lora"/"locon" → LoRA, "loha" → LoHa, "lokr" → LoKr) and provides
`new(base, rank, alpha, dropout=0.0, **options)` (ΔW = 0 at step 0; `options` the names in its
`options`, e.g. LoKr's factor / decompose_both). `network_args` are its LyCORIS `ss_network_args`.

LyCORIS types, each in its own small file beside `lora.py`, `alpha` meaning the same (scale alpha / rank):
- LoHa (`loha.py`; `hada_w1_a/hada_w1_b/hada_w2_a/hada_w2_b`): ΔW = (alpha/r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b).
- LoKr (`lokr.py`; `lokr_w1` | `lokr_w1_a/lokr_w1_b`, `lokr_w2` | `lokr_w2_a/lokr_w2_b`):
  ΔW = kron(w1, w2), alpha / r applied only when a factor is low-rank.
- DoRA (`dora.py`): `dora_scale` beside another type's keys, a *modifier* (`MODIFIERS`): the class
  reading the other keys, wrapped (`DoRA.of(cls)`); ComfyUI's `weight_decompose`.
Tucker cores (`hada_t1/t2`, `lokr_t2`, `lora_mid`) are recognised, not applied (`LYCORIS_SUFFIXES`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar

import torch
from torch import nn

from eridiffusion.errors import LoRAError

# Suffixes of LyCORIS variants we recognise but cannot apply (for detection and messages).
LYCORIS_SUFFIXES = {
    **{s: "LoHa with a Tucker core" for s in ("hada_t1", "hada_t2")},
    "lokr_t2": "LoKr with a Tucker core",
    "lora_mid.weight": "LoCon with a Tucker core",
}


class Adapter(nn.Module):
    """Base of the adapter classes: the protocol in the module docstring, generic merge/unmerge."""

    suffixes: ClassVar[tuple[str, ...]] = ()
    identifying: ClassVar[str | tuple[str, ...]] = ""
    hyper: ClassVar[tuple[str, ...]] = ("alpha",)  # compared by value on resume, not copied
    algo: ClassVar[tuple[str, ...]] = ()  # names in `lora.type` that train this class (`TYPES`)
    options: ClassVar[tuple[str, ...]] = ()  # keyword options of `new` (e.g. LoKr's factor)

    multiplier: float = 1.0
    merged: bool = False

    def adapter_params(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def update(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def base_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, base: nn.Module | torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> Adapter:
        raise NotImplementedError

    @classmethod
    def check(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, list[str]]:
        raise NotImplementedError

    @classmethod
    def new(cls, base: nn.Module | torch.Tensor, rank: int, alpha: float, dropout: float = 0.0, **options) -> Adapter:
        """A fresh adapter on `base` for training, ΔW = 0."""
        raise NotImplementedError

    @classmethod
    def network_args(cls, **options) -> dict[str, str]:
        """LyCORIS `ss_network_args` entries of this type ({} for kohya's networks.lora)."""
        return {}

    def target(self) -> torch.Tensor:
        """The weight (or row block of a fused weight) that `merge` folds ΔW into."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        return out if self.merged else out + self.update(x).to(out.dtype)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        w = self.target()
        w.add_((self.delta_weight() * (sign * self.multiplier)).to(device=w.device, dtype=w.dtype))

    def merge(self) -> None:
        """Fold multiplier · ΔW into the base weight (in its dtype: bf16 makes unmerge inexact)."""
        if not self.merged:
            self._fold(1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._fold(-1.0)
            self.merged = False


class AdapterStack(nn.Module):
    """Several adapters on one layer (one per LoRA file), applied in sequence, each with its own
    strength: base(x) + Σ update_i(x); merged ones are already in the base weight."""

    def __init__(self, adapters: Iterable[nn.Module]):
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        # an adapter whose ΔW depends on the weight (DoRA, `below`) sees the ones before it on its
        # layer (or q/k/v slice) as part of W: the sequential patching ComfyUI and merge() do
        for i, unit in enumerate(self.adapters):
            for j, a in enumerate(_branches(unit)):
                if a is not None and hasattr(a, "below"):
                    a.below = [b for prev in self.adapters[:i] if (b := _branches(prev)[j]) is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.adapters[0].base_forward(x)
        for a in self.adapters:
            if not a.merged:
                out = out + a.update(x).to(out.dtype)
        return out

    def merge(self) -> None:
        for a in self.adapters:
            a.merge()

    def unmerge(self) -> None:
        for a in self.adapters:
            a.unmerge()


def _branches(unit: nn.Module) -> list:
    """The adapters of one unit: a fused attention's q/k/v branches (`LoRAQKV`), or the unit itself."""
    return list(unit.branches) if hasattr(unit, "branches") else [unit]


# identifying suffix -> adapter class
ADAPTERS: dict[str, type[Adapter]] = {}
# `lora.type` name -> adapter class
TYPES: dict[str, type[Adapter]] = {}
# modifier suffix -> wrap(class reading the module's other suffixes) -> class reading them all (DoRA)
MODIFIERS: dict[str, Callable[[type[Adapter]], type[Adapter]]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Make `cls` the reader of files whose modules carry `cls.identifying` (a class decorator)."""
    idents = (cls.identifying,) if isinstance(cls.identifying, str) else tuple(cls.identifying)
    for ident in idents:
        if ident not in cls.suffixes:
            raise LoRAError(f"register_adapter: {cls.__name__}.identifying {ident!r} is not one of its suffixes")
        other = ADAPTERS.get(ident)
        if other is not None and other is not cls:
            raise LoRAError(f"register_adapter: suffix {ident!r} is already read by {other.__name__}")
    ADAPTERS.update(dict.fromkeys(idents, cls))
    TYPES.update(dict.fromkeys(cls.algo, cls))
    return cls


def register_modifier(suffix: str, wrap: Callable[[type[Adapter]], type[Adapter]]) -> None:
    """A suffix that joins another type's keys (DoRA's `dora_scale`): `adapter_for` wraps the class
    reading the rest with `wrap`."""
    MODIFIERS[suffix] = wrap


def adapter_type(name: str) -> type[Adapter]:
    """The class `lora.type = name` trains."""
    if name not in TYPES:
        raise LoRAError(f"adapter type {name!r} unknown; use one of {sorted(TYPES)}")
    return TYPES[name]


def _suffixes(known: bool) -> list[str]:
    names = {s for cls in ADAPTERS.values() for s in cls.suffixes} | set(MODIFIERS)
    names |= set(LYCORIS_SUFFIXES) if known else set()
    return sorted(names, key=len, reverse=True)  # longest first: "lora_up.weight" before "weight"


def split_key(key: str, known: bool = False) -> tuple[str, str] | None:
    """(module name, suffix) of a file key whose suffix a registered adapter claims (with
    `known`, also the LyCORIS suffixes we cannot apply yet), else None."""
    for s in _suffixes(known):
        if key.endswith("." + s):
            return key[: -len(s) - 1], s
    return None


def group_keys(keys: Iterable[str], known: bool = False) -> tuple[dict[str, set[str]], list[str]]:
    """({module name: {suffix, …}}, keys no adapter claims); `known` as in `split_key`."""
    modules: dict[str, set[str]] = {}
    unknown = []
    for key in keys:
        split = split_key(key, known)
        if split is None:
            unknown.append(key)
        else:
            modules.setdefault(split[0], set()).add(split[1])
    return modules, unknown


def adapter_for(suffixes: Iterable[str]) -> type[Adapter] | None:
    """The registered class that reads one module's suffixes, or None."""
    suffixes = set(suffixes)
    for modifier, wrap in MODIFIERS.items():
        if modifier in suffixes:
            inner = adapter_for(suffixes - {modifier})
            return None if inner is None else wrap(inner)
    for ident, cls in ADAPTERS.items():
        if ident in suffixes and suffixes <= set(cls.suffixes):
            return cls
    return None


def unreadable(name: str, suffixes: Iterable[str]) -> str:
    """Why no registered adapter reads module `name` with these suffixes, for a one-line error."""
    suffixes = sorted(suffixes)
    kinds = sorted({LYCORIS_SUFFIXES[s] for s in suffixes if s in LYCORIS_SUFFIXES})
    if kinds:
        return f"{name}: {'/'.join(kinds)} ({', '.join(suffixes)}) is not supported"
    return f"{name}: no adapter type reads {', '.join(suffixes)} together (registered: {', '.join(sorted(ADAPTERS))})"
