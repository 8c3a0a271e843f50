"""The embedded demo: the shipped tiny shapes model, its data generator and detector, and `eri demo`."""

from eridiffusion.tiny.dataset import make_dataset
from eridiffusion.tiny.demo import concept_config, demo_config, prepare, prepare_concept, run_demo

__all__ = ["concept_config", "demo_config", "make_dataset", "prepare", "prepare_concept", "run_demo"]
