"""LoHa: a low-rank Hadamard-product update (LyCORIS; Hyeon-Woo et al. 2022, FedPara, arXiv:2108.06098).

    ΔW = (alpha / r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)        reshaped to the base weight

w1_a, w2_a (out, r); w1_b, w2_b (r, in·kh·kw) (a conv's kernel flattened into the columns, no
Tucker core). The product has rank up to r², for the parameters of two rank-r LoRAs.

File keys `NAME.hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `alpha`, as LyCORIS writes them
(`lycoris/modules/loha.py`, KohakuBlueleaf/LyCORIS@f49d30d) and ComfyUI reads them
(`comfy/weight_adapter/loha.py` `LoHaAdapter.calculate_weight`, comfyanonymous/ComfyUI@183b377:
alpha / w1_b.shape[0], m1 = w1_a @ w1_b, m2 = w2_a @ w2_b, weight += strength · alpha · m1 ⊙ m2).
Initialisation as LyCORIS: w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1²), w2_a = 0 (ΔW = 0 at step 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from eridiffusion.errors import LoRAError
from eridiffusion.networks.base import register_adapter
from eridiffusion.networks.delta import LayerOp, WeightDelta
from eridiffusion.networks.lora import Rows

_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@register_adapter
class LoHa(WeightDelta):
    suffixes = (*_NAMES, "alpha")
    identifying = "hada_w1_a"
    algo = ("loha",)

    def __init__(self, base: nn.Module | Rows, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self._init_layer(base, rank, alpha, dropout)
        out, cols = self.layer.shape[0], math.prod(self.layer.shape[1:])
        for n, shape in zip(_NAMES, ((out, rank), (rank, cols), (out, rank), (rank, cols))):
            self._param(n, *shape)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        m1 = self.hada_w1_a.float() @ self.hada_w1_b.float()  # (out, in·kh·kw)
        m2 = self.hada_w2_a.float() @ self.hada_w2_b.float()
        return (m1 * m2 * self.scale).reshape(self.layer.shape)

    @classmethod
    def new(cls, base: nn.Module | Rows, rank: int, alpha: float, dropout: float = 0.0) -> LoHa:
        m = cls(base, rank, alpha, dropout)
        with torch.no_grad():
            nn.init.normal_(m.hada_w1_b, std=1.0)
            nn.init.normal_(m.hada_w1_a, std=0.1)
            nn.init.normal_(m.hada_w2_b, std=1.0)  # hada_w2_a stays 0
        return m

    @classmethod
    def network_args(cls, **options) -> dict[str, str]:
        return {"algo": "loha"}

    @classmethod
    def check(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, list[str]]:
        if any(n not in shapes for n in _NAMES):
            return None, [f"LoHa needs {', '.join(_NAMES)}; has {', '.join(sorted(shapes))}"]
        w1a, w1b, w2a, w2b = (shapes[n] for n in _NAMES)
        rank = w1b[0]
        if any(len(s) != 2 for s in (w1a, w1b, w2a, w2b)):
            return rank, ["hada_w* must be matrices (a Tucker core is not supported)"]
        if w1a[1] != rank or w2a[1] != w2b[0] or w1a[0] != w2a[0] or w1b[1] != w2b[1]:
            return rank, [f"hada shapes {list(w1a)} {list(w1b)} {list(w2a)} {list(w2b)} do not fit together"]
        return rank, []

    @classmethod
    def from_tensors(cls, base: nn.Module | Rows, tensors: Mapping[str, torch.Tensor]) -> LoHa:
        w1b = tensors["hada_w1_b"]
        shape = LayerOp(base).shape
        got = (tensors["hada_w1_a"].shape[0], w1b.shape[1])
        if got != (shape[0], math.prod(shape[1:])):
            raise LoRAError(f"gives a {got} update for a {shape} weight")
        if tensors["hada_w2_b"].shape[0] != w1b.shape[0]:
            raise LoRAError("hada_w2 has another rank than hada_w1; not supported")
        rank = w1b.shape[0]
        m = cls(base, rank, float(tensors["alpha"].item()) if "alpha" in tensors else float(rank))
        m._load(tensors)
        return m
