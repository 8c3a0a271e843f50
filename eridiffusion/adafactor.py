"""Adafactor with the options kohya's recipes pass (`scale_parameter`, `relative_step`, `warmup_init`).

`torch.optim.Adafactor` always scales its step by the parameter's RMS and by min(lr, 1/√t), so it
cannot express kohya's `scale_parameter=False, relative_step=False, warmup_init=False` with a
fixed LR. This is the update rule of Shazeer & Stern 2018 ("Adafactor: Adaptive Learning Rates
with Sublinear Memory Cost", arXiv:1804.04235) as fairseq's `optim/adafactor.py` and transformers'
`optimization.Adafactor` implement it (the version kohya's `--optimizer_type adafactor` builds);
tests/test_optim.py checks it step by step against transformers.

Per parameter X with gradient G, step t (from 1):
    ρ_t   = lr                          or, relative_step: min(1e-6·t if warmup_init else 1e-2, 1/√t)
    α_t   = ρ_t · max(ε₂, RMS(X))       with scale_parameter, else ρ_t
    β₂_t  = 1 − t^decay_rate
    V     = β₂_t·V + (1 − β₂_t)·(G² + ε₁)   factored for ≥ 2-D X: row means R (…, n), column means C (…, m),
    U     = G / √V̂,  V̂ = (R / mean(R)) ⊗ C
    U     = U / max(1, RMS(U) / clip_threshold)
    M     = β₁·M + (1 − β₁)·α_t·U       (only with beta1; else M = α_t·U)
    X     = X − weight_decay·α_t·X − M
"""

from __future__ import annotations

import math

import torch


class Adafactor(torch.optim.Optimizer):
    def __init__(self, params, lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False):  # fmt: skip
        if warmup_init and not relative_step:
            raise ValueError("warmup_init=True requires relative_step=True")
        defaults = dict(lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init)  # fmt: skip
        super().__init__(params, defaults)

    @staticmethod
    def _rms(t: torch.Tensor) -> torch.Tensor:
        return t.norm(2) / (t.numel() ** 0.5)

    @staticmethod
    def _step_size(group: dict, state: dict) -> float:
        rho = group["lr"]
        if group["relative_step"]:
            floor = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
            rho = min(floor, 1.0 / math.sqrt(state["step"]))
        scale = max(group["eps"][1], state["RMS"]) if group["scale_parameter"] else 1.0
        return scale * rho

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()  # fp32 maths for bf16 / fp16 weights, written back below
                x = p.float()
                state, factored = self.state[p], grad.dim() >= 2
                if not state:
                    state["step"] = 0
                    if group["beta1"] is not None:
                        state["exp_avg"] = torch.zeros_like(grad)
                    if factored:
                        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])  # (…, n)
                        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])  # (…, m)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["RMS"] = 0
                state["step"] += 1
                state["RMS"] = self._rms(x)
                lr = self._step_size(group, state)
                beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
                update = grad**2 + group["eps"][0]
                if factored:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
                    col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
                    r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)  # (…, n, 1)
                    update = torch.mul(r, col.unsqueeze(-2).rsqrt()).mul_(grad)  # (…, n, m)
                else:
                    v = state["exp_avg_sq"]
                    v.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
                    update = v.rsqrt().mul_(grad)
                update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
                update.mul_(lr)
                if group["beta1"] is not None:
                    m = state["exp_avg"]
                    m.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                    update = m
                if group["weight_decay"] != 0:
                    x.add_(x, alpha=-group["weight_decay"] * lr)
                x.add_(-update)
                if p.dtype != torch.float32:
                    p.copy_(x)
        return loss
