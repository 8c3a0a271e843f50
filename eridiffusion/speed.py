"""Speed settings for the GPU, applied without renaming any parameter.

Regional compilation: blocks of the UNet are compiled one by one (`nn.Module.compile`, in
place, so `state_dict()` keys stay the checkpoint's). Blocks of the same structure share
one compiled graph, so SDXL compiles a handful of graphs instead of one 2.5 B-parameter
graph, and the eager Python left between regions is a few dozen calls per step.

Scopes:
- "blocks": every ResBlock and BasicTransformerBlock (fewest distinct graphs).
- "stages": every `input_blocks.i` / `middle_block` / `output_blocks.i` whole, so the
  GroupNorm / proj_in / reshapes around the transformer blocks are fused too.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .models.unet import BasicTransformerBlock, ResBlock, UNet

SCOPES = ("none", "blocks", "stages")


def set_fast_math() -> None:
    """TF32 for the few fp32 matmuls/convs left (LoRA factors in fp32), cuDNN autotuning."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def compile_regions(unet: UNet, scope: str = "blocks", mode: str | None = None) -> int:
    """Compile regions of `unet` in place; returns how many modules were wrapped."""
    if scope not in SCOPES:
        raise ValueError(f"compile scope {scope!r} unknown; use one of {SCOPES}")
    if scope == "none":
        return 0
    if scope == "blocks":
        regions = [m for m in unet.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
    else:
        regions = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for m in regions:
        m.compile(mode=mode, dynamic=False)
    return len(regions)


def attention_priority(backend: str = "auto"):
    """Context manager choosing the SDPA kernel ("auto", "cudnn", "flash", "efficient")."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    }[backend]
    return sdpa_kernel(order, set_priority=True)


def optimize_for_training(
    unet: UNet, compile: bool = True, scope: str = "blocks", channels_last: bool = False, mode: str | None = None
) -> UNet:
    """Make `unet` fast for LoRA training on CUDA (in place) and return it."""
    unet.train()
    if torch.cuda.is_available():
        set_fast_math()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        compile_regions(unet, scope=scope, mode=mode)
    return unet
