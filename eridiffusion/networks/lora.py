"""LoRA and LoCon adapters (kohya `lora_down` / `lora_up` / `alpha` files).

LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen layer W gets a low-rank update,
    y = W x + (alpha / rank) · multiplier · up(down(dropout(x))),
`down` (rank, in) kaiming-uniform, `up` (out, rank) zero, so step 0 is the base model.
LoCon (LyCORIS) does the same for a k×k conv: `down` is a (rank, in, k, k) conv with the base
stride/padding, `up` a 1×1 conv; ΔW = (alpha / rank) · up.flatten(1) @ down.flatten(1).

`LoRA` is the registered file type; `LoRA.from_tensors` picks the module for the layer:
`LoRALinear` (Linear), `LoRAConv2d` (Conv2d), `LoRADelta` (a row block of a fused weight, no
base forward). `LoRAQKV` holds the three q/k/v adapters of open_clip's fused attention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eridiffusion import ops
from eridiffusion.errors import LoRAError
from eridiffusion.networks.base import Adapter, register_adapter


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of a fused weight (open_clip's q/k/v `in_proj_weight`, (3D, D)): what a
    q, k or v adapter folds into. Slices are taken when used, so `.to()` on the model is seen."""

    weight: nn.Parameter
    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.weight.shape[1:])

    def get(self) -> torch.Tensor:
        return self.weight[self.start:self.stop]


@register_adapter
class LoRA(Adapter):
    """lora_down / lora_up / alpha / multiplier / dropout shared by the LoRA modules.

    LoRA params stay fp32 (the master copy for the optimizer); in forward they are cast to the
    activation dtype (a rank×in copy, far cheaper than casting activations).
    """

    suffixes = ("lora_down.weight", "lora_up.weight", "alpha")
    identifying = "lora_down.weight"
    algo = ("lora", "locon")  # LoCon = LoRA with conv_rank on the k×k convs

    def _init_lora(self, down: nn.Module, up: nn.Module, rank: int, alpha: float, dropout: float):
        self.rank = rank
        self.alpha = float(alpha)
        self.multiplier = 1.0  # user strength, applied on top of alpha / rank
        self.merged = False
        self.lora_down = down
        self.lora_up = up
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapter_params(self) -> list[nn.Parameter]:
        return [self.lora_down.weight, self.lora_up.weight]

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) · up @ down in fp32, shaped like the base weight (multiplier not applied)."""
        up, down = self.lora_up.weight.float(), self.lora_down.weight.float()
        delta = up.flatten(1) @ down.flatten(1)  # (out, in·kh·kw)
        return (delta * self.scale).reshape(up.shape[0], *down.shape[1:])

    def update(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self.lora_down.weight.to(x.dtype))  # (..., rank)
        return F.linear(h, self.lora_up.weight.to(x.dtype)) * (self.scale * self.multiplier)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "lora_down.weight": self.lora_down.weight.detach(),
            "lora_up.weight": self.lora_up.weight.detach(),
            "alpha": torch.tensor(self.alpha, dtype=torch.float32),
        }

    @classmethod
    def check(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, list[str]]:
        down, up = shapes.get("lora_down.weight"), shapes.get("lora_up.weight")
        if down is None or up is None:
            return None, ["lora_down/lora_up pair incomplete"]
        if len(up) < 2 or up[1] != down[0]:
            return down[0], [f"lora_up {list(up)} does not match rank {down[0]}"]
        return down[0], []

    @classmethod
    def new(cls, base: nn.Module | Rows, rank: int, alpha: float, dropout: float = 0.0) -> LoRA:
        """A fresh LoRA (up = 0) on a Linear, a Conv2d (LoCon) or fused q/k/v rows."""
        if isinstance(base, Rows):
            return LoRADelta(base.shape[1], base.shape[0], rank, alpha, dropout, base.weight.device, base)
        return (LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear)(base, rank, alpha, dropout)

    @classmethod
    def from_tensors(cls, base: nn.Module | Rows, tensors: Mapping[str, torch.Tensor]) -> LoRA:
        """The LoRA module for `base` holding a file's tensors (alpha = rank when absent: scale 1)."""
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        rank = down.shape[0]
        alpha = float(tensors["alpha"].item()) if "alpha" in tensors else float(rank)
        shape = tuple(base.shape if isinstance(base, Rows) else base.weight.shape)
        got = (up.shape[0], *down.shape[1:])
        if math.prod(got) != math.prod(shape) or got[0] != shape[0]:
            raise LoRAError(f"gives a {got} update for a {shape} weight")
        if isinstance(base, Rows):
            m = LoRADelta(shape[1], shape[0], rank, alpha, device=base.weight.device, rows=base)
        elif isinstance(base, nn.Conv2d):
            m = LoRAConv2d(base, rank, alpha)
        else:
            m = LoRALinear(base, rank, alpha)
        with torch.no_grad():
            m.lora_down.weight.copy_(down.reshape(m.lora_down.weight.shape))
            m.lora_up.weight.copy_(up.reshape(m.lora_up.weight.shape))
        return m


class LoRALinear(LoRA):
    """A frozen `nn.Linear` plus a LoRA branch; the base keeps its names (`weight`, `bias`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self._init_lora(
            nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=torch.float32),
            nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=torch.float32),
            rank, alpha, dropout,
        )

    def target(self) -> torch.Tensor:
        return self.weight

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def linear_parts(self, dtype: torch.dtype):
        """(weight, bias, down, scaled up) in `dtype` for `ops.project`; None with dropout or a
        trainable base (then `forward` takes the plain path)."""
        frozen = not (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if not frozen or not isinstance(self.dropout, nn.Identity):
            return None
        if self.merged:
            return self.weight, self.bias, None, None
        up = self.lora_up.weight * (self.scale * self.multiplier)
        return self.weight, self.bias, self.lora_down.weight.to(dtype), up.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.linear_parts(x.dtype) if x.dtype == self.weight.dtype else None
        if parts is not None and parts[2] is not None:  # the update added in the GEMM epilogue
            return ops.lora_linear(x, *parts)
        return super().forward(x)


class LoRAConv2d(LoRA):
    """LoCon: a frozen `nn.Conv2d` plus down (rank, in, kh, kw) with the base stride/padding and
    up (out, rank, 1, 1). 1×1 convs (SD1.5 proj_in/out, skip_connection) are plain LoRA."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if base.groups != 1 or base.padding_mode != "zeros":
            raise LoRAError(f"LoRAConv2d: groups={base.groups}, padding_mode={base.padding_mode!r} unsupported; exclude it from targets")
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride = base.kernel_size, base.stride
        self.padding, self.dilation = base.padding, base.dilation
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self._init_lora(
            nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                      bias=False, device=w.device, dtype=torch.float32),
            nn.Conv2d(rank, base.out_channels, 1, bias=False, device=w.device, dtype=torch.float32),
            rank, alpha, dropout,
        )

    def target(self) -> torch.Tensor:
        return self.weight

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(self.dropout(x), self.lora_down.weight.to(x.dtype), None,
                     self.stride, self.padding, self.dilation)  # (B, rank, H', W')
        return F.conv2d(h, self.lora_up.weight.to(x.dtype)) * (self.scale * self.multiplier)


class LoRADelta(LoRA):
    """A LoRA branch without a base layer: forward returns only the update (…, out). With `rows`
    (a q/k/v block of a fused weight) it can merge into them."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float = 0.0, device: torch.device | None = None, rows: Rows | None = None):
        super().__init__()
        self.rows = rows
        self._init_lora(
            nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32),
            nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32),
            rank, alpha, dropout,
        )

    def target(self) -> torch.Tensor:
        if self.rows is None:
            raise LoRAError("LoRADelta: built without the rows of a weight, so it cannot merge")
        return self.rows.get()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.update(x)


class LoRAQKV(nn.Module):
    """te2 q/k/v adapters for open_clip's fused attention: three adapters on the row blocks
    [0:D], [D:2D], [2D:3D] of `in_proj_weight` (3D, D), their updates concatenated to (B, T, 3D)
    (zeros for a slice without one, or merged).

    Installed as `attn.qkv_adapter`; the attention adds its output to F.linear(x, in_proj_weight).
    """

    def __init__(self, attn: nn.Module, branches: Sequence[Adapter | None]):
        super().__init__()
        self.dim = attn.in_proj_weight.shape[1]
        self.q, self.k, self.v = branches

    @classmethod
    def new(cls, attn: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> LoRAQKV:
        """Fresh LoRA branches (up = 0) for training."""
        w = attn.in_proj_weight
        d = w.shape[1]
        rows = [Rows(w, i * d, (i + 1) * d) for i in range(3)]
        return cls(attn, [LoRADelta(d, d, rank, alpha, dropout, w.device, r) for r in rows])

    @property
    def branches(self) -> list[Adapter | None]:
        return [self.q, self.k, self.v]

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], 3 * self.dim)  # the fused projection is the attention's own

    def update(self, x: torch.Tensor) -> torch.Tensor:
        zeros = x.new_zeros(*x.shape[:-1], self.dim)
        parts = [zeros if b is None or b.merged else b.update(x).to(x.dtype) for b in self.branches]
        return torch.cat(parts, dim=-1)  # (B, T, 3·D)

    forward = update

    @property
    def merged(self) -> bool:
        return all(b is None or b.merged for b in self.branches)

    def merge(self) -> None:
        for b in self.branches:
            if b is not None:
                b.merge()

    def unmerge(self) -> None:
        for b in self.branches:
            if b is not None:
                b.unmerge()
