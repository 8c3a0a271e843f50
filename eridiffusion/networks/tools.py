"""`eri lora merge` and `eri lora resize`: adapter files folded into a checkpoint, and a LoRA cut
to a lower rank.

merge: the checkpoint's parts are loaded in fp32, each adapter file is applied (`apply_lora`, in
order, each at its strength) and merged; the output holds every tensor of the input file under
its own key — the ones no adapter touches read back as the very bytes (dtype and all), the
adapted ones cast back to their file dtype — and the input's metadata.

resize (kohya `networks/resize_lora.py`'s job, SVD per module): ΔW = scale · up @ down
(flattened for a conv) = U S Vh; the new rank N keeps the N largest singular values:
up' = U_N √S_N / √scale, down' = √S_N Vh_N / √scale (conv: down' (N, in, kh, kw), up' (out, N, 1, 1)),
alpha' = scale · N, so scale' = scale and ΔW' is the best rank-N approximation. Kept energy =
Σ_{i<N} s_i² / Σ s_i². LoRA / LoCon files only: a LoHa / LoKr file does not store a conv's kernel
size, and a DoRA's ΔW depends on the base weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from safetensors.torch import save_file

from eridiffusion.errors import LoRAError
from eridiffusion.io import atomic_write
from eridiffusion.networks.files import apply_lora, load_lora
from eridiffusion.networks.lora import LoRA


def merge_into_checkpoint(ckpt: str | os.PathLike, loras: Sequence[tuple[str | os.PathLike, float]],
                          out: str | os.PathLike, allow_pickle: bool = False) -> list[str]:  # fmt: skip
    """Write `out`: `ckpt` with each (adapter file, strength) merged in; returns the changed keys."""
    from eridiffusion import checkpoint
    from eridiffusion.weights import WeightLoader

    if not loras:
        raise LoRAError("lora merge: no adapter file given; pass CKPT LORA[:STRENGTH] ...")
    c = checkpoint.load(ckpt, allow_pickle=allow_pickle)
    spans = [(p.data_ptr(), p.data_ptr() + p.nbytes, c.family.prefixes[part] + k)  # memory of each weight
             for part, model in c.items() for k, p in model.named_parameters()]  # fmt: skip

    def key_of(t: torch.Tensor) -> str:  # the weight an adapter merges into (a q/k/v slice: its fused weight)
        return next(k for start, end, k in spans if start <= t.data_ptr() < end)

    nets = apply_lora(c, [p for p, _ in loras], [s for _, s in loras])
    changed = sorted({key_of(m.target()) for net in nets.values() for m in net.loras.values()})
    for net in nets.values():
        net.merge()
        net.remove()  # the original modules back (their weights merged), so state_dict has the file's keys
    merged = {}
    for part, model in c.items():
        for k, t in model.state_dict().items():
            if c.family.prefixes[part] + k in changed:
                merged[c.family.prefixes[part] + k] = t
    with WeightLoader(ckpt, allow_pickle=allow_pickle) as f:
        metadata = dict(f.metadata or {})
        tensors = {k: merged[k].to(f.dtype(k)).contiguous() if k in merged else f.get(k) for k in f.keys()}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **metadata}))
    return changed


@torch.no_grad()
def resize(path: str | os.PathLike, rank: int, out: str | os.PathLike,
           dtype: torch.dtype = torch.float16) -> dict[str, tuple[int, int, float]]:  # fmt: skip
    """Write `out`: the LoRA at `path` with every module cut to at most `rank` by SVD;
    returns {module: (old rank, new rank, kept energy)}."""
    if rank < 1:
        raise LoRAError(f"lora resize: --rank {rank}; must be >= 1")
    weights, metadata = load_lora(path)
    tensors, report = {}, {}
    for name, w in sorted(weights.items()):
        if w.cls is not LoRA:
            raise LoRAError(f"{path}: {name} is {w.cls.__name__}; lora resize reads LoRA / LoCon files only")
        up, down = w.tensors["lora_up.weight"], w.tensors["lora_down.weight"]
        r, scale = down.shape[0], w.alpha / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)) * scale  # (out, in·kh·kw)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        n = min(rank, r)
        energy = (s[:n].square().sum() / s.square().sum().clamp_min(1e-30)).item()
        root = (s[:n] / scale).sqrt()
        new_up = (u[:, :n] * root).reshape(up.shape[0], n, *up.shape[2:])
        new_down = (root[:, None] * vh[:n]).reshape(n, *down.shape[1:])
        tensors |= {f"{name}.lora_up.weight": new_up.to(dtype).contiguous(),
                    f"{name}.lora_down.weight": new_down.to(dtype).contiguous(),
                    f"{name}.alpha": torch.tensor(scale * n, dtype=torch.float32)}  # fmt: skip
        report[name] = (r, n, energy)
    meta = dict(metadata)
    if meta.get("ss_network_dim", "").isdigit():  # the linear rank; alpha keeps its ratio to it
        old = int(meta["ss_network_dim"])
        meta["ss_network_dim"] = str(min(old, rank))
        if "ss_network_alpha" in meta:
            meta["ss_network_alpha"] = str(float(meta["ss_network_alpha"]) * min(old, rank) / old)
    args = json.loads(meta.get("ss_network_args", "{}") or "{}")
    if "conv_dim" in args:
        args["conv_dim"] = str(min(int(args["conv_dim"]), rank))
        meta["ss_network_args"] = json.dumps(args)
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return report
