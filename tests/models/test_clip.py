"""Text encoders against transformers (TE1) and diffusers' open_clip conversion + transformers (TE2)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig as HFTextConfig
from transformers import CLIPTextModel as HFTextModel
from transformers import CLIPTextModelWithProjection as HFTextModelWithProjection

from eridiffusion.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    OpenCLIPTextConfig,
    OpenCLIPTextModel,
    TextOutput,
)
from eridiffusion.models.tokenizer import CLIPTokenizer

FIXTURES = Path(__file__).parents[1] / "fixtures"
TE2_PREFIX = "conditioner.embedders.1.model."
PROMPTS = [
    "a photo of a cat",
    "(masterpiece:1.2), best quality, a red fox sitting in the snow, [blue|red] sky, 4k",
    "portrait of an old sailor, " * 20,  # truncated: EOS at position 76
]
TOL = 1e-5


def hf_config(width, layers, heads, mlp, act, proj=None):
    return HFTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=proj or width,
        attn_implementation="eager",  # reference path independent of our SDPA
    )


def randomize(model):
    """Weights of order 1 everywhere (LayerNorm and biases included) so a wrong wiring shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def max_diff(a, b):
    return (a - b).abs().max().item()


def shapes(state_dict):
    return {k: list(v.shape) for k, v in state_dict.items()}


def test_clip_l_tiny_matches_transformers():
    cfg = CLIPTextConfig.tiny()
    ours = randomize(CLIPTextModel(cfg)).eval()
    ref = HFTextModel(hf_config(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, "quick_gelu")).eval()
    # transformers 5 has no `text_model.` wrapper in CLIPTextModel; the checkpoint layout (ours) has it.
    ref.load_state_dict({k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}, strict=True)

    ids = CLIPTokenizer(pad_token_id=49407)(PROMPTS)
    with torch.no_grad():
        out = ours(ids)
        r = ref(input_ids=ids, output_hidden_states=True)
    assert isinstance(out, TextOutput)
    assert out.hidden.shape == (3, 77, cfg.width) and out.pooled.shape == (3, cfg.width)
    diffs = {
        "hidden": max_diff(out.hidden, r.hidden_states[-2]),
        "last": max_diff(out.last, r.last_hidden_state),
        "pooled": max_diff(out.pooled, r.pooler_output),
    }
    assert max(diffs.values()) <= TOL, diffs
    assert out.hidden.std() > 0.5 and out.pooled.std() > 0.5  # the comparison is not of near-zero tensors
    # the penultimate state is not the last one (the last layer really ran after it)
    assert max_diff(out.hidden, r.hidden_states[-1]) > 0.1


def test_bigg_tiny_matches_diffusers_conversion_into_transformers():
    cfg = OpenCLIPTextConfig.tiny()
    ours = randomize(OpenCLIPTextModel(cfg)).eval()
    ref = HFTextModelWithProjection(hf_config(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, "gelu", cfg.proj_dim)).eval()
    checkpoint = {TE2_PREFIX + k: v for k, v in ours.state_dict().items()}
    converted = convert_open_clip_checkpoint(ref, checkpoint, prefix=TE2_PREFIX)
    ref.load_state_dict(converted, strict=True)

    ids = CLIPTokenizer(pad_token_id=0)(PROMPTS)
    assert (ids[0, 7:] == 0).all()  # open_clip padding
    with torch.no_grad():
        out = ours(ids)
        r = ref(input_ids=ids, output_hidden_states=True)
    assert out.pooled.shape == (3, cfg.proj_dim)
    diffs = {
        "hidden": max_diff(out.hidden, r.hidden_states[-2]),
        "last": max_diff(out.last, r.last_hidden_state),
        "pooled": max_diff(out.pooled, r.text_embeds),
    }
    assert max(diffs.values()) <= TOL, diffs
    assert out.hidden.std() > 0.5 and out.pooled.std() > 0.5


def test_bigg_qkv_adapter_adds_to_fused_projection():
    """A (B,T,3D) adapter output equals the same delta folded into in_proj_weight (te2 LoRA contract)."""
    cfg = OpenCLIPTextConfig.tiny()
    model = randomize(OpenCLIPTextModel(cfg)).eval()
    ids = CLIPTokenizer(pad_token_id=0)(PROMPTS[:2])
    attn = model.transformer.resblocks[1].attn
    assert attn.qkv_adapter is None
    delta = torch.nn.Linear(cfg.width, 3 * cfg.width, bias=False)
    torch.nn.init.normal_(delta.weight, std=0.2)
    with torch.no_grad():
        base = model(ids).pooled
        attn.qkv_adapter = delta
        adapted = model(ids).pooled
        attn.qkv_adapter = None
        attn.in_proj_weight += delta.weight
        merged = model(ids).pooled
    assert max_diff(adapted, base) > 0.1
    assert max_diff(adapted, merged) <= TOL


@pytest.mark.parametrize("kind", ["te1", "te2"])
def test_gradient_checkpointing_same_gradients(kind):
    model = CLIPTextModel(CLIPTextConfig.tiny()) if kind == "te1" else OpenCLIPTextModel(OpenCLIPTextConfig.tiny())
    model = randomize(model).train()
    ids = CLIPTokenizer()(PROMPTS[:2])

    def grads():
        model.zero_grad()
        out = model(ids)
        (out.hidden.square().mean() + out.pooled.square().mean()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_clip_l_full_size_keys_and_shapes():
    fixture = json.loads((FIXTURES / "keys_te1.json").read_text())
    with torch.device("meta"):
        ours = CLIPTextModel(CLIPTextConfig.clip_l())
        ref = HFTextModel(hf_config(768, 12, 12, 3072, "quick_gelu"))
    reference = {"text_model." + k: v for k, v in shapes(ref.state_dict()).items() if "position_ids" not in k}
    assert fixture["keys"] == reference  # the fixture is still what transformers builds
    assert shapes(ours.state_dict()) == fixture["keys"]
    assert list(ours.state_dict()) == list(dict(ours.named_parameters()))  # no buffers (no position_ids)
    assert sum(p.numel() for p in ours.parameters()) == fixture["parameters"] == 123_060_480


def test_bigg_full_size_keys_shapes_and_parameter_count():
    fixture = json.loads((FIXTURES / "keys_te2.json").read_text())
    with torch.device("meta"):
        ours = OpenCLIPTextModel(OpenCLIPTextConfig.bigg())
        ref = HFTextModelWithProjection(hf_config(1280, 32, 20, 5120, "gelu", 1280))
    assert shapes(ours.state_dict()) == fixture["keys"]
    # independent route: our keys through diffusers' open_clip converter give exactly transformers' model
    converted = convert_open_clip_checkpoint(ref, {TE2_PREFIX + k: v for k, v in ours.state_dict().items()}, prefix=TE2_PREFIX)
    reference = {k: v for k, v in shapes(ref.state_dict()).items() if "position_ids" not in k}
    assert shapes(converted) == reference
    n_ref = sum(v.numel() for k, v in ref.state_dict().items() if "position_ids" not in k)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == n_ref == fixture["parameters"] == 694_659_840
