"""`eri demo`: teach the shipped tiny shapes model a shape it has never seen, with a LoRA, on CPU.

The base model (`weights/tiny_shapes.safetensors`, family `sdxl-micro`, trained by
`tools/train_tiny.py`) draws circles, squares, triangles and diamonds; stars were held out.
The demo draws `N_IMAGES` captioned stars with `tiny.shapes`, trains a LoRA on them through the
ordinary trainer (`train(cfg)`), and renders the concept prompt and two control prompts with
the same seeds before and after. `tiny.detect` scores every image: the concept score is the
share of concept-prompt images showing a star; a control's score the share showing its shape.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from eridiffusion import checkpoint
from eridiffusion.config import TrainConfig
from eridiffusion.errors import UserError
from eridiffusion.tiny import shapes
from eridiffusion.tiny.dataset import make_dataset
from eridiffusion.tiny.detect import detect

WEIGHTS = Path(__file__).parent / "weights" / "tiny_shapes.safetensors"
CONCEPT = "star"
PROMPTS = (  # (prompt, shape it should show): the concept first, then the controls
    (shapes.caption("star", "red", "blue"), "star"),
    (shapes.caption("circle", "yellow", "purple"), "circle"),
    (shapes.caption("square", "white", "black"), "square"),
)
GRID_SEEDS = (0, 1, 2, 3)  # before.png / after.png columns
SCORE_SEEDS = tuple(range(8))  # the scores count these (the grid's and four more)
SAMPLING = {"steps": 20, "cfg": 5.0, "sampler": "euler", "size": (128, 128)}
N_IMAGES = 12
MARKER = "demo.json"  # what says a folder is a demo run's


def concept_config(root: str | os.PathLike = "runs/demo", steps: int = 120) -> TrainConfig:
    """The concept LoRA: rank-8 LoRA on the UNet's attention/feed-forward layers, batch 4 at 128², CPU."""
    root = Path(root)
    return TrainConfig.from_dict(
        {
            "model": {"path": str(WEIGHTS), "dtype": "fp32"},
            "data": {"dir": str(root / "data"), "resolution": 128, "bucket_step": 32, "bucket_min": 64,
                     "bucket_max": 256, "caption_dropout": 0.1, "flip": True},
            "lora": {"rank": 8, "alpha": 8.0},
            "optim": {"unet_lr": 2e-3, "weight_decay": 0.0, "schedule": "cosine", "warmup_steps": 5},
            "train": {"batch_size": 4, "max_steps": steps, "seed": 0, "device": "cpu"},
            "save": {"output_dir": str(root), "every_n_steps": steps, "name": "lora"},
            "log": {"every": 10, "tensorboard": False},
            "sample": {"prompts": [PROMPTS[0][0]], "seeds": list(GRID_SEEDS), "every_n_steps": steps,
                       "steps": SAMPLING["steps"], "cfg": SAMPLING["cfg"], "sampler": SAMPLING["sampler"],
                       "size": list(SAMPLING["size"])},
        },
        source="demo",
    )  # fmt: skip


def check_folder(root: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a folder that holds something other than an earlier demo (unless `overwrite`)."""
    root = Path(root)
    if overwrite or not root.exists() or (root / MARKER).exists() or not any(root.iterdir()):
        return
    raise UserError(f"--dir {root}: holds files that are not an eri demo run's (no {MARKER}); "
                    "pick another --dir or pass --overwrite to replace them")  # fmt: skip


def prepare_concept(root: str | os.PathLike = "runs/demo", n_images: int = N_IMAGES, seed: int = 0, log=print) -> list[str]:
    """Mark `root` as a demo folder and draw the concept images + captions into `root/data`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps({"kind": "demo", "model": WEIGHTS.name, "concept": CONCEPT}) + "\n")
    specs = shapes.random_specs(n_images, random.Random(seed), shapes=(CONCEPT,))
    captions = shapes.write_images(root / "data", specs)
    log(f"wrote {len(captions)} captioned images of the new concept to {root / 'data'} (e.g. {captions[0]!r})")
    return captions


@dataclass
class Scores:
    """Share of images (over SCORE_SEEDS) in which the detector finds each prompt's shape."""

    by_prompt: dict[str, float]
    grid: Path

    @property
    def concept(self) -> float:
        return self.by_prompt[PROMPTS[0][0]]


def render_and_score(model: str | os.PathLike, path: Path, loras=()) -> Scores:
    """Render PROMPTS × SCORE_SEEDS, write the GRID_SEEDS columns as a grid to `path`, score all."""
    from eridiffusion.pipeline import Pipeline, make_grid

    pipe = Pipeline.from_checkpoint(model, loras=list(loras))
    cells, scores = [], {}
    for prompt, shape in PROMPTS:
        cond, uncond = pipe.encode([prompt] * len(SCORE_SEEDS))
        images = pipe.generate(cond, uncond, list(SCORE_SEEDS), **SAMPLING)
        scores[prompt] = sum(detect(im).shape == shape for im in images) / len(images)
        cells += images[: len(GRID_SEEDS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(cells, cols=len(GRID_SEEDS)).save(path)
    return Scores(scores, path)


def run_demo(root: str | os.PathLike = "runs/demo", steps: int = 120, log=print, progress: bool = True):
    """Score the base model, train the concept LoRA, score again. Returns (TrainResult, before, after)."""
    from eridiffusion.train import train

    root = Path(root)
    prepare_concept(root, log=log)
    before = render_and_score(WEIGHTS, root / "samples" / "before.png")
    result = train(concept_config(root, steps).replace(save={"overwrite": True}), log=log, progress=progress)
    after = render_and_score(WEIGHTS, root / "samples" / "after.png", loras=[(result.lora_path, 1.0)])
    return result, before, after


# -- the random-model run, for tests that need a trainable model and no weights -------------
def demo_config(root: str | os.PathLike = "runs/demo", steps: int = 100) -> TrainConfig:
    """A random tiny `sdxl-tiny` run: 128² buckets (step 32), rank-8 LoRA + rank-8 LoCon, CPU."""
    # LoCon (conv_rank) matters here: on a random model an attention-only LoRA barely moves the
    # loss (measured eval ratio 0.99 after 100 steps), conv LoRA on the ResBlocks reaches ~0.36.
    root = Path(root)
    return TrainConfig.from_dict(
        {
            "model": {"path": str(root / "tiny_sdxl.safetensors"), "dtype": "fp32"},
            "data": {"dir": str(root / "data"), "resolution": 128, "bucket_step": 32, "bucket_min": 64,
                     "bucket_max": 256, "caption_dropout": 0.1, "flip": True},
            "lora": {"rank": 8, "alpha": 8.0, "conv_rank": 8, "conv_alpha": 8.0},
            "optim": {"unet_lr": 2e-3, "weight_decay": 0.0, "schedule": "cosine", "warmup_steps": 5},
            "train": {"batch_size": 2, "max_steps": steps, "seed": 0, "device": "cpu"},
            "save": {"output_dir": str(root), "every_n_steps": 50, "name": "lora"},
            "log": {"every": 10, "tensorboard": False},
            "sample": {"prompts": ["a red circle on a blue background"], "size": [128, 128], "steps": 20,
                       "seeds": [0, 1], "every_n_steps": 50},
        },
        source="demo",
    )  # fmt: skip


def prepare(root: str | os.PathLike = "runs/demo", n_images: int = 12, seed: int = 0, log=print) -> None:
    """Write a random tiny checkpoint and the two-aspect shapes dataset under `root` (tests)."""
    root = Path(root)
    model = root / "tiny_sdxl.safetensors"
    checkpoint.save(checkpoint.tiny_components("sdxl-tiny", seed=seed), model)
    log(f"wrote a random tiny SDXL-layout checkpoint: {model} ({model.stat().st_size / 2**20:.1f} MiB)")
    captions = make_dataset(root / "data", n=n_images, seed=seed)
    log(f"wrote {len(captions)} captioned images to {root / 'data'} (e.g. {captions[0]!r})")
