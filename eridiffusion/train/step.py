"""One optimizer step, the object `eri train` runs and `bench/train_step.py` times.

    for each micro-batch (grad_accum of them):      DDP all-reduces only after the last
        t ~ family.sample_timesteps in [min_timestep, max_timestep), noise (+ offset, multires
        noise, input perturbation), drawn for the global batch from the noise generator, sliced
        loss = family-weighted l2 / Huber(denoiser(x_t, t, **family.denoiser_inputs), target)
        backward (gradients accumulate; replayed from a CUDA graph with cuda_graph)
    FSDP: all-reduce the LoRA gradients; torchrun: average the logged loss over ranks
    clip the gradient norm; a NaN / inf loss or norm skips the update (NonFiniteGuard): checked
        after the update is queued when the optimizer can skip on the device (torch's fused
        AdamW), before it otherwise
    optimizer.step(), clear the gradients
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from eridiffusion import diffusion, distributed, faults, speed
from eridiffusion.families import Cond, Family


@dataclass(frozen=True)
class Objective:
    """What a step trains towards besides the family's target: the loss, its weighting and the
    noise draws (`[train]` fields of the same names; see docs/config.md)."""

    loss: str = "l2"  # diffusion.LOSSES
    huber_c: float = 0.1
    huber_schedule: str = "snr"  # diffusion.HUBER_SCHEDULES
    debiased_estimation: bool = False
    ip_noise_gamma: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    timesteps: tuple[int, int] = field(default=(0, 1000))  # [low, high)
    zero_terminal_snr: bool = False

    @classmethod
    def from_config(cls, t) -> Objective:
        """From a `config.TrainSection`."""
        return cls(t.loss, t.huber_c, t.huber_schedule, t.debiased_estimation, t.ip_noise_gamma,
                   t.multires_noise_iterations, t.multires_noise_discount, (t.min_timestep, t.max_timestep),
                   t.zero_terminal_snr)  # fmt: skip


def diffusion_loss(family: Family, denoiser: nn.Module, x0: torch.Tensor, cond: Cond, time_ids: torch.Tensor | None,
                   t: torch.Tensor, noise: torch.Tensor, schedule: torch.Tensor, prediction: str,
                   min_snr_gamma: float = 0.0, weight: torch.Tensor | None = None, *,
                   objective: Objective = Objective(), perturbation: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Mean (min-SNR / debiased weighted) l2 or Huber loss between the denoiser's output at x_t
    and the family's target; `weight` (B, 1, h, w) weights each latent pixel (loss masks, the
    prior-loss weight). x_t is built from noise + `perturbation` (input perturbation, drawn by
    the caller), the target from noise alone (kohya `get_noise_noisy_latents_and_timesteps`)."""
    x_t = family.add_noise(x0, noise if perturbation is None else noise + perturbation, t, schedule)
    # no autocast: the UNet casts its inputs to its weights' dtype and LoRA casts its fp32
    # weights to the activations' dtype, so nothing is cast twice
    pred = denoiser(x_t, t, **family.denoiser_inputs(cond, time_ids))
    target = family.target(prediction, x0, noise, t, schedule)
    o = objective
    c = None if o.loss == "l2" else diffusion.huber_threshold(t, schedule, o.huber_c, o.huber_schedule)
    loss = diffusion.elementwise_loss(pred.float(), target.float(), o.loss, c)  # (B, C, h, w)
    if weight is not None:
        loss = loss * weight
    loss = loss.mean(dim=(1, 2, 3))  # (B,)
    snr = family.loss_weight(t, schedule, prediction, min_snr_gamma, o.debiased_estimation)
    return (loss if snr is None else loss * snr).mean()


@dataclass
class StepResult:
    loss: torch.Tensor  # on the device; the mean over the global batch
    norm: torch.Tensor | None  # the gradient norm before clipping (None without clipping)
    skipped: bool  # not finite: no update


class TrainStep:
    """Micro-steps, clipping, the NaN guard and the optimizer step over `params`.

    `model` is what forward runs (the denoiser, or its DDP wrapper); `synced` the DDP modules
    whose all-reduce waits for the last micro-step. With `cuda_graph` each micro-step's forward
    and backward replays from a CUDA graph per bucket shape (`speed.GraphedBackward`); the
    gradients then stay the same tensors and are cleared, never dropped.
    """

    @classmethod
    def from_config(cls, t, family: Family, model: nn.Module, params, optimizer, prediction: str, **kwargs) -> TrainStep:
        """The step `[train]` (`t`) asks for; `kwargs`: synced, fsdp, world, device."""
        return cls(family, model, params, optimizer, prediction=prediction, grad_accum=t.grad_accum,
                   max_grad_norm=t.max_grad_norm, min_snr_gamma=t.min_snr_gamma, noise_offset=t.noise_offset,
                   max_nonfinite=t.max_nonfinite, cuda_graph=t.cuda_graph, objective=Objective.from_config(t),
                   **kwargs)  # fmt: skip

    def __init__(self, family: Family, model: nn.Module, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                 *, prediction: str, grad_accum: int = 1, max_grad_norm: float = 0.0, min_snr_gamma: float = 0.0,
                 noise_offset: float = 0.0, max_nonfinite: int = 0, cuda_graph: bool = False, synced=(),
                 fsdp: bool = False, world=None, device: torch.device | None = None,
                 objective: Objective = Objective(), prepare=None):  # fmt: skip
        self.family, self.model, self.params, self.optimizer = family, model, list(params), optimizer
        self.prediction, self.grad_accum, self.max_grad_norm = prediction, grad_accum, max_grad_norm
        self.min_snr_gamma, self.noise_offset = min_snr_gamma, noise_offset
        self.synced, self.fsdp, self.world = list(synced), fsdp, world
        self.device = device or self.params[0].device
        self.objective = objective
        self.schedule = family.schedule(self.device, zero_terminal_snr=objective.zero_terminal_snr)
        self.guard = faults.NonFiniteGuard(max_nonfinite)
        # `prepare`: between a new bucket's first warm-up and its capture (compile_cache.CompileCache.prepare)
        self.graphed = speed.GraphedBackward(self.micro_step, self.params, prepare=prepare) if cuda_graph else None
        # params the optimizer does not hold (it updates fp32 copies of them: finetune.FullModel)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.unheld = [p for p in self.params if id(p) not in held]
        # torch's fused Adam / AdamW / SGD skip an update on the device when told `found_inf`
        self.skips_on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False))

    def micro_step(self, x0, time_ids, t, noise, *rest, scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients accumulate); returns the loss.
        `rest`: the conditioning tensors (`family.cond_keys`), then the loss weights if any, then
        the input perturbation when `objective.ip_noise_gamma` > 0 (random draws stay outside:
        a CUDA graph replays them as inputs). `scale` (this rank's share of the global batch) is
        1 in one process, as in a graph."""
        n = len(self.family.cond_keys)
        cond, extra = dict(zip(self.family.cond_keys, rest[:n])), list(rest[n:])
        perturbation = extra.pop() if self.objective.ip_noise_gamma > 0 else None
        weight = extra[0] if extra else None
        loss = scale * diffusion_loss(self.family, self.model, x0, cond, time_ids, t, noise, self.schedule,
                                      self.prediction, self.min_snr_gamma, weight, objective=self.objective,
                                      perturbation=perturbation)  # fmt: skip
        (loss / self.grad_accum).backward()
        return loss.detach()

    def clear_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=self.graphed is None)
        for p in self.unheld:
            if self.graphed is None:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def accumulate(self, batches: Iterator, noise_gen: torch.Generator) -> torch.Tensor:
        """Forward + backward of `grad_accum` micro-batches; returns the mean loss (device)."""
        step_loss = torch.zeros((), device=self.device)
        distributed_ = self.world is not None and self.world.distributed
        for micro in range(self.grad_accum):
            # the micro-steps before the last run forward (the trained text encoders' in
            # next(batches) too) and backward in no_sync
            with distributed.no_sync(self.synced, skip=micro < self.grad_accum - 1):
                b = next(batches)
                # drawn for the global batch and sliced: N processes = one with the N× batch
                o = self.objective
                t = self.family.sample_timesteps(b.n, noise_gen, self.device, *o.timesteps)[b.rows]
                noise = torch.randn((b.n, *b.x0.shape[1:]), generator=noise_gen, device=self.device)
                noise = diffusion.offset_noise(noise, self.noise_offset, noise_gen)
                noise = diffusion.multires_noise(noise, o.multires_noise_iterations, o.multires_noise_discount, noise_gen)
                args = (b.x0, b.time_ids, t, noise[b.rows], *(b.cond[k] for k in self.family.cond_keys))
                args += () if b.weight is None else (b.weight,)
                if o.ip_noise_gamma > 0:
                    args += (diffusion.perturbation(noise, o.ip_noise_gamma, noise_gen)[b.rows],)
                loss = self.graphed(*args) if self.graphed is not None else self.micro_step(*args, scale=b.scale)
            step_loss += loss / self.grad_accum
        if self.fsdp:
            distributed.all_reduce_grads(self.params)
        if distributed_:  # the logged loss is the global batch's
            step_loss = distributed.all_reduce_sum_(step_loss) / self.world.size
        return step_loss

    def __call__(self, batches: Iterator, noise_gen: torch.Generator) -> StepResult:
        loss = self.accumulate(batches, noise_gen)
        norm = None
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.guard.enabled and self.skips_on_device:
            return self._step_then_check(loss, norm)
        if self.guard.enabled and not self.guard.observe(faults.all_finite(loss, norm)):  # skip: no update
            self.clear_grads()
            return StepResult(loss, norm, skipped=True)
        self.optimizer.step()
        self.clear_grads()
        return StepResult(loss, norm, skipped=False)

    def _step_then_check(self, loss: torch.Tensor, norm: torch.Tensor | None) -> StepResult:
        """The NaN guard's sync after the update is queued, not before: the optimizer gets
        `found_inf` (as from torch's GradScaler) and its kernel leaves weights and state as they
        were on a non-finite step. Meanwhile the device runs the step's last kernels and the
        optimizer's instead of idling while the host launches them."""
        finite = faults.finite_flag(loss, norm)
        self.optimizer.found_inf = (~finite).float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.clear_grads()
        ok = self.guard.observe(bool(finite))  # the step's one sync
        return StepResult(loss, norm, skipped=not ok)
