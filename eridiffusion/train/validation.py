"""The validation loss: held-out images, fixed noise, fixed timesteps, the trained weights.

    data.validation_split ─► split_validation: each non-reg subset's images shuffled by
        train.seed, the last round(n × split) held out (kohya `train_util.split_train_val`)
    data.validation_dir   ─► its own dataset (captions, buckets as [data])
    ValidationLoss.build: x0 = the VAE posterior mean of each image (no flip, no dropout), its
        caption encoded once (or each call while the text encoders train), noise drawn once
    __call__: mean over images × timesteps of `diffusion_loss` (the training objective) in
        eval mode under no_grad, modes restored

Kohya sd-scripts `train_network.py` (commit 48d368fa557731ad0488c07304dfeba8c07910eb) evaluates
every validation batch at NUM_VALIDATION_TIMESTEPS = 4 fixed timesteps,
`np.linspace(min_timestep, max_timestep, 4 + 2, dtype=int)[1:-1]` (200, 400, 600, 800), with
the RNG switched to `validation_seed` so each evaluation draws the same noise; here the noise is
drawn once from its own generator (seed + 3), which leaves the training RNG streams alone.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import numpy as np
import torch

from eridiffusion.config import SubsetConfig, TrainConfig
from eridiffusion.data.dataset import ImageDataset, Subset, build_subsets
from eridiffusion.errors import ConfigError
from eridiffusion.families import Family
from eridiffusion.train.step import diffusion_loss

NUM_TIMESTEPS = 4  # kohya's NUM_VALIDATION_TIMESTEPS


def validation_timesteps(low: int = 0, high: int = 1000, n: int = NUM_TIMESTEPS) -> list[int]:
    """kohya's fixed validation timesteps: n evenly spaced inside (low, high)."""
    return [int(t) for t in np.linspace(low, high, n + 2, dtype=int)[1:-1]]


def split_validation(dataset: ImageDataset, split: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """(training, validation) datasets: per non-reg subset, the items shuffled as kohya's
    `split_train_val` does (`random.seed(seed); random.shuffle`), the last round(n × split) held out."""
    val: set[int] = set()
    for j, subset in enumerate(dataset.subsets):
        if subset.is_reg:
            continue
        mine = [i for i, item in enumerate(dataset.items) if item.subset == j]
        random.Random(seed).shuffle(mine)
        val.update(mine[len(mine) - round(len(mine) * split):])
    if not val or len(val) == len(dataset.items):
        raise ConfigError(f"data.validation_split = {split} holds out {len(val)} of {len(dataset.items)} images: "
                          "choose a split that leaves images on both sides")  # fmt: skip
    keep = [item for i, item in enumerate(dataset.items) if i not in val]
    held = [item for i, item in enumerate(dataset.items) if i in val]
    return (ImageDataset(keep, dataset.report, max_pixels=dataset.max_pixels, subsets=dataset.subsets),
            ImageDataset(held, dataset.report, max_pixels=dataset.max_pixels, subsets=dataset.subsets))  # fmt: skip


def validation_dataset(cfg: TrainConfig, dataset: ImageDataset, log) -> tuple[ImageDataset, ImageDataset | None]:
    """(training dataset, validation dataset or None) as `data.validation_split` / `_dir` say."""
    d = cfg.data
    if d.validation_split:
        train, val = split_validation(dataset, d.validation_split, cfg.train.seed)
    elif d.validation_dir:
        own = d._resolve(SubsetConfig(dir=d.validation_dir))  # captions and buckets as [data]
        subset = dataclasses.replace(Subset.from_config(own, d.bucket_step), flip=False)
        train, val = dataset, build_subsets([subset], exclude=[cfg.save.output_dir, cfg.cache_dir])
    else:
        return dataset, None
    log(f"validation: {len(val)} images ({'data.validation_split' if d.validation_split else d.validation_dir}), "
        f"{len(train)} images train")  # fmt: skip
    return train, val


class ValidationLoss:
    """Fixed validation inputs per image; `for_step(train_step, ...)` gives the evaluation."""

    def __init__(self, family: Family, x0: list[torch.Tensor], time_ids: list[torch.Tensor],
                 cond: list[dict[str, torch.Tensor]] | None, captions: list[str], noise: list[torch.Tensor]):  # fmt: skip
        self.family, self.x0, self.time_ids, self.cond, self.captions, self.noise = family, x0, time_ids, cond, captions, noise

    @classmethod
    @torch.no_grad()
    def build(cls, s, dataset: ImageDataset, seed: int, encode: Callable | None) -> ValidationLoss:
        """From `s` (train.setup.Setup, its VAE still loaded): every image of `dataset` encoded
        now, its caption too with `encode` (prompts → cond; None: at each call, text encoders
        training), NUM_TIMESTEPS noise tensors per image from a generator of its own."""
        from eridiffusion.train.setup import encode_latents

        c, fam, device = s.components, s.family, s.device
        g = torch.Generator().manual_seed(seed + 3)
        x0, time_ids, captions, noise = [], [], [], []
        for i in range(len(dataset)):
            item = dataset.load_item(i, torch.Generator().manual_seed(0), flip=False)
            latent = encode_latents(c.vae, item["pixels"][None].to(device), fam.vae.scaling_factor)["mean"]
            x0.append(latent)  # (1, 4, h, w)
            time_ids.append(item["time_ids"][None].to(device))
            captions.append(dataset.subset_of(i).captions.fixed(dataset[i].caption))
            noise.append(torch.randn((NUM_TIMESTEPS, *latent.shape[1:]), generator=g).to(device))
        cond = None if encode is None else [{k: v.float() for k, v in encode([cap]).items()} for cap in captions]
        return cls(fam, x0, time_ids, cond, captions, noise)

    def for_step(self, step, denoiser: torch.nn.Module, text_encoder: Callable | None = None,
                 text_modules=()) -> Callable[[], float]:  # fmt: skip
        """The evaluation with `step`'s (train.step.TrainStep) schedule, prediction and objective,
        at kohya's fixed timesteps inside the objective's [min_timestep, max_timestep)."""
        timesteps = validation_timesteps(*step.objective.timesteps)
        return lambda: self(denoiser, step.schedule, step.prediction, timesteps, text_encoder, text_modules,
                            min_snr_gamma=step.min_snr_gamma, objective=step.objective)  # fmt: skip

    @torch.no_grad()
    def __call__(self, denoiser: torch.nn.Module, schedule: torch.Tensor, prediction: str, timesteps: list[int],
                 text_encoder: Callable | None = None, text_modules=(), **loss_options) -> float:  # fmt: skip
        """The mean `diffusion_loss` over images × timesteps, every module in eval mode (LoRA
        dropout off) and put back as found."""
        modes = [(m, m.training) for m in (denoiser, *text_modules)]
        t = torch.tensor(timesteps, device=schedule.device)
        n = len(timesteps)
        try:
            for m, _ in modes:
                m.eval()
            losses = []
            for j, x0 in enumerate(self.x0):
                cond = self.cond[j] if self.cond is not None else text_encoder([self.captions[j]])
                cond = {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}
                losses.append(diffusion_loss(self.family, denoiser, x0.expand(n, *x0.shape[1:]), cond,
                                             self.time_ids[j].expand(n, -1), t, self.noise[j], schedule, prediction,
                                             **loss_options))  # fmt: skip
            return float(torch.stack(losses).mean())
        finally:
            for m, mode in modes:
                m.train(mode)
