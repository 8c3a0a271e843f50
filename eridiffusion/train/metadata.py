"""kohya's training metadata (`ss_*`) for the adapter file, so civitai-style tools read it.

The keys and their meaning follow kohya sd-scripts `train_network.py` (the `metadata = {...}`
block of `NetworkTrainer.train` and its single-dataset branch, commit
48d368fa557731ad0488c07304dfeba8c07910eb), every value `str()`-ed as kohya does:
- `ss_tag_frequency`: JSON {dir name: {tag: occurrences in its captions}}, tags split on ",",
  stripped and lower-cased, the captions as found (not per repeat), reg dirs included
  (`BaseDataset.set_tag_frequency`); dir name = the `N_name` folder an image is in, else the
  subset folder's name (kohya's `os.path.basename(subset.image_dir)`);
- `ss_dataset_dirs` / `ss_reg_dataset_dirs`: JSON {dir name: {"n_repeats", "img_count"}};
- `ss_num_train_images`: images × repeats of the non-reg subsets; `ss_num_reg_images` likewise;
- `ss_optimizer`: `module.Class(k=v,...)` with the arguments the config sets.
`networks.lora_metadata` writes the rest (rank, alpha, steps, epoch, resolution, modelspec.*).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from eridiffusion.config import TrainConfig
from eridiffusion.data.captions import kohya_folder


def dir_name(item_path: Path, subset_folder: Path) -> str:
    """The kohya dataset dir of an image: its `N_name` folder below the subset, else the subset's."""
    rel = item_path.parent.relative_to(subset_folder)
    for k in range(len(rel.parts), 0, -1):  # the nearest N_name folder, as kohya_folder picks it
        if kohya_folder(Path(rel.parts[k - 1])) is not None:
            return rel.parts[k - 1]
    return subset_folder.name


def tag_frequency(captions_by_dir: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """{dir: {tag: count}} as kohya's `set_tag_frequency` counts them."""
    out = {}
    for name, captions in captions_by_dir.items():
        counts: Counter = Counter()
        for caption in captions:
            counts.update(t.strip().lower() for t in caption.split(",") if t.strip())
        out[name] = dict(counts)
    return out


def dataset_metadata(dataset) -> dict[str, object]:
    """The dataset's `ss_*` keys (tag frequency, dirs, image counts) from `dataset.items`."""
    captions, dirs, reg_dirs = defaultdict(list), {}, {}
    train_samples = reg_samples = 0
    for item in dataset.items:
        name = dir_name(item.path, dataset.subsets[item.subset].folder)
        captions[name].append(item.caption)
        info = (reg_dirs if item.is_reg else dirs).setdefault(name, {"n_repeats": item.repeats, "img_count": 0})
        info["img_count"] += 1
        if item.is_reg:
            reg_samples += item.repeats
        else:
            train_samples += item.repeats
    return {"ss_tag_frequency": json.dumps(tag_frequency(captions)), "ss_dataset_dirs": json.dumps(dirs),
            "ss_reg_dataset_dirs": json.dumps(reg_dirs), "ss_num_train_images": train_samples,
            "ss_num_reg_images": reg_samples}  # fmt: skip


def optimizer_name(optimizer, cfg: TrainConfig, takes: tuple[str, ...] = ()) -> str:
    """kohya's `ss_optimizer`: `module.Class` and `(k=v,...)` of the arguments the config sets."""
    o = cfg.optim
    kwargs = {k: getattr(o, k) for k in ("weight_decay", "betas", "eps") if k in takes and k not in o.args}
    kwargs.update(o.args)
    cls = type(optimizer)
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def training_metadata(cfg: TrainConfig, dataset, optimizer, *, takes: tuple[str, ...] = (), total_steps: int,
                      per_epoch: int, started_at: float | None = None, val_images: int = 0) -> dict[str, str]:  # fmt: skip
    """Every `ss_*` key of a run besides those `lora_metadata` writes per save."""
    d, lo, o, t = cfg.data, cfg.lora, cfg.optim, cfg.train
    meta = {
        "ss_training_started_at": time.time() if started_at is None else started_at,
        "ss_output_name": cfg.save.name,
        "ss_sd_model_name": Path(cfg.model.path).name,
        "ss_learning_rate": o.unet_lr,
        "ss_unet_lr": o.unet_lr,
        "ss_text_encoder_lr": o.text_encoder_lr if lo.train_text_encoder else None,
        "ss_optimizer": optimizer_name(optimizer, cfg, takes),
        "ss_lr_scheduler": o.schedule,
        "ss_lr_warmup_steps": o.warmup_steps,
        "ss_max_train_steps": total_steps,
        "ss_num_batches_per_epoch": per_epoch,
        "ss_num_epochs": -(-total_steps // per_epoch),
        "ss_batch_size_per_device": t.batch_size,
        "ss_gradient_accumulation_steps": t.grad_accum,
        "ss_gradient_checkpointing": t.gradient_checkpointing,
        "ss_max_grad_norm": t.max_grad_norm,
        "ss_seed": t.seed,
        "ss_noise_offset": t.noise_offset or None,
        "ss_min_snr_gamma": t.min_snr_gamma or None,
        "ss_mixed_precision": cfg.model.dtype,
        "ss_cache_latents": cfg.cache.latents,
        "ss_network_dropout": lo.dropout or None,
        "ss_caption_dropout_rate": d.caption_dropout,
        "ss_caption_tag_dropout_rate": d.tag_dropout,
        "ss_shuffle_caption": d.shuffle_tags,
        "ss_keep_tokens": d.keep_tags,
        "ss_flip_aug": d.flip,
        "ss_random_crop": d.random_crop,
        "ss_enable_bucket": True,
        "ss_min_bucket_reso": d.bucket_min,
        "ss_max_bucket_reso": d.bucket_max,
        "ss_prior_loss_weight": d.prior_loss_weight,
        "ss_num_validation_images": val_images,
        "ss_validation_split": d.validation_split,
        "ss_validation_seed": t.seed,
        "ss_validate_every_n_steps": cfg.log.validation_every_n_steps or None,
        **dataset_metadata(dataset),
    }
    return {k: str(v) for k, v in meta.items()}
