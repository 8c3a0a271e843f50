"""Adapters whose update is applied through their full ΔW: the layer side shared by LoHa, LoKr
and DoRA.

LoRA applies `up(down(x))` without forming ΔW; LoHa (Hadamard product) and LoKr (Kronecker
product) have no such cheap factorised forward, so `WeightDelta` builds ΔW (fp32, the base
weight's shape) each step and runs the layer's own op with it:

    y = layer(x) + multiplier · op(dropout(x), ΔW)       (op: F.linear or the base conv's F.conv2d)

LyCORIS does the same in its non-bypass forward (`lycoris/modules/loha.py` `forward`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eridiffusion.errors import LoRAError
from eridiffusion.networks.base import Adapter
from eridiffusion.networks.lora import Rows


class LayerOp:
    """How one frozen layer maps x with a given weight: a Linear, a Conv2d (its stride /
    padding / dilation), or a row block of a fused weight (`Rows`, linear, no bias, no forward of
    its own). Holds the base weight/bias by reference (the model's Parameters)."""

    def __init__(self, base: nn.Module | Rows):
        if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise LoRAError(f"groups={base.groups}, padding_mode={base.padding_mode!r} unsupported; exclude it from targets")
        if not isinstance(base, (nn.Linear, nn.Conv2d, Rows)):
            raise LoRAError(f"cannot adapt a {type(base).__name__} (Linear, Conv2d or fused q/k/v rows only)")
        self.rows = base if isinstance(base, Rows) else None
        self.weight = None if self.rows is not None else base.weight
        self.bias = None if self.rows is not None else base.bias
        self.conv = (base.stride, base.padding, base.dilation) if isinstance(base, nn.Conv2d) else None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.rows.shape if self.rows is not None else self.weight.shape)

    @property
    def device(self) -> torch.device:
        return (self.rows.weight if self.rows is not None else self.weight).device

    def target(self) -> torch.Tensor:
        return self.rows.get() if self.rows is not None else self.weight

    def apply(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.conv is not None:
            return F.conv2d(x, w, bias, *self.conv)
        return F.linear(x, w, bias)

    def base(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.rows is not None:
            return x.new_zeros(*x.shape[:-1], self.shape[0])  # the fused projection is the attention's own
        return self.apply(x, self.weight, self.bias)


class WeightDelta(Adapter):
    """An adapter on one layer whose update is op(dropout(x), multiplier · ΔW); subclasses define
    `delta_weight()` (fp32, the base weight's shape) and their parameters."""

    def _init_layer(self, base: nn.Module | Rows, rank: int, alpha: float, dropout: float) -> None:
        self.layer = LayerOp(base)
        # the Linear / Conv2d names stay visible (`weight`, `bias`), as on LoRALinear
        if self.layer.weight is not None:
            self.weight, self.bias = self.layer.weight, self.layer.bias
        self.rank, self.alpha = int(rank), float(alpha)
        self.multiplier, self.merged = 1.0, False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _param(self, name: str, *shape: int) -> nn.Parameter:
        """A new fp32 parameter `name` (its file suffix), zeros; listed in `adapter_params`."""
        p = nn.Parameter(torch.zeros(*shape, device=self.layer.device, dtype=torch.float32))
        setattr(self, name, p)
        self.param_names = (*getattr(self, "param_names", ()), name)
        return p

    def target(self) -> torch.Tensor:
        return self.layer.target()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.base(x)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.apply(self.dropout(x), (self.delta_weight() * self.multiplier).to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer.rows is not None:  # a q/k/v slice: LoRAQKV adds the update to the fused projection
            return self.update(x)
        return super().forward(x)

    def adapter_params(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self.param_names]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The parameters under their file suffixes (their names), detached views; alpha fp32."""
        out = {n: getattr(self, n).detach() for n in self.param_names}
        return out | {"alpha": torch.tensor(self.alpha, dtype=torch.float32)}

    @torch.no_grad()
    def _load(self, tensors) -> None:
        """Copy a file's tensors into the parameters (shapes must agree exactly)."""
        for n in self.param_names:
            p, t = getattr(self, n), tensors[n]
            if tuple(t.shape) != tuple(p.shape):
                raise LoRAError(f"{n} {tuple(t.shape)} does not fit {tuple(p.shape)}")
            p.copy_(t)
