"""Batches of one aspect bucket: cached (or freshly encoded) latents and text conditioning.

Every rank draws the random numbers of the whole global batch (one generator per sample,
seeded from the data generator; the latent noise for all rows) and keeps its rows, so N
processes see what one process with the N× batch would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from eridiffusion import distributed
from eridiffusion.data.buckets import BucketBatchSampler
from eridiffusion.data.dataset import downsample_mask
from eridiffusion.devices import upload
from eridiffusion.families import Cond
from eridiffusion.train.setup import Setup, encode_latents


@dataclass
class Batch:
    """This rank's rows of a global batch of `n`: x0 (b, 4, h, w), text conditioning,
    time_ids (b, 6), `rows` (its slice of the global batch), its loss `scale` and the loss weights."""

    x0: torch.Tensor
    cond: Cond
    time_ids: torch.Tensor
    rows: slice
    n: int
    scale: float
    weight: torch.Tensor | None = None  # (b, 1, h, w) loss weights: masks, prior-loss weight


class Batches:
    """`next(batches)` → the next `Batch`, epoch after epoch of `sampler`.

    `text_encoder` encodes captions when they are not cached (with gradients when the text
    encoders are trained)."""

    def __init__(self, s: Setup, sampler: BucketBatchSampler, data_gen: torch.Generator, noise_gen: torch.Generator,
                 world, text_encoder: Callable[[list[str]], Cond] | None, train_text: bool):  # fmt: skip
        self.s, self.sampler, self.world = s, sampler, world
        self.data_gen, self.noise_gen = data_gen, noise_gen
        self.text_encoder, self.train_text = text_encoder, train_text
        self._indices = self._forever()

    def _forever(self) -> Iterator[list[int]]:
        while True:
            yield from self.sampler

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Batch:
        device = self.s.device
        idx = next(self._indices)
        rows, scale = distributed.slice_weights(len(idx), self.world.rank, self.world.size)
        # one generator per sample, seeded from data_gen for the whole global batch: every rank
        # stays in step, and a sample's flip / crop / caption do not depend on which rank loads it
        gens = [torch.Generator().manual_seed(int(torch.randint(1 << 62, (), generator=self.data_gen))) for _ in idx]
        latents, captions, time_ids = [], [], []
        for i, item_gen in zip(idx[rows], gens[rows]):
            latent, caption, ids = self._item(i, item_gen)
            latents.append(latent)
            captions.append(caption)
            time_ids.append(ids)
        mean = upload(torch.stack([d["mean"] for d in latents]), device)
        std = upload(torch.stack([d["std"] for d in latents]), device)
        eps = torch.randn((len(idx), *mean.shape[1:]), generator=self.noise_gen, device=device)[rows]  # global draw
        weight = self._weights(idx[rows], latents, mean.shape[-2:])
        return Batch(mean + std * eps, self._text(captions), upload(torch.stack(time_ids), device), rows, len(idx),
                     scale, weight)  # fmt: skip

    def _weights(self, idx: list[int], latents: list[dict], size) -> torch.Tensor | None:
        """Per latent pixel loss weights (b, 1, h, w): the mask × the sample's weight (data.prior_loss_weight
        for regularization images, kohya's apply_masked_loss then loss_weights); None when all are 1."""
        w = [self.s.dataset.loss_weights[i] for i in idx]
        if all(x == 1.0 for x in w) and all("mask" not in d for d in latents):
            return None
        masks = [d["mask"] if "mask" in d else torch.ones((1, *size)) for d in latents]
        return upload(torch.stack(masks) * torch.tensor(w)[:, None, None, None], self.s.device)

    def _item(self, i: int, item_gen: torch.Generator) -> tuple[dict[str, torch.Tensor], str, torch.Tensor]:
        s = self.s
        if s.cache_latents:  # the random draws of dataset.load_item, in its order
            flip, caption = s.dataset.augment(i, item_gen)
            entry = s.cached("latent", s.latent_key(i, flip))
            return entry, caption, entry["time_ids"]
        item = s.dataset.load_item(i, item_gen)
        with torch.no_grad():
            enc = encode_latents(s.components.vae, item["pixels"][None].to(s.device), s.family.vae.scaling_factor)
        latent = {k: v[0] for k, v in enc.items()}
        if item["mask"] is not None:
            latent["mask"] = downsample_mask(item["mask"], s.family.vae.factor)
        return latent, item["caption"], item["time_ids"]

    def _text(self, captions: list[str]) -> Cond:
        s = self.s
        if s.cache_text:
            entries = [s.cached("text", s.text_key(cap)) for cap in captions]
            return {k: upload(torch.stack([e[k] for e in entries]), s.device) for k in entries[0]}
        with torch.set_grad_enabled(self.train_text):
            return self.text_encoder(captions)
