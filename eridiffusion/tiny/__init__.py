"""The embedded demo: a tiny SDXL-layout model and a procedurally drawn captioned dataset."""

from eridiffusion.tiny.dataset import make_dataset
from eridiffusion.tiny.demo import demo_config, prepare, run_demo

__all__ = ["demo_config", "make_dataset", "prepare", "run_demo"]
