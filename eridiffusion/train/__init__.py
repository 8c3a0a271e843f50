"""Training: `train(cfg)` (run.py) over `TrainStep` (step.py), `Batches` (batches.py), the
set-up and cache (setup.py), the resumable state (state.py) and the run's files (outputs.py)."""

from eridiffusion.optim import lr_factor
from eridiffusion.train.run import TrainResult, train
from eridiffusion.train.setup import build_cache, encode_latents
from eridiffusion.train.state import load_state, save_state
from eridiffusion.train.step import StepResult, TrainStep, diffusion_loss

__all__ = ["StepResult", "TrainResult", "TrainStep", "build_cache", "diffusion_loss", "encode_latents", "load_state",
           "lr_factor", "save_state", "train"]
