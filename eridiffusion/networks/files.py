"""LoRA safetensors files that ComfyUI, A1111/Forge and diffusers read: metadata, save, load, apply.

A file holds, per adapted module NAME, the tensors `NAME.<suffix>` of one adapter type; the
registry (`base.ADAPTERS`) says which class reads them, so nothing here knows suffix names.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from eridiffusion.errors import LoRAError
from eridiffusion.io import atomic_write
from eridiffusion.networks import naming as names
from eridiffusion.networks.base import ADAPTERS, Adapter, adapter_for, adapter_type, group_keys, unreadable
from eridiffusion.networks.dora import DoRA
from eridiffusion.networks.lora import LoRAQKV
from eridiffusion.networks.network import LoRANetwork, qkv_rows


@dataclass(frozen=True)
class AdapterWeights:
    """One module's tensors from a file (fp32, by suffix) and the adapter class that reads them."""

    cls: type[Adapter]
    tensors: dict[str, torch.Tensor]

    @property
    def rank(self) -> int | None:
        return self.cls.check({s: tuple(t.shape) for s, t in self.tensors.items()})[0]

    @property
    def alpha(self) -> float | None:
        """The file's alpha; rank when it has none (kohya's scale 1)."""
        a = self.tensors.get("alpha")
        return float(a.item()) if a is not None else self.rank


def _family(family):
    if not isinstance(family, str):
        return family
    from eridiffusion.checkpoint import FAMILIES

    if family not in FAMILIES:
        raise LoRAError(f"lora_metadata: family {family!r} unknown; use one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def lora_metadata(
    family,
    rank: int,
    alpha: float,
    steps: int = 0,
    epoch: int = 0,
    resolution: int | tuple[int, int] = 1024,
    num_images: int = 0,
    title: str = "LoRA",
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    prediction_type: str = "epsilon",
    algo: str = "lora",
    dora: bool = False,
    options: Mapping[str, object] | None = None,
    **extra: object,
) -> dict[str, str]:
    """kohya `ss_*` fields and the SAI model spec (kohya `library/sai_model_spec.py`), all strings.

    family: a `Family` (its `base_model_version`, `architecture`, `implementation`), or its name in
    `checkpoint.FAMILIES`. algo / dora / options: the adapter type (`inject`'s); a LoRA / LoCon is
    kohya's `networks.lora` (`ss_network_args` {conv_dim, conv_alpha} with convs), LoHa / LoKr /
    DoRA are `lycoris.kohya` with `ss_network_args` as LyCORIS's kohya `--network_args` strings
    ({"algo": "lokr", "conv_dim": "4", "conv_alpha": "4.0", "factor": "-1", ...}, `dora_wd`).
    `extra` adds more keys (e.g. `ss_training_comment`, `modelspec.trigger_phrase` as modelspec_trigger_phrase=...).
    """
    family = _family(family)
    cls = adapter_type(algo)
    cls = DoRA.of(cls) if dora else cls
    args = cls.network_args(**{k: v for k, v in (options or {}).items() if k in cls.options})
    w, h = (resolution, resolution) if isinstance(resolution, int) else resolution
    meta = {
        "ss_network_module": "lycoris.kohya" if args else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": family.base_model_version,
        "ss_v2": "False",
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_resolution": f"({w}, {h})",
        "ss_num_train_images": str(num_images),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.architecture}/lora",
        "modelspec.implementation": family.implementation,
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": prediction_type,
    }
    if conv_rank is not None:
        conv_alpha = conv_rank if conv_alpha is None else conv_alpha
        args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_alpha))} | args
    if args:
        meta["ss_network_args"] = json.dumps(args)
    for k, v in extra.items():
        meta[k.replace("modelspec_", "modelspec.", 1) if k.startswith("modelspec_") else k] = str(v)
    return meta


def save_lora(
    path: str | os.PathLike,
    networks: LoRANetwork | Iterable[LoRANetwork],
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write a kohya LoRA file atomically (`io.atomic_write`: a crash keeps the previous file).

    Parameters in `dtype`; hyperparameters (alpha) always written as fp32 scalars (a missing alpha
    reads as scale 1).
    """
    networks = [networks] if isinstance(networks, LoRANetwork) else list(networks)
    tensors: dict[str, torch.Tensor] = {}
    for net in networks:
        for name, m in net.loras.items():
            for s, t in m.state_tensors().items():
                k = f"{name}.{s}"
                if k in tensors:
                    raise LoRAError(f"save_lora: {k} comes from two networks; pass each model's network once")
                tensors[k] = t.to("cpu", torch.float32 if s in m.hyper else dtype).contiguous()
    if not tensors:
        raise LoRAError(f"save_lora: nothing to write to {path}; the networks are empty")
    header = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_lora(path: str | os.PathLike) -> tuple[dict[str, AdapterWeights], dict[str, str]]:
    """Read a LoRA safetensors file -> ({kohya name: AdapterWeights (fp32)}, metadata)."""
    path = str(path)
    if not path.endswith(".safetensors"):
        raise LoRAError(f"{path}: not a .safetensors file; LoRA files are read from safetensors only")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        modules, unknown = group_keys(f.keys(), known=True)
        if unknown:
            raise LoRAError(f"{path}: key {unknown[0]!r} is no LoRA/LyCORIS key; is this a LoRA file?")
        out = {}
        for name, suffixes in modules.items():
            cls = adapter_for(suffixes)
            if cls is None:
                raise LoRAError(f"{path}: {unreadable(name, suffixes)}")
            _, problems = cls.check({s: tuple(f.get_slice(f"{name}.{s}").get_shape()) for s in suffixes})
            if problems:
                raise LoRAError(f"{path}: {name}: {problems[0]}; the file is incomplete or damaged")
            out[name] = AdapterWeights(cls, {s: f.get_tensor(f"{name}.{s}").float() for s in suffixes})
    return out, metadata


def load_into(nets: Mapping[str, LoRANetwork], path: str | os.PathLike) -> int:
    """`lora.init_from` (kohya `--network_weights`): copy a file's adapters into freshly injected
    networks (by kind). The file must hold exactly the networks' modules, of the same type, rank,
    alpha and shapes; otherwise a one-line `LoRAError` naming the file and the first mismatch.
    Returns the number of modules loaded."""
    weights, _ = load_lora(path)
    ours = {name: (kind, m) for kind, net in nets.items() for name, m in net.loras.items()}
    missing, extra = sorted(set(ours) - set(weights)), sorted(set(weights) - set(ours))
    if missing or extra:
        raise LoRAError(f"{path}: its modules differ from the configured targets: {len(missing)} missing "
                        f"{missing[:2]}, {len(extra)} not targeted {extra[:2]}; use the targets / conv_rank / "
                        "train_text_encoder it was trained with")  # fmt: skip
    for name, w in weights.items():
        m = ours[name][1]
        mine = _adapter_class(m)
        if w.cls is not mine:
            raise LoRAError(f"{path}: {name} is {w.cls.__name__}, the config trains {mine.__name__}; "
                            "set lora.type / lora.dora as the file was trained")  # fmt: skip
        rank = mine.check({s: tuple(t.shape) for s, t in m.state_tensors().items()})[0]
        if None not in (w.rank, rank) and w.rank != rank:  # LoKr with whole factors has none: shapes decide
            raise LoRAError(f"{path}: {name} has rank {w.rank}, the config {rank}; set lora.rank / conv_rank to {w.rank}")
    for kind, net in nets.items():
        net.load_tensors({f"{n}.{s}": t for n, w in weights.items() if ours[n][0] == kind
                          for s, t in w.tensors.items()}, str(path))  # fmt: skip
    return len(weights)


def _adapter_class(m: Adapter) -> type[Adapter]:
    """The registered class (or DoRA over one) an adapter module belongs to (LoRALinear → LoRA)."""
    registered = set(ADAPTERS.values())
    return next(c for c in type(m).__mro__ if c in registered or "inner_cls" in vars(c))


def models_by_kind(components) -> dict[str, nn.Module]:
    """kohya prefix kind -> model: through `components.family.lora_parts`, or a mapping by kind."""
    if isinstance(components, Mapping):
        return {k: m for k, m in components.items() if k in names.PREFIXES and m is not None}
    parts = components.family.lora_parts
    return {kind: m for kind, part in parts.items() if (m := getattr(components, part, None)) is not None}


def apply_lora(
    components,
    path: str | os.PathLike | Sequence[str | os.PathLike],
    scale: float | Sequence[float] = 1.0,
    merge: bool = False,
) -> dict[str, LoRANetwork]:
    """Apply one or more LoRA files for inference, each with its strength.

    components: `checkpoint.Components` (its family's `lora_parts` say which model each prefix
    adapts) or a dict by kind ("unet", "te1", "te2", "te"). Each file is its own adapter on each
    layer it names; several on one layer are applied in sequence (`AdapterStack`).
    merge=True folds W += strength · ΔW into the weights (returns {}); otherwise the layers are
    wrapped and the networks are returned by kind, for `set_multiplier` / `merge` / `remove`.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    scales = [float(scale)] * len(paths) if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if len(scales) != len(paths):
        raise LoRAError(f"apply_lora: {len(paths)} files but {len(scales)} scales; give one scale per file")
    models = models_by_kind(components)
    maps: dict[str, dict] = {}
    pending: dict[str, dict[str, list[_Entry]]] = {}  # kind -> layer path -> entries, in file order
    for n, (p, s) in enumerate(zip(paths, scales)):
        for kind, name, adapter in _read_file(p, models, maps):
            mpath, _, idx = maps[kind][name]
            pending.setdefault(kind, {}).setdefault(mpath, []).append(_Entry(name, adapter, s, n, idx))
    if merge:
        for e in (e for layers in pending.values() for entries in layers.values() for e in entries):
            e.adapter.multiplier = e.strength
            e.adapter.merge()
        return {}
    networks = {}
    for kind, layers in pending.items():
        net = networks[kind] = LoRANetwork(kind)
        for mpath, entries in layers.items():
            module = maps[kind][entries[0].name][1]
            net.add_layer(models[kind], mpath, module, _units_for(module, entries))
            for e in entries:
                net.add_adapter(e.name, e.adapter, e.strength)
    return networks


class _Entry(NamedTuple):
    name: str  # kohya name
    adapter: Adapter
    strength: float
    file: int  # index of the file in the call
    qkv: int | None  # q/k/v slice of a fused attention


def _read_file(path, models: dict[str, nn.Module], maps: dict[str, dict]) -> list[tuple[str, str, Adapter]]:
    """(kind, kohya name, adapter built on its layer) for every module of one file; a one-line
    `LoRAError` when any module names no layer of the models or does not fit its layer."""
    weights, _ = load_lora(path)
    found, unmatched, misfit = [], [], []
    for name, w in weights.items():
        kind = names.kind_of(name)
        if kind not in models:
            unmatched.append(name)
            continue
        if kind not in maps:
            maps[kind] = names.name_map(models[kind], kind)
        if name not in maps[kind]:
            unmatched.append(name)
            continue
        _, module, idx = maps[kind][name]
        try:
            found.append((kind, name, w.cls.from_tensors(module if idx is None else qkv_rows(module, idx), w.tensors)))
        except LoRAError as e:
            misfit.append(f"{name} {e}")
    if unmatched or misfit:
        what = (f"{len(unmatched)} of {len(weights)} LoRA modules match no layer of the loaded model "
                f"(e.g. {', '.join(sorted(unmatched)[:3])})") if unmatched else f"{len(misfit)} LoRA modules misfit ({misfit[0]})"
        raise LoRAError(f"{path}: {what}; is it for another base model (SDXL vs SD1.5)?")
    return found


def _units_for(module: nn.Module, entries: list[_Entry]) -> list[nn.Module]:
    """What goes on one layer: its adapters in order; for a fused attention, one `LoRAQKV` per
    file (its q, k, v adapters; a slice the file does not adapt stays None)."""
    if not names.is_fused_attn(module):
        return [e.adapter for e in entries]
    per_file: dict[int, list] = {}
    for e in entries:
        per_file.setdefault(e.file, [None, None, None])[e.qkv] = e.adapter
    return [LoRAQKV(module, branches) for branches in per_file.values()]
