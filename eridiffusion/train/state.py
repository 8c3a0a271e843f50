"""The resumable state of a run: not a pickle. Tensors (the trained weights and their EMA,
optimizer moments, RNG states) go to `state-step{N}.safetensors`, everything else to `state.json`, written last
and naming the tensor file, so a crash mid-save keeps the old state; a resumed run continues
exactly (bit-identical losses on CPU).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from eridiffusion import optim
from eridiffusion.config import TrainConfig
from eridiffusion.errors import ConfigError
from eridiffusion.io import atomic_write, write_text

FORMAT = "eridiffusion-train-state/1"


def _rng_tensors(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    for name, g in generators.items():
        tensors[f"rng.gen.{name}"] = g.get_state()
    np_state, py_state = np.random.get_state(), random.getstate()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    tensors["rng.python"] = torch.tensor(py_state[1], dtype=torch.int64)
    return tensors, {"numpy": [np_state[0], *np_state[2:]], "python": [py_state[0], py_state[2]]}


def save_state(folder: Path, step: int, trainable, optimizer: torch.optim.Optimizer, sampler_state: dict,
               generators: dict[str, torch.Generator], history: list[list[float]], elapsed: float,
               cfg: TrainConfig, run_id: str = "") -> None:  # fmt: skip
    """Write the state of step `step` to `folder` (see the module docstring); `run_id` names the
    run it belongs to (runs.py: a resume into another run's folder is refused)."""
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"trained.{k}": v for k, v in trainable.state_tensors().items()})
    opt = optim.state_dict(optimizer)  # plain tensors and JSON scalars
    opt_scalars: dict[str, dict] = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                opt_scalars.setdefault(str(idx), {})[k] = v
    rng, rng_meta = _rng_tensors(generators)
    tensors.update(rng)
    name = f"state-step{step}.safetensors"
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(folder / name, lambda tmp: save_file(tensors, tmp, metadata={"step": str(step)}))
    meta = {
        "format": FORMAT, "step": step, "tensors": name,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
        "rng": rng_meta, "sampler": sampler_state, "history": history, "elapsed": elapsed, "config": cfg.to_dict(), "run_id": run_id,
    }  # fmt: skip
    write_text(folder / "state.json", json.dumps(meta))
    for old in folder.glob("state-step*.safetensors"):
        if old.name != name:
            old.unlink()


def load_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = folder / "state.json"
    if not path.is_file():
        hint = f" (a run folder? pass {folder / 'state'})" if (folder / "state" / "state.json").is_file() else ""
        raise ConfigError(f"{path}: no training state to resume from{hint}; train without train.resume first")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; start a new run")
    return meta, load_file(folder / meta["tensors"])


_DEFAULTS = TrainConfig().to_dict()


def check_resumable(folder: Path, saved: dict, cfg: TrainConfig) -> None:
    """What a state is tied to: the adapter layout, the optimizer's kind of state and the data
    order (train.seed). The rest (LRs, schedule, steps, ...) may change on resume."""
    now = cfg.to_dict()
    if {**saved["lora"], "init_from": ""} != {**now["lora"], "init_from": ""}:  # init_from only seeds a new run
        raise ConfigError(f"{folder}: the saved run used other [lora] settings; resume with the same ones")
    for section, key in (("train", "mode"), ("optim", "optimizer"), ("train", "seed")):
        old, new = saved[section].get(key, _DEFAULTS[section][key]), now[section][key]  # older: no train.mode
        if old != new:
            raise ConfigError(f"{folder}: {section}.{key} = {json.dumps(new)} but the saved run used {json.dumps(old)}; "
                              f"resume with {section}.{key}={old} or start a new run")  # fmt: skip


def restore(folder: Path, meta: dict, tensors: dict[str, torch.Tensor], trainable, opt: optim.Optim,
            generators: dict[str, torch.Generator]) -> None:  # fmt: skip
    """Put the saved trained weights, optimizer state and RNG states back."""
    prefix = "trained." if any(k.startswith("trained.") for k in tensors) else "lora."  # "lora.": older states
    trainable.load_state_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, str(folder))
    optim.load_state(opt, _optimizer_state(meta, tensors))
    _restore_rng(meta, tensors, generators)


def _optimizer_state(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, scalars in meta["optimizer"]["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    return {"state": state, "param_groups": meta["optimizer"]["param_groups"]}


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
