"""`eri demo`: teach the shipped tiny shapes model a shape it has never seen, with a LoRA, on CPU.

The base model (`weights/tiny_shapes.safetensors`, family `sdxl-micro`, trained by
`tools/train_tiny.py`) draws circles, squares, triangles and diamonds, each filling a square box;
the demo teaches it a **bar** (`shapes` "bar": a horizontal band three times as wide as high,
held out like star, heart and ring). It draws `N_IMAGES` captioned bars with `tiny.shapes` and, as
prior-preservation images, the same boxes and colours as each bar in every base shape ("a red
circle on a blue background" beside "a red bar on a blue background"): only the shape word and
the shape differ, so the LoRA has to tie the change to the word "bar" rather than turn every
shape into one. It trains through the ordinary trainer (`train(cfg)`) and renders the concept
prompt and two control prompts with the same seeds before and after. `tiny.detect` scores every
image: the concept score is the share of concept-prompt images showing a bar; a control's score
the share showing its shape.

Measured 2026-11-29 on the 2-core CPU (`run_demo` with `RECIPE`, 16 seeds per prompt; the
concept prompt shares its colours with the first control, so only the shape word differs): bar
0% → 100%, circle 100% → 100%, square 94% → 88%; training 54 s, the whole demo 77 s (LR 3e-3:
bar 75%). The same LoRA on other colour pairs (16 seeds): a
white bar on black 50%, a red bar on blue 6%, a green bar on white 12% (base model: 0% for all):
the base model's colours are weak (its backgrounds follow the seed more than the prompt), and a
faint or low-contrast bar is not found by the detector; the concept prompt is the yellow-on-
purple one. At LR 3e-3 the same pairs gave 19% / 44% / 25%, at LR 6e-3 with timesteps 600-999
50% / 19% / 6%.

Why a bar and not a star or a ring: those differ from a disc only in fine structure (points, a
hole), which this 11 MB model draws as blobs, and at the noise levels where that structure forms
the caption barely steers it; a bar differs in its outline's proportions, decided at high noise,
where the caption does steer the base model (its shape score is 100%). What was tried with a
star and a ring, and why neither was kept: docs/dev/demo_concepts.md.

Caption dropout is off: the trainer drops to the encoded "", while the base model's
unconditional input is all-zero. Offset noise 0.15 as the base model was trained with.
"""

from __future__ import annotations

import dataclasses
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
CONCEPT = "bar"
PROMPTS = (  # (prompt, shape it should show): the concept first, then the controls
    (shapes.caption("bar", "yellow", "purple"), "bar"),
    (shapes.caption("circle", "yellow", "purple"), "circle"),
    (shapes.caption("square", "white", "black"), "square"),
)
GRID_SEEDS = (0, 1, 2, 3)  # before.png / after.png columns
SCORE_SEEDS = tuple(range(16))  # the scores count these (the grid's and 12 more: one image = 6.25 points)
SAMPLING = {"steps": 20, "cfg": 5.0, "sampler": "euler", "size": (128, 128)}
N_IMAGES = 12
MARKER = "demo.json"  # what says a folder is a demo run's


CONCEPT_REPEATS = 4  # the concept images' repeats: 12 · 4 bars beside 48 prior images per epoch
RECIPE = {  # the LoRA recipe (measured on the 2-core CPU: see the README's demo paragraph)
    "lora": {"rank": 8, "alpha": 8.0, "conv_rank": 8, "conv_alpha": 8.0},
    "optim": {"unet_lr": 5e-3, "weight_decay": 0.0, "schedule": "cosine", "warmup_steps": 20},
    "train": {"batch_size": 4, "seed": 0, "device": "cpu", "noise_offset": 0.15, "min_timestep": 500},
}
STEPS = 400


def concept_config(root: str | os.PathLike = "runs/demo", steps: int = STEPS) -> TrainConfig:
    """The concept LoRA: `RECIPE` on `root/data/concept` (repeated) + `root/data/prior`, 128², CPU."""
    root = Path(root)
    r = RECIPE
    return TrainConfig.from_dict(
        {
            "model": {"path": str(WEIGHTS), "dtype": "fp32"},
            "data": {"resolution": 128, "bucket_step": 32, "bucket_min": 64, "bucket_max": 256,
                     "caption_dropout": 0.0, "flip": True,
                     "subsets": [{"dir": str(root / "data" / "concept"), "repeats": CONCEPT_REPEATS},
                                 {"dir": str(root / "data" / "prior")}]},
            "lora": dict(r["lora"]),
            "optim": dict(r["optim"]),
            "train": {**r["train"], "max_steps": steps},
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
    """Mark `root` as a demo folder; draw the concept images + captions into `root/data/concept`
    and, into `root/data/prior`, each concept image's box and colours in every base shape."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps({"kind": "demo", "model": WEIGHTS.name, "concept": CONCEPT}) + "\n")
    for sub in ("concept", "prior"):  # an earlier demo's images (another n_images) must not stay
        for old in (root / "data" / sub).glob("shape_*.*"):
            old.unlink()
    specs = shapes.random_specs(n_images, random.Random(seed), shapes=(CONCEPT,))
    captions = shapes.write_images(root / "data" / "concept", specs)
    prior = [dataclasses.replace(s, shape=b) for s in specs for b in shapes.BASE_SHAPES]
    shapes.write_images(root / "data" / "prior", prior)
    log(f"wrote {len(captions)} captioned images of the new concept to {root / 'data' / 'concept'} "
        f"(e.g. {captions[0]!r}) and {len(prior)} of the base shapes in the same places and colours "
        f"to {root / 'data' / 'prior'} (prior preservation)")  # fmt: skip
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


def summary(before: Scores, after: Scores) -> str:
    """The demo's one line: concept and control scores, before → after, over SCORE_SEEDS."""
    controls = [(p, shape) for p, shape in PROMPTS[1:]]
    b = ", ".join(f"{shape} {before.by_prompt[p]:.0%}" for p, shape in controls)
    a = ", ".join(f"{shape} {after.by_prompt[p]:.0%}" for p, shape in controls)
    return (f'demo: concept "a {CONCEPT}": {before.concept:.0%} before → {after.concept:.0%} after; '
            f"controls: {b} before → {a} after ({len(SCORE_SEEDS)} seeds per prompt; prompts: "
            + "; ".join(repr(p) for p, _ in PROMPTS) + ")")


def run_demo(root: str | os.PathLike = "runs/demo", steps: int = STEPS, log=print, progress: bool = True):
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
