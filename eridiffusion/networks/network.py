"""The adapters injected into one model, by kohya name; `inject` builds one for training."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from eridiffusion.errors import LoRAError
from eridiffusion.networks import naming as names
from eridiffusion.networks.base import Adapter, AdapterStack, adapter_type, group_keys
from eridiffusion.networks.dora import DoRA
from eridiffusion.networks.lora import LoRAQKV, Rows


class LoRANetwork(nn.Module):
    """The adapters injected into one model (`kind` "unet", "te1", "te2" or "te"), by kohya name
    (`self.loras[name]`; a second file's adapter on the same layer as `name@2`, …).

    `loras` holds each adapter with its base weights too (they share the model's Parameters), so
    train with `adapter_params()`, not `parameters()`. `remove()` puts the original layers back.
    """

    def __init__(self, kind: str, rank: int = 0, alpha: float = 0.0,
                 conv_rank: int | None = None, conv_alpha: float | None = None):  # fmt: skip
        super().__init__()
        self.kind, self.prefix = kind, names.PREFIXES[kind]
        self.rank, self.alpha, self.conv_rank, self.conv_alpha = rank, alpha, conv_rank, conv_alpha
        self.loras = nn.ModuleDict()
        self.strengths: dict[str, float] = {}  # per adapter (a file's scale); set_multiplier scales them all
        self._units: list[tuple[nn.Module, str, nn.Module | None, nn.Module]] = []  # parent, attr, original, unit

    def adapter_params(self) -> list[nn.Parameter]:
        return [p for m in self.loras.values() for p in m.adapter_params()]

    lora_parameters = adapter_params

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """kohya keys -> tensors (fp32, on the model's device), e.g. NAME.lora_down.weight, NAME.alpha."""
        return {f"{name}.{s}": t for name, m in self.loras.items() for s, t in m.state_tensors().items()}

    lora_state_dict = state_tensors

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Resume: copy this network's tensors (kohya keys, e.g. from `state_tensors` or a file)
        into its adapters. Strict: the same names, suffixes, shapes and alphas, else `LoRAError`."""
        modules, unknown = group_keys(tensors)
        mine = {n: s for n, s in modules.items() if n.startswith(self.prefix)}
        missing, extra = sorted(set(self.loras) - set(mine)), sorted(set(mine) - set(self.loras))
        if missing or extra or unknown:
            raise LoRAError(
                f"{source}: {self.kind} adapter names differ from this network: missing {missing[:3]}, "
                f"unexpected {(extra + unknown)[:3]}; resume with the same targets/ranks as the run that wrote it"
            )
        for name, m in self.loras.items():
            ref = m.state_tensors()
            got = {s: tensors[f"{name}.{s}"] for s in mine[name]}
            if set(got) != set(ref) or any(got[s].shape != ref[s].shape for s in ref) or any(
                    got[s].item() != ref[s].item() for s in ref if s in m.hyper):  # fmt: skip
                raise LoRAError(f"{source}: {name} has {_describe(got, m.hyper)}; the network has "
                                f"{_describe(ref, m.hyper)}: use the same rank/alpha")  # fmt: skip
        for name, m in self.loras.items():
            for s, t in m.state_tensors().items():
                if s not in m.hyper:
                    t.copy_(tensors[f"{name}.{s}"])  # t shares the parameter's storage

    def set_multiplier(self, multiplier: float) -> None:
        """Every adapter's strength times `multiplier` (1.0 restores the files' scales)."""
        for name, m in self.loras.items():
            m.multiplier = float(multiplier) * self.strengths.get(name, 1.0)

    def merge(self) -> None:
        for parent, attr, original, unit in self._units:
            unit.merge()
            if original is None:  # a fused attention's hook: nothing left to add
                setattr(parent, attr, None)

    def unmerge(self) -> None:
        for parent, attr, original, unit in self._units:
            unit.unmerge()
            if original is None:
                setattr(parent, attr, unit)

    def remove(self) -> None:
        """Restore the original layers (a merged update stays folded into their weights)."""
        for parent, attr, original, _ in self._units:
            setattr(parent, attr, original)
        self._units.clear()
        self.loras = nn.ModuleDict()
        self.strengths.clear()

    def add_layer(self, model: nn.Module, path: str, module: nn.Module, adapters: Sequence[nn.Module]) -> None:
        """Install `adapters` (built on `module`, in order) in place of it; for a fused attention,
        as its `qkv_adapter`. Several become an `AdapterStack`."""
        unit = adapters[0] if len(adapters) == 1 else AdapterStack(adapters)
        if names.is_fused_attn(module):
            if module.qkv_adapter is not None:
                raise LoRAError(f"{path}: already has a q/k/v adapter; remove() it or pass all files to one apply_lora call")
            module.qkv_adapter = unit
            self._units.append((module, "qkv_adapter", None, unit))
            return
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, unit)
        self._units.append((parent, attr, module, unit))

    def add_adapter(self, name: str, adapter: Adapter, strength: float = 1.0) -> str:
        """Register `adapter` under `name` (or `name@2`, … when taken); returns the key."""
        key, n = name, 1
        while key in self.loras:
            n += 1
            key = f"{name}@{n}"
        self.loras[key] = adapter
        self.strengths[key] = float(strength)
        adapter.multiplier = float(strength)
        return key


def _describe(tensors: Mapping[str, torch.Tensor], hyper: Sequence[str]) -> str:
    return ", ".join(f"{s} {t.item():g}" if s in hyper else f"{s} {tuple(t.shape)}" for s, t in sorted(tensors.items()))


def inject(
    model: nn.Module,
    kind: str,
    rank: int,
    alpha: float,
    targets: Sequence[str] | None = None,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dropout: float = 0.0,
    naming: str | None = None,
    algo: str = "lora",
    dora: bool = False,
    options: Mapping[str, object] | None = None,
) -> LoRANetwork:
    """Freeze `model` and wrap its target layers with adapters; returns the network (by kohya name).

    kind: "unet", "te1" (SDXL CLIP-L), "te2" (SDXL bigG, open_clip layout), "te" (SD1.5 CLIP-L).
    targets: fnmatch patterns over module paths (`*` crosses dots); default `UNET_TARGETS`
    (plus `UNET_CONV_TARGETS` when conv_rank is given), `TE_TARGETS`, or `TE2_TARGETS` (the
    fused `attn` gives q/k/v). Linear and 1×1 conv layers get (rank, alpha); k×k convs get
    (conv_rank, conv_alpha), conv_alpha defaulting to conv_rank (scale 1).
    naming: the UNet's kohya names, "ldm" or "diffusers" (`Family.unet_lora_naming`); None infers
    it from the model. A1111/Forge apply a te2 attention LoRA only if q, k, v and out_proj are all present.
    algo: the adapter type by `lora.type` name (`base.TYPES`: lora, locon, loha, lokr); dora wraps it
    in `DoRA`; options: settings of the type (e.g. LoKr's factor, decompose_both), those it does
    not take ignored.
    """
    cls = adapter_type(algo)
    cls = DoRA.of(cls) if dora else cls
    options = {k: v for k, v in (options or {}).items() if k in cls.options}
    if kind not in names.PREFIXES:
        raise LoRAError(f"inject: kind {kind!r} unknown; use one of {sorted(names.PREFIXES)}")
    if targets is None:
        targets = names.DEFAULT_TARGETS[kind] + (names.UNET_CONV_TARGETS if kind == "unet" and conv_rank is not None else ())
    if conv_rank is not None and conv_alpha is None:
        conv_alpha = conv_rank
    naming = naming or names.default_naming(kind, model)
    model.requires_grad_(False)
    net = LoRANetwork(kind, rank, alpha, conv_rank, conv_alpha)
    chosen = [(p, m) for p, m in names.candidates(model, kind) if any(fnmatch.fnmatchcase(p, t) for t in targets)]
    if not chosen:
        raise LoRAError(f"inject: no {kind} module matches targets {list(targets)}; check the patterns against model.named_modules()")
    for path, module in chosen:
        kohya = names.names_for(kind, path, module, model, naming)
        if not kohya:
            raise LoRAError(f"inject: {kind} module {path!r} has no kohya name; remove it from targets")
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            if conv_rank is None:
                raise LoRAError(f"inject: target {path!r} is a {module.kernel_size} conv; pass conv_rank (LoCon) or drop it from targets")
            r, a = conv_rank, conv_alpha
        else:
            r, a = rank, alpha
        _add_fresh(net, model, path, module, kohya, lambda base: cls.new(base, r, a, dropout, **options))
    return net


def _add_fresh(net: LoRANetwork, model: nn.Module, path: str, module: nn.Module, kohya: list[str], new) -> None:
    """A new adapter (ΔW = 0, `new(base)`) on one layer: on each q/k/v row block of a fused
    attention (`LoRAQKV`), else on the layer."""
    if names.is_fused_attn(module):
        unit = LoRAQKV(module, [new(qkv_rows(module, i)) for i in range(3)])
        adapters = unit.branches
    else:
        unit = new(module)
        adapters = [unit]
    net.add_layer(model, path, module, [unit])
    for name, adapter in zip(kohya, adapters):
        net.add_adapter(name, adapter)


def qkv_rows(module: nn.Module, idx: int) -> Rows:
    """The q (0), k (1) or v (2) rows of a fused attention's `in_proj_weight`."""
    d = module.in_proj_weight.shape[1]
    return Rows(module.in_proj_weight, idx * d, (idx + 1) * d)
