"""LoRA: identity at init, merge, frozen base, file round trip, and the file read by diffusers
(through its own kohya loader + peft) and by ComfyUI's key mapping, on the tiny models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors import safe_open

from eridiffusion import networks
from eridiffusion.checkpoint import tiny_components
from lora_helpers import FAMILIES, inject_all, max_diff, outputs, randomize, text_ids, unet_inputs


# -- the adapters ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_inject_is_identity_then_merge_matches(family):
    c = tiny_components(family)
    base_sd = {part: {k: v.clone() for k, v in m.state_dict().items()} for part, m in c.items() if part != "vae"}
    base = outputs(c)
    nets = inject_all(c, conv_rank=2, conv_alpha=1.0)

    after = outputs(c)
    assert all(torch.equal(after[k], base[k]) for k in base)  # up = 0: bit-identical at step 0
    for part, sd0 in base_sd.items():  # base weights keep their checkpoint names
        sd = getattr(c, part).state_dict()
        assert {k for k in sd if "lora_" not in k} == set(sd0)
        assert all(torch.equal(sd[k], v) for k, v in sd0.items())

    randomize(nets.values())
    live = outputs(c)
    assert max_diff(live, base) > 1e-2  # the LoRA does something
    for net in nets.values():
        net.merge()
    merged = outputs(c)
    print(f"{family} merged vs unmerged max abs diff {max_diff(merged, live):.2e}")
    assert max_diff(merged, live) <= 1e-5
    for net in nets.values():
        net.unmerge()
        net.set_multiplier(0.0)
    assert max_diff(outputs(c), base) <= 1e-5  # unmerged and strength 0: the base model again


def test_kohya_names_and_ranks():
    c = tiny_components("sdxl-tiny")
    nets = inject_all(c, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)
    u = nets["unet"].loras
    # ldm names for SDXL; LoCon 3x3 down on ResBlock convs, linear rank on emb_layers / 1x1 skip
    assert u["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"].lora_down.weight.shape == (4, 64)
    assert u["lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj"].lora_up.weight.shape == (1024, 4)
    assert u["lora_unet_input_blocks_4_0_in_layers_2"].lora_down.weight.shape == (2, 32, 3, 3)
    assert u["lora_unet_input_blocks_4_0_in_layers_2"].lora_up.weight.shape == (64, 2, 1, 1)
    assert u["lora_unet_input_blocks_4_0_skip_connection"].lora_down.weight.shape == (4, 32, 1, 1)
    assert u["lora_unet_input_blocks_4_0_emb_layers_1"].lora_down.weight.shape == (4, 128)
    assert u["lora_unet_input_blocks_3_0_op"].lora_down.weight.shape == (2, 32, 3, 3)
    assert u["lora_unet_output_blocks_2_2_conv"].scale == 0.5
    assert u["lora_unet_output_blocks_5_1_proj_out"].scale == 0.5
    assert "lora_unet_input_blocks_1_1_proj_in" not in u  # level 0 of SDXL has no transformer
    te2 = nets["te2"].loras
    assert set(te2) == {f"lora_te2_text_model_encoder_layers_{n}_{s}" for n in range(3)
                        for s in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                                  "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}
    assert set(nets["te1"].loras) == {k.replace("lora_te2_", "lora_te1_") for k in te2}

    sd15 = tiny_components("sd15-tiny")
    s = networks.inject(sd15.unet, "unet", 4, 4.0, conv_rank=2).loras
    # diffusers-derived names for SD1.5 (kohya's SD1.x convention); 1x1 Conv proj_in
    assert s["lora_unet_down_blocks_0_attentions_1_proj_in"].lora_down.weight.shape == (4, 32, 1, 1)
    assert "lora_unet_down_blocks_1_resnets_0_conv_shortcut" in s
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in s and "lora_unet_up_blocks_1_upsamplers_0_conv" in s
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in s
    assert "lora_unet_up_blocks_2_attentions_2_transformer_blocks_0_ff_net_2" in s
    assert "lora_unet_up_blocks_0_resnets_2_time_emb_proj" in s


def test_targets_patterns_and_errors():
    c = tiny_components("sdxl-tiny")
    n_blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in c.unet.modules())
    net = networks.inject(c.unet, "unet", 2, 2.0, targets=["*.attn2.to_[kv]"])
    assert n_blocks == 11 and sorted(net.loras)[:2] == [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v"]
    assert len(net.loras) == 2 * n_blocks
    with pytest.raises(networks.LoRAError, match="conv_rank"):
        networks.inject(tiny_components("sdxl-tiny").unet, "unet", 2, 2.0, targets=["*.in_layers.2"])
    with pytest.raises(networks.LoRAError, match="no unet module matches"):
        networks.inject(tiny_components("sdxl-tiny").unet, "unet", 2, 2.0, targets=["*.nothing"])


def test_only_lora_trains_and_base_is_bit_identical():
    c = tiny_components("sdxl-tiny")
    nets = inject_all(c, conv_rank=2, dropout=0.1)
    params = [p for net in nets.values() for p in net.lora_parameters()]
    trainable = {id(p) for part, m in c.items() for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    randomize(nets.values())
    frozen = {f"{part}.{k}": v.clone() for part, m in c.items() for k, v in m.state_dict().items() if "lora_" not in k}
    before = [p.detach().clone() for p in params]

    c.unet.train(), c.te1.train(), c.te2.train()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    (inp, _) = unet_inputs(c.unet.cfg)
    o1, o2 = c.te1(text_ids()), c.te2(text_ids())
    ctx = torch.cat([o1.hidden, o2.hidden], dim=-1)[:, :8]
    loss = c.unet(inp[0], inp[1], ctx, inp[3]).square().mean() + o1.last.square().mean() + o2.pooled.square().mean()
    loss.backward()
    opt.step()

    after = {f"{part}.{k}": v for part, m in c.items() for k, v in m.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)
    changed = [not torch.equal(p, q) for p, q in zip(params, before)]
    assert all(changed)  # every down and up of unet, te1 and te2 (incl. the fused q/k/v) got a gradient


def test_bf16_base_with_fp32_lora():
    c = tiny_components("sdxl-tiny")
    c.unet.to(torch.bfloat16)
    net = networks.inject(c.unet, "unet", 4, 4.0, conv_rank=2)
    randomize([net])
    assert all(p.dtype == torch.float32 for p in net.lora_parameters())
    inp, _ = unet_inputs(c.unet.cfg)
    out = c.unet(*inp)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.lora_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_lora_linear_equals_the_plain_formula(dtype, bias):
    """The epilogue-fused forward / backward gives W x + b + (alpha/rank)·m·B(A x) and its
    gradients (input, down, up), as plain fp32 autograd computes them from the same values
    (bf16: within 1% of each tensor's largest value)."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=bias).to(dtype).requires_grad_(False)
    layer = networks.LoRALinear(base, rank=4, alpha=2.0)
    with torch.no_grad():
        layer.lora_up.weight.normal_(generator=g)
    layer.multiplier = 0.7
    x = torch.randn(3, 5, 24, generator=g, dtype=dtype)
    w_out = torch.randn(3, 5, 40, generator=g)

    def run(fn, x):
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = fn(xi)
        (out.float() * w_out).sum().backward()
        return out.detach().float(), xi.grad.float(), layer.lora_down.weight.grad, layer.lora_up.weight.grad

    def plain(xi):  # fp32 throughout, from the stored (bf16-valued) weights
        a, b = layer.lora_down.weight.to(dtype).float(), layer.lora_up.weight.to(dtype).float()
        bias = None if base.bias is None else base.bias.float()
        return torch.nn.functional.linear(xi, base.weight.float(), bias) + (xi @ a.t() @ b.t()) * (0.5 * 0.7)

    refs = run(plain, x.float())
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # traces the autograd.Function
    for fn in (layer, compiled):
        for ours, ref in zip(run(fn, x), refs):
            atol = 1e-5 if dtype == torch.float32 else 1e-2 * ref.abs().max().item()
            torch.testing.assert_close(ours, ref, rtol=0, atol=atol)


def test_full_size_names_are_kohyas_and_hit_real_checkpoint_keys():
    """Real SDXL / SD1.5 sizes on the meta device: kohya's module counts (UNet 722 / 192, CLIP-L 72,
    bigG 192) and every name is a real checkpoint weight under ComfyUI's naming rules."""
    import json
    from pathlib import Path

    from eridiffusion.models.clip import CLIPTextConfig, CLIPTextModel, OpenCLIPTextConfig, OpenCLIPTextModel
    from eridiffusion.models.unet import UNet, UNetConfig

    fixtures = Path(__file__).parent.parent / "fixtures"
    with torch.device("meta"):
        models = {"sdxl": UNet(UNetConfig.sdxl()), "sd15": UNet(UNetConfig.sd15()),
                  "te1": CLIPTextModel(CLIPTextConfig.clip_l()), "te2": OpenCLIPTextModel(OpenCLIPTextConfig.bigg())}
    counts = {k: len(networks.inject(m, "te1" if k == "te1" else k if k == "te2" else "unet", 8, 8.0).loras)
              for k, m in models.items()}
    assert counts == {"sdxl": 722, "sd15": 192, "te1": 72, "te2": 192}

    for family in ("sdxl", "sd15"):
        with torch.device("meta"):
            unet = UNet(getattr(UNetConfig, family)())
        net = networks.inject(unet, "unet", 8, 8.0, conv_rank=4)
        real = dict(json.loads((fixtures / f"keys_unet_{family}.json").read_text())["keys"])
        names = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in real if k.endswith(".weight")}
        if family == "sd15":
            names = {"lora_unet_" + d.replace(".", "_"): f"{ldm}.weight"
                     for d, ldm in comfy_unet_to_diffusers(unet.cfg).items() if f"{ldm}.weight" in real}
        for name, m in net.loras.items():
            shape = real[names[name]]
            assert [m.lora_up.weight.shape[0], *m.lora_down.weight.shape[1:]] == shape, name


# -- diffusers reads our file (its own kohya converter + peft) -------------------------------


def diffusers_unet(unet):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = unet.cfg
    levels = len(cfg.channel_mult)
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.transformer_depth]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(cfg.transformer_depth)]
    config = dict(
        sample_size=16, in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult], layers_per_block=cfg.num_res_blocks,
        transformer_layers_per_block=[max(d, 1) for d in cfg.transformer_depth], attention_head_dim=list(cfg.num_heads),
        cross_attention_dim=cfg.context_dim, use_linear_projection=cfg.use_linear, norm_num_groups=32,
    )
    assert len(down) == levels
    if cfg.adm_in_channels is not None:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=cfg.addition_time_embed_dim,
                      projection_class_embeddings_input_dim=cfg.adm_in_channels)
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    ref = UNet2DConditionModel(**config).eval()
    ref.load_state_dict(convert_ldm_unet_checkpoint(state, config), strict=True)
    return ref


def hf_text_config(cfg, **extra):
    """transformers' CLIPTextConfig for one of our text-encoder configs."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_positions, hidden_act=cfg.act,
        layer_norm_eps=cfg.eps, eos_token_id=49407, **extra,
    )  # fmt: skip


def hf_clip(te1):
    from transformers import CLIPTextModel

    return load_hf(CLIPTextModel(hf_text_config(te1.cfg)).eval(), te1.state_dict())


def load_hf(ref, sd: dict):
    """Strict load into a transformers CLIP model (transformers 5 drops the `text_model.` prefix
    of CLIPTextModel; the buffer `position_ids` is the model's own)."""
    if not any(k.startswith("text_model.") for k in ref.state_dict()):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert unexpected == [] and all("position_ids" in k for k in missing), (missing, unexpected)
    return ref


def openclip_to_hf(sd: dict, prefix: str = "") -> dict:
    """open_clip text keys -> transformers CLIP keys: ComfyUI `comfy/utils.py`
    `transformers_convert` + `clip_text_transformers_convert` (commit 2ba5cc8b): in_proj rows
    split into q, k, v; c_fc/c_proj -> fc1/fc2; text_projection transposed into a Linear weight."""
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
               "attn.out_proj": "self_attn.out_proj"}
    out = {}
    for k, v in sd.items():
        if k == "token_embedding.weight":
            out[prefix + "text_model.embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out[prefix + "text_model.embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out[prefix + "text_model.final_layer_norm." + k.split(".")[-1]] = v
        elif k == "text_projection":
            out[prefix + "text_projection.weight"] = v.t().contiguous()
        else:
            _, _, n, rest = k.split(".", 3)
            layer = f"{prefix}text_model.encoder.layers.{n}."
            if rest.startswith("attn.in_proj_"):
                end = rest.rsplit("_", 1)[1]
                for q, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3)):
                    out[f"{layer}self_attn.{q}.{end}"] = part
            else:
                mod, end = rest.rsplit(".", 1)
                out[f"{layer}{renames[mod]}.{end}"] = v
    return out


def hf_clip_g(te2):
    from transformers import CLIPTextModelWithProjection

    ref = CLIPTextModelWithProjection(hf_text_config(te2.cfg, projection_dim=te2.cfg.proj_dim)).eval()
    return load_hf(ref, openclip_to_hf(te2.state_dict()))


@torch.no_grad()
def hf_text(ref, ids):
    o = ref(ids, output_hidden_states=True)
    pooled = o.text_embeds if hasattr(o, "text_embeds") else o.pooler_output
    return torch.cat([o.hidden_states[-2].flatten(1), o.last_hidden_state.flatten(1), pooled], dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_loads_our_file(family, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline if family == "sdxl-tiny" else StableDiffusionPipeline
    c = tiny_components(family)
    refs = {"unet": diffusers_unet(c.unet), "te1": hf_clip(c.te1)}
    if c.te2 is not None:
        refs["te2"] = hf_clip_g(c.te2)
    (x, t, ctx, *_), extra = unet_inputs(c.unet.cfg)
    kw = {"added_cond_kwargs": {"text_embeds": extra["pooled"], "time_ids": extra["time_ids"]}} if extra else {}

    def ref_outputs():
        with torch.no_grad():
            out = {"unet": refs["unet"](x, t, encoder_hidden_states=ctx, **kw).sample}
        out.update({p: hf_text(refs[p], text_ids()) for p in ("te1", "te2") if p in refs})
        return out

    base = outputs(c)
    assert max_diff(ref_outputs(), base) <= 1e-5  # the twins agree before any LoRA
    nets = inject_all(c, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)
    randomize(nets.values())
    ours = outputs(c)
    path = tmp_path / "ours.safetensors"
    networks.save_lora(path, list(nets.values()), dtype=torch.float32)

    state, alphas = pipe.lora_state_dict(str(path), unet_config=refs["unet"].config)
    pipe.load_lora_into_unet(state, alphas, unet=refs["unet"])
    pipe.load_lora_into_text_encoder(state, alphas, text_encoder=refs["te1"], prefix="text_encoder")
    if "te2" in refs:
        pipe.load_lora_into_text_encoder(state, alphas, text_encoder=refs["te2"], prefix="text_encoder_2")
    theirs = ref_outputs()
    for part, ref in refs.items():  # peft wrapped exactly the layers we adapt: no key was dropped
        n_peft = sum(type(m).__module__.startswith("peft.") and hasattr(m, "lora_A") for m in ref.modules())
        assert n_peft == len(nets["te" if part == "te1" and c.te2 is None else part].loras), part
    for part in ours:
        d = (theirs[part] - ours[part]).abs().max().item()
        print(f"{family} {part}: diffusers+peft vs ours with LoRA {d:.2e} (LoRA effect {(ours[part] - base[part]).abs().max():.2e})")
        assert (ours[part] - base[part]).abs().max() > 1e-2
        assert d <= 1e-5


# -- ComfyUI's key mapping, re-implemented -------------------------------------------------
# comfyanonymous/ComfyUI comfy/lora.py @ 41444b52 (`model_lora_keys_unet`, `model_lora_keys_clip`,
# `load_lora`, LORA_CLIP_MAP) and comfy/utils.py @ 2ba5cc8b (`unet_to_diffusers`).

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}
RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
          "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
ATTN = ["proj_in", "proj_out", "norm"]
BLOCK = ["norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
         "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]


def comfy_unet_to_diffusers(cfg) -> dict[str, str]:
    """diffusers module -> ldm module (no .weight/.bias suffix), as ComfyUI's `unet_to_diffusers`."""
    nrb, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    depth = [d for d in cfg.transformer_depth for _ in range(nrb)]
    depth_out = [d for d in cfg.transformer_depth for _ in range(nrb + 1)]
    m = {}
    for x in range(levels):
        n = 1 + (nrb + 1) * x
        for i in range(nrb):
            m.update({f"down_blocks.{x}.resnets.{i}.{d}": f"input_blocks.{n}.0.{b}" for b, d in RESNET.items()})
            t = depth.pop(0)
            if t:
                m.update({f"down_blocks.{x}.attentions.{i}.{b}": f"input_blocks.{n}.1.{b}" for b in ATTN})
                for j in range(t):
                    m.update({f"down_blocks.{x}.attentions.{i}.transformer_blocks.{j}.{b}":
                              f"input_blocks.{n}.1.transformer_blocks.{j}.{b}" for b in BLOCK})
            n += 1
        m[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    m.update({f"mid_block.attentions.0.{b}": f"middle_block.1.{b}" for b in ATTN})
    for j in range(cfg.transformer_depth_middle):
        m.update({f"mid_block.attentions.0.transformer_blocks.{j}.{b}": f"middle_block.1.transformer_blocks.{j}.{b}"
                  for b in BLOCK})
    for i, n in enumerate([0, 2]):
        m.update({f"mid_block.resnets.{i}.{d}": f"middle_block.{n}.{b}" for b, d in RESNET.items()})
    for x in range(levels):
        n = (nrb + 1) * x
        for i in range(nrb + 1):
            c = 1
            m.update({f"up_blocks.{x}.resnets.{i}.{d}": f"output_blocks.{n}.0.{b}" for b, d in RESNET.items()})
            t = depth_out.pop()
            if t:
                c += 1
                m.update({f"up_blocks.{x}.attentions.{i}.{b}": f"output_blocks.{n}.1.{b}" for b in ATTN})
                for j in range(t):
                    m.update({f"up_blocks.{x}.attentions.{i}.transformer_blocks.{j}.{b}":
                              f"output_blocks.{n}.1.transformer_blocks.{j}.{b}" for b in BLOCK})
            if i == nrb:
                m[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    m.update({"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2"})
    return m


def comfy_state(c) -> dict[str, torch.Tensor]:
    """The model state dict ComfyUI patches: `diffusion_model.*`, `clip_l.transformer.*`, `clip_g.transformer.*`."""
    sd = {"diffusion_model." + k: v.clone() for k, v in c.unet.state_dict().items()}
    sd.update({"clip_l.transformer." + k: v.clone() for k, v in c.te1.state_dict().items()})
    if c.te2 is not None:
        sd.update({k: v.clone() for k, v in openclip_to_hf(c.te2.state_dict(), "clip_g.transformer.").items()})
    return sd


def comfy_key_map(c, sdk) -> dict[str, str]:
    key_map = {}
    for k in sdk:  # model_lora_keys_unet, ldm names
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    for dk, ldm in comfy_unet_to_diffusers(c.unet.cfg).items():  # and diffusers-derived names
        key_map["lora_unet_" + dk.replace(".", "_")] = f"diffusion_model.{ldm}.weight"
    clip_l_present = False  # model_lora_keys_clip
    for b in range(32):
        for hf, kohya in LORA_CLIP_MAP.items():
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{hf}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{kohya}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{kohya}"] = k
                clip_l_present = True
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{hf}.weight"
            if k in sdk and clip_l_present:
                key_map[f"lora_te2_text_model_encoder_layers_{b}_{kohya}"] = k
    return key_map


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_maps_every_key_and_patches_the_same_weights(family, tmp_path):
    c = tiny_components(family)
    nets = inject_all(c, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)
    randomize(nets.values())
    ours = outputs(c)
    path = tmp_path / "ours.safetensors"
    networks.save_lora(path, list(nets.values()), dtype=torch.float32)
    with safe_open(str(path), "pt") as f:
        file = {k: f.get_tensor(k) for k in f.keys()}

    fresh = tiny_components(family)
    sd = comfy_state(fresh)
    key_map = comfy_key_map(fresh, set(sd))
    loaded, strength = set(), 1.0
    for name, target in key_map.items():  # comfy/lora.py load_lora + the "lora" weight patch
        if f"{name}.lora_up.weight" not in file:
            continue
        up, down, alpha = file[f"{name}.lora_up.weight"], file[f"{name}.lora_down.weight"], file[f"{name}.alpha"]
        loaded |= {f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"}
        assert target in sd, target
        w = sd[target]
        assert up.shape[0] * math.prod(down.shape[1:]) == w.numel(), name
        w += strength * (alpha.item() / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    not_loaded = sorted(set(file) - loaded)
    assert not_loaded == []  # ComfyUI would log "lora key not loaded" for each of these

    # back into our layout: the ComfyUI-patched weights give the outputs of our LoRA
    fresh.unet.load_state_dict({k[len("diffusion_model."):]: v for k, v in sd.items() if k.startswith("diffusion_model.")})
    fresh.te1.load_state_dict({k[len("clip_l.transformer."):]: v for k, v in sd.items() if k.startswith("clip_l.")})
    if fresh.te2 is not None:
        te2 = copy.deepcopy(fresh.te2.state_dict())
        g = "clip_g.transformer.text_model.encoder.layers."
        for n in range(fresh.te2.cfg.layers):
            for end in ("weight", "bias"):
                te2[f"transformer.resblocks.{n}.attn.in_proj_{end}"] = torch.cat(
                    [sd[f"{g}{n}.self_attn.{p}.{end}"] for p in ("q_proj", "k_proj", "v_proj")])
            for ours_name, hf in (("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                for end in ("weight", "bias"):
                    te2[f"transformer.resblocks.{n}.{ours_name}.{end}"] = sd[f"{g}{n}.{hf}.{end}"]
        fresh.te2.load_state_dict(te2)
    d = max_diff(outputs(fresh), ours)
    print(f"{family}: ComfyUI-style patched weights vs our LoRA {d:.2e}")
    assert d <= 1e-5
