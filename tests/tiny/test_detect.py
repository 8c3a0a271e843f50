"""The detector on generator images whose labels are known."""

import random

from eridiffusion.tiny import shapes
from eridiffusion.tiny.detect import detect


def test_detector_reads_generator_images():
    specs = shapes.random_specs(120, random.Random(7), shapes=shapes.SHAPES)
    found = [detect(im) for im in shapes.to_pil(shapes.render(specs))]
    for attr in ("shape", "fg", "bg"):
        right = sum(getattr(d, attr) == getattr(s, attr) for d, s in zip(found, specs))
        assert right == len(specs), (attr, right)


def test_detector_says_none_for_a_plain_image():
    image = shapes.to_pil(shapes.render([shapes.Spec("circle", "red", "red", 10, 10, 50)]))[0]
    d = detect(image)
    assert (d.shape, d.fg, d.bg) == (None, None, "red")
