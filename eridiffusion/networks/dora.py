"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353), on top of
any registered adapter type (LoRA / LoCon, LoHa, LoKr): a trainable magnitude `dora_scale` times
the direction of the adapted weight,

    W' = dora_scale · (W + ΔW) / ‖W + ΔW‖          ΔW: the inner adapter's delta (alpha/r applied)

the norm per input column (over out, kh, kw) with `dora_scale` (1, in[, 1, 1]) — the layout we
write — or per output row with `dora_scale` (out, 1[, 1, 1]). At strength s the layer gets
W + s · (W' − W), so `delta_weight()` = W' − W (it depends on W: merge remembers what it added).

Why the input-column layout: ComfyUI (`comfy/weight_adapter/base.py` `weight_decompose`,
comfyanonymous/ComfyUI@9c0cf36) picks the axis by `dora_scale.shape[0] == out` and, on the
output-row axis, divides by ‖W‖ of the *base* weight instead of ‖W + ΔW‖ (Comfy-Org/ComfyUI
PR #15458, open); on the input-column axis it computes ‖W + ΔW‖ exactly as LyCORIS
(`lycoris/modules/locon.py` `apply_weight_decompose` with `wd_on_out=False`,
KohakuBlueleaf/LyCORIS@f49d30d) and A1111 (`extensions-builtin/Lora/network.py`, input columns only)
do, so a file in that layout merges the same in all three. A file with output-row `dora_scale`
(LyCORIS `wd_on_output=True`) is read with LyCORIS's ‖W + ΔW‖. Both add eps(fp32) to the norm.
Files: the inner type's keys plus `NAME.dora_scale`; metadata `lycoris.kohya` with `dora_wd`.

Initialisation: dora_scale = ‖W‖ (+ eps) per column, so W' = W exactly at step 0. The update is
applied through the full weight (`WeightDelta`), as LyCORIS's forward does; the norm is not
detached (the paper's §4.3 detach saves memory at the cost of the exact gradient).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

from eridiffusion.errors import LoRAError
from eridiffusion.networks.base import Adapter, register_modifier
from eridiffusion.networks.delta import LayerOp, WeightDelta
from eridiffusion.networks.lora import Rows

EPS = torch.finfo(torch.float32).eps


def column_norm(w: torch.Tensor, on_output: bool = False) -> torch.Tensor:
    """‖w‖ per input column (1, in, 1, …), or per output row (out, 1, …) with `on_output`; + eps."""
    if on_output:
        n = w.reshape(w.shape[0], -1).norm(dim=1)
        return n.reshape(w.shape[0], *[1] * (w.dim() - 1)) + EPS
    n = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
    return n.reshape(1, w.shape[1], *[1] * (w.dim() - 2)) + EPS


class DoRA(WeightDelta):
    """`inner` (an adapter of type `inner_cls` on the same layer) with a magnitude `dora_scale`."""

    inner_cls: type[Adapter] = Adapter

    def __init__(self, base: nn.Module | Rows, inner: Adapter, dora_scale: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self._init_layer(base, getattr(inner, "rank", 1), getattr(inner, "alpha", 0.0), dropout)
        self.inner = inner
        self.on_output = dora_scale.shape[0] == self.layer.shape[0] and dora_scale.shape[0] != 1
        self.dora_scale = nn.Parameter(dora_scale.detach().to(self.layer.device, torch.float32).clone())
        self.below: list[Adapter] = []  # adapters before this one on the layer (`AdapterStack`): part of W

    @classmethod
    @functools.cache
    def of(cls, inner_cls: type[Adapter]) -> type[DoRA]:
        """The DoRA class over `inner_cls` (reads its suffixes plus `dora_scale`)."""
        return type(f"DoRA{inner_cls.__name__}", (cls,), {
            "inner_cls": inner_cls, "suffixes": (*inner_cls.suffixes, "dora_scale"), "identifying": "dora_scale",
            "hyper": inner_cls.hyper, "algo": (), "options": inner_cls.options,
        })  # fmt: skip

    def adapter_params(self) -> list[nn.Parameter]:
        return [*self.inner.adapter_params(), self.dora_scale]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.inner.state_tensors() | {"dora_scale": self.dora_scale.detach()}

    def delta_weight(self) -> torch.Tensor:
        """W' − W (fp32): dora_scale · (W + ΔW) / ‖W + ΔW‖ − W, W including the unmerged updates of
        the adapters below this one on the layer (a later file on it patches what they left)."""
        w = self.layer.target().float()
        for b in self.below:
            w = w if b.merged else w + b.delta_weight() * b.multiplier
        adapted = w + self.inner.delta_weight()
        return adapted * (self.dora_scale / column_norm(adapted, self.on_output)) - w

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._merged_delta = self.delta_weight() * self.multiplier
            w = self.target()
            w.add_(self._merged_delta.to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.target()
            w.sub_(self._merged_delta.to(w.dtype))
            del self._merged_delta
            self.merged = False

    @classmethod
    def new(cls, base: nn.Module | Rows, rank: int, alpha: float, dropout: float = 0.0, **options) -> DoRA:
        inner = cls.inner_cls.new(base, rank, alpha, 0.0, **options)
        # ‖W‖ + eps, the very norm delta_weight divides by at ΔW = 0: W' = W exactly at step 0
        return cls(base, inner, column_norm(LayerOp(base).target().detach().float()), dropout)

    @classmethod
    def network_args(cls, **options) -> dict[str, str]:
        inner = {"algo": cls.inner_cls.algo[0]} | cls.inner_cls.network_args(**options)
        return inner | {"dora_wd": "True", "wd_on_output": "False"}

    @classmethod
    def check(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, list[str]]:
        return cls.inner_cls.check({s: v for s, v in shapes.items() if s != "dora_scale"})

    @classmethod
    def from_tensors(cls, base: nn.Module | Rows, tensors: Mapping[str, torch.Tensor]) -> DoRA:
        inner = cls.inner_cls.from_tensors(base, {s: t for s, t in tensors.items() if s != "dora_scale"})
        scale, shape = tensors["dora_scale"], LayerOp(base).shape
        ones = [1] * (len(shape) - 2)
        if tuple(scale.shape) not in ((1, shape[1], *ones), (shape[0], 1, *ones)):
            raise LoRAError(f"dora_scale {tuple(scale.shape)} fits neither the columns nor the rows of a {shape} weight")
        return cls(base, inner, scale)


register_modifier("dora_scale", DoRA.of)
