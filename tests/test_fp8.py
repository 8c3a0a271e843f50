"""fp8.py: float8-stored frozen weights compute as their bf16 rounding; `model.dtype = "fp8"`
and `train.lora_dtype = "bf16"` in a tiny training run on the CPU."""

import pytest
import torch
from torch import nn

from eridiffusion import fp8, ops
from eridiffusion.config import ConfigError
from eridiffusion.fp8 import Float8Weight
from eridiffusion.tiny import demo_config
from eridiffusion.train import train


DEMO_IMAGES = 4  # the `root` fixture's dataset (tests/conftest.py)
def _rounded(layer: nn.Module, dtype) -> nn.Module:
    """The bf16 reference: the same layer with its weight rounded through float8."""
    ref = type(layer)(*_dims(layer)).to(torch.bfloat16)
    ref.load_state_dict({"weight": layer.weight.detach().to(dtype).to(torch.bfloat16), "bias": layer.bias.detach()})
    return ref


def _dims(layer):
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels, layer.kernel_size, 1, layer.padding


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_layers_compute_as_their_rounded_bf16_weights(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(torch.bfloat16).requires_grad_(False)
    conv = ops.Conv2d(4, 6, 3, padding=1).to(torch.bfloat16).requires_grad_(False)
    refs = [_rounded(lin, dtype), _rounded(conv, dtype)]
    saved = fp8.store_float8(nn.Sequential(lin, conv), dtype)
    assert saved == 16 * 8 + 6 * 4 * 9  # one byte of two per weight element
    assert isinstance(lin.weight, Float8Weight) and lin.weight.float8().dtype == dtype
    assert lin.weight.dtype == torch.bfloat16 and not lin.weight.requires_grad and lin.bias.dtype == torch.bfloat16
    x = torch.randn(2, 16, dtype=torch.bfloat16, requires_grad=True)
    torch.testing.assert_close(lin(x), refs[0](x), rtol=0, atol=0)
    xc = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    y = conv(xc)  # ops.Conv2d's frozen path (a custom autograd function)
    torch.testing.assert_close(y, refs[1](xc), rtol=0, atol=0)
    y.sum().backward()
    assert xc.grad is not None
    down = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True)
    out = ops.lora_linear(x, lin.weight, lin.bias, down, up)  # LoRA's fused path
    torch.testing.assert_close(out, refs[0](x) + (x @ down.t()) @ up.t(), rtol=1e-2, atol=1e-2)
    lin.to("cpu")  # a device move keeps float8 storage
    assert lin.weight.float8().dtype == dtype and type(lin.state_dict()["weight"]) is Float8Weight


def test_fp8_refused_where_float8_cannot_be_cast():
    fp8.check_device("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.dtype = 'fp8' needs float8 tensors, which mps lacks"):
        fp8.check_device("fp8", torch.device("mps"))


@pytest.mark.slow
def test_fp8_base_and_bf16_lora_train(root):
    """The frozen UNet in float8, the adapters and AdamW's moments in bf16: a short run trains."""
    cfg = demo_config(root, 6).replace(model={"dtype": "fp8"}, train={"lora_dtype": "bf16"},
                                       save={"output_dir": str(root / "out"), "every_n_steps": 0},
                                       sample={"every_n_steps": 0}, optim={"schedule": "constant"})  # fmt: skip
    lines = []
    result = train(cfg, progress=False, log=lines.append)
    unet = result.components.unet
    weights = [m.weight for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and "lora_" not in n]
    assert weights and all(isinstance(w, Float8Weight) for w in weights)
    assert any("stored as torch.float8_e4m3fn" in line for line in lines)
    lora = result.networks["unet"].lora_parameters()
    assert all(p.dtype == torch.bfloat16 for p in lora)
    assert len(result.losses) == 6 and all(0 < v < 10 for v in result.losses)
    assert result.lora_path.is_file()
