"""Speed settings for the GPU, applied without renaming any parameter.

Regional compilation: each ResBlock and each BasicTransformerBlock is compiled on its own
(`nn.Module.compile`, in place, so `state_dict()` keys stay the checkpoint's). Blocks of
the same shape share one compiled graph, so SDXL compiles a handful of graphs instead of
one 2.5 B-parameter graph: compile time stays well under a minute, and the eager Python
that is left between regions is a few dozen calls per step.
"""
from __future__ import annotations

import torch
from torch import nn

from .models.unet import BasicTransformerBlock, ResBlock


def set_fast_math() -> None:
    """TF32 for the few fp32 matmuls/convs left (LoRA factors, norms), cuDNN autotuning."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def compile_regions(model: nn.Module, mode: str | None = None) -> int:
    """Compile every ResBlock and BasicTransformerBlock of `model` in place; returns the count."""
    n = 0
    for m in model.modules():
        if isinstance(m, (ResBlock, BasicTransformerBlock)):
            m.compile(mode=mode, dynamic=False)
            n += 1
    return n


def optimize_for_training(unet: nn.Module, compile: bool = True, mode: str | None = None):
    """Make `unet` fast for LoRA training on CUDA; returns the callable to use for forward."""
    if unet.training is False:
        unet.train()
    if torch.cuda.is_available():
        set_fast_math()
    if compile:
        compile_regions(unet, mode=mode)
    return unet
