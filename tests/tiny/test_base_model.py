"""The shipped shapes model draws what it is asked for (the detector says so), a random one doesn't."""

import pytest
import torch

from eridiffusion import checkpoint
from eridiffusion.pipeline import Pipeline
from eridiffusion.tiny import shapes
from eridiffusion.tiny.demo import SAMPLING, WEIGHTS
from eridiffusion.tiny.detect import detect

PAIRS = (("red", "blue"), ("yellow", "purple"), ("white", "black"), ("green", "orange"))
PROMPTS = [(shapes.caption(s, fg, bg), s, fg) for s in shapes.BASE_SHAPES for fg, bg in PAIRS]


def scores(pipe: Pipeline) -> tuple[float, float]:
    """Share of 16 prompts × 2 seeds showing the prompted shape, and the prompted foreground colour."""
    right_shape = right_fg = 0
    for prompt, shape, fg in PROMPTS:
        cond, uncond = pipe.encode([prompt] * 2)
        for image in pipe.generate(cond, uncond, [0, 1], **SAMPLING):
            d = detect(image)
            right_shape += d.shape == shape
            right_fg += d.fg == fg
    return right_shape / (2 * len(PROMPTS)), right_fg / (2 * len(PROMPTS))


def test_shipped_weights_are_one_small_fp16_file_of_a_detected_family():
    assert WEIGHTS.stat().st_size <= 12_000_000
    parts = checkpoint.load(WEIGHTS)
    assert parts.family.name == "sdxl-micro"
    from eridiffusion.weights import WeightLoader

    with WeightLoader(WEIGHTS) as w:
        assert {w.dtype(k) for k in w.keys()} == {torch.float16}


@pytest.mark.slow
def test_base_model_draws_the_prompted_shape_and_colour():
    shape, fg = scores(Pipeline.from_checkpoint(WEIGHTS))
    print(f"shipped model: shape {shape:.3f}, foreground colour {fg:.3f}")
    assert shape >= 0.75 and fg >= 0.80, (shape, fg)

    fam = checkpoint.FAMILIES["sdxl-micro"]
    torch.manual_seed(0)
    random_parts = checkpoint.Components(fam, **{p: fam.build(p).eval() for p in fam.parts})
    r_shape, r_fg = scores(Pipeline(random_parts))
    print(f"random model: shape {r_shape:.3f}, foreground colour {r_fg:.3f}")
    assert r_shape <= 0.3 and r_fg <= 0.3, (r_shape, r_fg)
