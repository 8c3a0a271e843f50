"""Captions longer than 75 tokens (data.max_tokens 150 / 225) against transformers' CLIP.

The rule, computed here independently on tiny encoders: cut the ids into k = max_tokens / 75
chunks of 75; each chunk is its own sequence BOS, chunk, EOS, pad (TE1 pads with EOS, TE2
with 0; an empty chunk is BOS, EOS, pad), encoded alone; the hidden states are concatenated
along the sequence (ComfyUI comfy/sd1_clip.py at 00728eb20fce05955f89ef1ccf5f6167416e94cf,
A1111) and the pooled output is the first chunk's (ComfyUI `first_pooled`, kohya
`get_hidden_states_sdxl` at 48d368fa557731ad0488c07304dfeba8c07910eb: `pool2[::n_size]`).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig as HFTextConfig
from transformers import CLIPTextModel as HFTextModel
from transformers import CLIPTextModelWithProjection as HFTextModelWithProjection

from eridiffusion import checkpoint
from eridiffusion.data.dataset import build_dataset
from eridiffusion.data.buckets import BucketConfig
from eridiffusion.families.sd import ClipText
from eridiffusion.families.sdxl import DualClipText
from eridiffusion.models.clip import CLIPTextConfig, CLIPTextModel, OpenCLIPTextConfig, OpenCLIPTextModel
from eridiffusion.models.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer
from eridiffusion.pipeline import Pipeline
from eridiffusion.train.setup import report_cut_captions

TE2_PREFIX = "conditioner.embedders.1.model."
LONG = "a watercolor painting of a lighthouse on a cliff at dusk, waves, gulls, " * 6  # 96 tokens
PROMPTS = ["a photo of a cat", LONG, LONG * 3]  # 96 and 288 tokens: 1 chunk, 2, more than 3


def hf_config(width, layers, heads, mlp, act, proj=None):
    return HFTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
                        projection_dim=proj or width, attn_implementation="eager")  # fmt: skip


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    c1, c2 = CLIPTextConfig.tiny(), OpenCLIPTextConfig.tiny()
    te1, te2 = randomize(CLIPTextModel(c1)).eval(), randomize(OpenCLIPTextModel(c2)).eval()
    ref1 = HFTextModel(hf_config(c1.width, c1.layers, c1.heads, c1.mlp_dim, "quick_gelu")).eval()
    ref1.load_state_dict({k.removeprefix("text_model."): v for k, v in te1.state_dict().items()}, strict=True)
    ref2 = HFTextModelWithProjection(hf_config(c2.width, c2.layers, c2.heads, c2.mlp_dim, "gelu", c2.proj_dim)).eval()
    ref2.load_state_dict(convert_open_clip_checkpoint(ref2, {TE2_PREFIX + k: v for k, v in te2.state_dict().items()},
                                                      prefix=TE2_PREFIX), strict=True)  # fmt: skip
    return te1, te2, ref1, ref2


def reference_chunks(text: str, k: int, pad: int) -> torch.Tensor:
    """(k, 77) ids, built here from the token list (not from CLIPTokenizer.chunked)."""
    ids = CLIPTokenizer().encode(text)
    rows = []
    for c in range(k):
        piece = [BOS_ID] + ids[75 * c : 75 * (c + 1)] + [EOS_ID]
        rows.append(piece + [pad] * (77 - len(piece)))
    return torch.tensor(rows)


@torch.no_grad()
@pytest.mark.parametrize("max_tokens", [75, 150, 225])
def test_sdxl_long_prompts_equal_chunked_transformers(encoders, max_tokens):
    te1, te2, ref1, ref2 = encoders
    k = max_tokens // 75
    out = DualClipText(te1, te2, max_tokens)(PROMPTS)
    d = te1.cfg.width + te2.cfg.width
    assert out["context"].shape == (3, 77 * k, d) and out["pooled"].shape == (3, te2.text_projection.shape[1])
    for row, text in enumerate(PROMPTS):
        r1 = ref1(input_ids=reference_chunks(text, k, EOS_ID), output_hidden_states=True)
        r2 = ref2(input_ids=reference_chunks(text, k, 0), output_hidden_states=True)
        hidden = torch.cat([r1.hidden_states[-2], r2.hidden_states[-2]], dim=-1)  # (k, 77, D1 + D2)
        torch.testing.assert_close(out["context"][row], hidden.reshape(77 * k, -1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["pooled"][row], r2.text_embeds[0], rtol=1e-5, atol=1e-5)
    if k > 1:  # the second chunk of the long prompt carries its own tokens (not padding)
        assert (out["context"][1, 77:154] - out["context"][0, 77:154]).abs().max() > 0.1


@torch.no_grad()
def test_sd15_long_prompts_equal_chunked_transformers(encoders):
    te1, _, ref1, _ = encoders
    out = ClipText(te1, 225)(PROMPTS)["context"]
    for row, text in enumerate(PROMPTS):
        last = ref1(input_ids=reference_chunks(text, 3, EOS_ID)).last_hidden_state  # (3, 77, D)
        torch.testing.assert_close(out[row], last.reshape(231, -1), rtol=1e-5, atol=1e-5)


def test_chunked_tokens_and_one_chunk_is_the_plain_tokenizer():
    tok = CLIPTokenizer(pad_token_id=0)
    assert torch.equal(tok.chunked(PROMPTS, 1)[:, 0], tok(PROMPTS))
    ids = tok.chunked(["a cat"], 3)[0]
    assert ids[1, :3].tolist() == [BOS_ID, EOS_ID, 0] and (ids[1, 2:] == 0).all()  # an empty chunk


@torch.no_grad()
def test_pipeline_sdxl_zero_uncond_matches_long_cond():
    c = checkpoint.tiny_components("sdxl-tiny", seed=0)
    pipe = Pipeline(c, max_tokens=150)
    cond, uncond = pipe.encode([LONG])
    assert cond["context"].shape[1] == 154
    assert all(uncond[key].shape == cond[key].shape and not uncond[key].any() for key in cond)
    cond, uncond = pipe.encode([LONG], negative="blurry")  # an encoded negative: same length too
    assert uncond["context"].shape == cond["context"].shape


def test_cut_captions_are_counted(tmp_path):
    from PIL import Image

    for i, caption in enumerate(["short", LONG, LONG * 3]):
        Image.new("RGB", (64, 64)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(caption)
    data = build_dataset(tmp_path, BucketConfig(64, step=32, min_side=32, max_side=128))
    lines = []
    assert report_cut_captions(data, 75, lines.append) == 2
    assert "2 of 3 images" in lines[0] and "data.max_tokens = 75" in lines[0]
    assert report_cut_captions(data, 225, lines.append) == 1
