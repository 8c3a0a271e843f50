"""Speed settings keep the model's names and its numbers (CPU; the GPU side is test_speed_gpu.py)."""
from __future__ import annotations

import torch

from eridiffusion import speed
from eridiffusion.models.unet import BasicTransformerBlock, ResBlock, UNet, UNetConfig
from eridiffusion.tiny import demo_config, prepare
from eridiffusion.train import train


def test_regional_compile_keeps_state_dict_names_and_outputs():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    keys = list(unet.state_dict())
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    ctx, y = torch.randn(1, 77, 96), torch.randn(1, 256)
    with torch.no_grad():
        ref = unet(x, t, ctx, y)
    n = speed.compile_regions(unet, backend="eager")
    assert n == sum(isinstance(m, (ResBlock, BasicTransformerBlock)) for m in unet.modules()) > 0
    assert list(unet.state_dict()) == keys  # in place: no `_orig_mod.` prefix
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx, y), ref, rtol=0, atol=0)


def test_train_compile_option_compiles_and_gives_the_same_losses(tmp_path, monkeypatch):
    prepare(tmp_path, n_images=4, log=lambda s: None)
    cfg = demo_config(tmp_path, 3).replace(sample={"every_n_steps": 0}, save={"every_n_steps": 0, "overwrite": True},
                                           log={"every": 1})  # fmt: skip
    plain = train(cfg, progress=False, log=lambda s: None)
    calls, original = [], speed.compile_regions

    def eager_regions(unet, **kw):  # dynamo with the eager backend: the wiring, without minutes of inductor
        calls.append(unet)
        return original(unet, **{**kw, "backend": "eager"})

    monkeypatch.setattr(speed, "compile_regions", eager_regions)
    compiled = train(cfg.replace(train={"compile": True}), progress=False, log=lambda s: None)
    assert len(calls) == 1
    assert compiled.losses == plain.losses
