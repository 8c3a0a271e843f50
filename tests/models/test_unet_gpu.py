"""Full-size SDXL UNet on CUDA vs diffusers, through diffusers' own ldm converter (fp32, TF32 off)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from eridiffusion.models.unet import UNet, UNetConfig, sdxl_vector

pytestmark = pytest.mark.gpu

# diffusers' config for SDXL base (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json);
# `attention_head_dim` is the number of heads in diffusers.
DIFFUSERS_SDXL = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> None:
    """Seeded random weights on the model's device: std 1/sqrt(fan_in) keeps activations O(1)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            m.weight.normal_(1.0, 0.1, generator=g)
            m.bias.normal_(0.0, 0.1, generator=g)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.normal_(0.0, 1 / math.sqrt(m.weight[0].numel()), generator=g)
            if m.bias is not None:
                m.bias.normal_(0.0, 0.02, generator=g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_sdxl_full_size_matches_diffusers_on_cuda():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = UNetConfig.sdxl()
    with torch.device("meta"):
        ours = UNet(cfg)
    ours = ours.to_empty(device="cuda").eval()
    randomize(ours, seed=0)

    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 4, 128, 128, device="cuda", generator=g)
    t = torch.tensor([500], device="cuda")
    context = torch.randn(1, 77, cfg.context_dim, device="cuda", generator=g)
    pooled = torch.randn(1, 1280, device="cuda", generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device="cuda")
    a = ours(x, t, context, sdxl_vector(pooled, time_ids)).cpu()

    # hand the same CUDA tensors to diffusers (assign=True: no second copy of the weights)
    ckpt = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    del ours
    converted = convert_ldm_unet_checkpoint(ckpt, DIFFUSERS_SDXL)
    del ckpt
    with torch.device("meta"):
        ref = UNet2DConditionModel(**DIFFUSERS_SDXL)
    ref.load_state_dict(converted, strict=True, assign=True)
    del converted
    b = ref.eval()(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.cpu()

    rel = ((a - b).norm() / b.norm()).item()
    print(f"full SDXL UNet vs diffusers on {torch.cuda.get_device_name()}: relative error {rel:.3e}, "
          f"max abs diff {(a - b).abs().max():.3e}, output std {b.std():.3f}")
    assert torch.isfinite(a).all() and b.std() > 0.1
    assert rel <= 1e-4
