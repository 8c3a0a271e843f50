"""LoKr: a Kronecker-product update (LyCORIS; Edalati et al. 2022, KronA, arXiv:2212.10650).

    ΔW = scale · kron(w1, w2)        reshaped to the base weight, (a·b, c·d[·kh·kw])

out = a·b and in = c·d are split by `factorization` (a ≤ b, c ≤ d, near `factor`; -1 = the most
balanced split). w1 (a, c) is the small factor, kept whole unless `decompose_both` and
rank < max(a, c)/2 (then w1_a (a, r) @ w1_b (r, c)); w2 (b, d) is low-rank, w2_a (b, r) @ w2_b
(r, d·kh·kw), when rank < max(b, d)/2, else whole ((b, d, kh, kw) for a conv). scale = alpha / r
of the low-rank factor (w2's if both are), 1 when both are whole.

File keys `lokr_w1` | `lokr_w1_a/lokr_w1_b`, `lokr_w2` | `lokr_w2_a/lokr_w2_b`, `alpha`, as LyCORIS
writes them (`lycoris/modules/lokr.py`, `lycoris/functional/general.py` `factorization`,
KohakuBlueleaf/LyCORIS@f49d30d) and ComfyUI reads them (`comfy/weight_adapter/lokr.py`
`LoKrAdapter.calculate_weight`, comfyanonymous/ComfyUI@e8f3bc5: a 4-d w2 makes w1 (a, c, 1, 1)).
Initialisation as LyCORIS: w1 (or w1_a, w1_b) and w2_a kaiming-uniform, w2 (or w2_b) zero.
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

_ALL = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m ≤ n, m · n = dimension, m near `factor` (-1: as balanced as possible);
    LyCORIS `lycoris/functional/general.py` `factorization`, e.g. 1024 → (32, 32), 360 → (8, 45)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@register_adapter
class LoKr(WeightDelta):
    suffixes = (*_ALL, "alpha")
    identifying = ("lokr_w1", "lokr_w1_a")
    algo = ("lokr",)
    options = ("factor", "decompose_both")

    def __init__(self, base: nn.Module | Rows, shapes: Mapping[str, tuple[int, ...]], alpha: float, dropout: float = 0.0):
        """`shapes`: {suffix: shape} of the factors present (w1 or w1_a/b, w2 or w2_a/b)."""
        rank = _rank(shapes)
        super().__init__()
        self._init_layer(base, rank or 1, alpha, dropout)
        self.low_rank = rank is not None
        for n in _ALL:
            if n in shapes:
                self._param(n, *shapes[n])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.low_rank else 1.0

    def _factor(self, i: int) -> torch.Tensor:
        if f"lokr_w{i}" in self.param_names:
            return getattr(self, f"lokr_w{i}").float()
        return getattr(self, f"lokr_w{i}_a").float() @ getattr(self, f"lokr_w{i}_b").float()

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self._factor(1), self._factor(2)
        if w2.dim() == 4:  # whole conv factor (b, d, kh, kw)
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2) * self.scale).reshape(self.layer.shape)

    @classmethod
    def new(cls, base: nn.Module | Rows, rank: int, alpha: float, dropout: float = 0.0,
            factor: int = -1, decompose_both: bool = False) -> LoKr:  # fmt: skip
        shape = LayerOp(base).shape
        (a, b), (c, d), kernel = factorization(shape[0], factor), factorization(shape[1], factor), shape[2:]
        shapes = {}
        if decompose_both and rank < max(a, c) / 2:
            shapes |= {"lokr_w1_a": (a, rank), "lokr_w1_b": (rank, c)}
        else:
            shapes["lokr_w1"] = (a, c)
        if rank < max(b, d) / 2:
            shapes |= {"lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d * math.prod(kernel))}
        else:
            shapes["lokr_w2"] = (b, d, *kernel)
        m = cls(base, shapes, alpha, dropout)
        with torch.no_grad():
            for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a"):
                if n in m.param_names:
                    nn.init.kaiming_uniform_(getattr(m, n), a=math.sqrt(5))  # lokr_w2 / lokr_w2_b stay 0
        return m

    @classmethod
    def network_args(cls, factor: int = -1, decompose_both: bool = False, **_) -> dict[str, str]:
        return {"algo": "lokr", "factor": str(int(factor)), "decompose_both": str(bool(decompose_both))}

    @classmethod
    def check(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, list[str]]:
        problems = []
        for i in (1, 2):
            whole, a, b = (f"lokr_w{i}{s}" for s in ("", "_a", "_b"))
            if (whole in shapes) == (a in shapes and b in shapes) or (whole in shapes and (a in shapes or b in shapes)):
                problems.append(f"needs {whole} or {a} and {b}; has {', '.join(sorted(shapes))}")
            elif whole not in shapes and (len(shapes[a]) != 2 or shapes[a][1] != shapes[b][0]):
                problems.append(f"{a} {list(shapes[a])} and {b} {list(shapes[b])} do not fit together")
        return (None if problems else _rank(shapes)), problems

    @classmethod
    def from_tensors(cls, base: nn.Module | Rows, tensors: Mapping[str, torch.Tensor]) -> LoKr:
        shapes = {n: tuple(t.shape) for n, t in tensors.items() if n in _ALL}
        w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        w2 = shapes.get("lokr_w2") or (shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1])
        shape = LayerOp(base).shape
        got = (w1[0] * w2[0], w1[1] * math.prod(w2[1:]))
        if got != (shape[0], math.prod(shape[1:])) or (len(w2) > 2 and tuple(w2[2:]) != tuple(shape[2:])):
            raise LoRAError(f"gives a {got} update for a {shape} weight")
        rank = _rank(shapes)
        m = cls(base, shapes, float(tensors["alpha"].item()) if "alpha" in tensors else float(rank or 1))
        m._load(tensors)
        return m


def _rank(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The rank alpha divides by: w2_b's when w2 is low-rank, else w1_b's, else None (ComfyUI)."""
    for n in ("lokr_w2_b", "lokr_w1_b"):
        if n in shapes:
            return shapes[n][0]
    return None
