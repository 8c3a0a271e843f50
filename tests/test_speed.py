"""Speed settings keep the model's names and its numbers (CPU; the GPU side is test_speed_gpu.py)."""
from __future__ import annotations

import pytest
import torch
from conftest import kept_tensors
from torch._dynamo.utils import counters

from eridiffusion import speed
from eridiffusion.config import ConfigError
from eridiffusion.models.unet import (
    GEGLU,
    BasicTransformerBlock,
    CrossAttention,
    ResBlock,
    UNet,
    UNetConfig,
)
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


@pytest.mark.parametrize("spatial_dynamic", [True, False])
def test_spatially_dynamic_regions_compile_once_for_every_bucket(spatial_dynamic):
    """With several buckets each region compiles one graph generic in H and W from the start (a
    square first bucket included: H and W get a symbol each); without, the second shape
    recompiles. Outputs stay the eager ones."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    ctx, y, t = torch.randn(1, 77, 96), torch.randn(1, 256), torch.tensor([500])
    shapes = [(16, 16), (16, 24), (24, 8)]  # latent sizes of three buckets, the first square
    xs = [torch.randn(1, 4, h, w) for h, w in shapes]
    # oneDNN off: on CPU its choice of convolution depends on the size, a guard no GPU graph has
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        refs = [unet(x, t, ctx, y) for x in xs]
        torch._dynamo.reset()
        counters.clear()
        speed.compile_regions(unet, backend="eager", dynamic=None, spatial_dynamic=spatial_dynamic)
        frames = []
        for x, ref in zip(xs, refs):
            torch.testing.assert_close(unet(x, t, ctx, y), ref, rtol=0, atol=0)
            frames.append(counters["frames"]["ok"])
    assert frames[0] > 0 and not counters["graph_break"]
    if spatial_dynamic:
        assert frames == [frames[0]] * 3  # no recompile for the later buckets
    else:
        assert frames[1] > frames[0]  # the static graphs of the first shape do not fit the second


def test_several_shapes_counts_distinct_bucket_sizes():
    assert not speed.several_shapes([(1024, 1024), (1024, 1024)])
    assert speed.several_shapes([(1024, 1024), (832, 1216)])


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
    # equal up to fp32 rounding: compiled graphs add a LoRA's update as a plain add (`ops._plain`), eager by addmm_
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-6, abs=0)

    # train.memory_budget and the recompute settings (speed.partitioner, GEGLU.recompute; off with
    # train.keep_activations or gradient checkpointing) are in force while the steps run, not after
    seen, forward = [], UNet.forward

    def recording_forward(self, *args, **kwargs):
        f = torch._functorch.config
        layers = {m.recompute for m in self.modules() if isinstance(m, (GEGLU, CrossAttention))}
        seen.append((f.activation_memory_budget, not f.ban_recompute_materialized_backward, *layers))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", recording_forward)
    budgeted = train(cfg.replace(train={"compile": True, "memory_budget": 0.5}), progress=False, log=lambda s: None)
    assert seen == [(0.5, True, True)] * 3 and torch._functorch.config.activation_memory_budget == 1.0
    assert torch._functorch.config.ban_recompute_materialized_backward
    assert budgeted.losses == compiled.losses  # the eager backend does not partition: same numbers
    for keep in ({"keep_activations": True}, {"gradient_checkpointing": True}):
        seen.clear()
        train(cfg.replace(train={"compile": True, **keep}), progress=False, log=lambda s: None)
        assert seen == [(1.0, False, False)] * 3, keep
    with pytest.raises(ConfigError, match=r"train.keep_activations = true is invalid: must be false without train.compile"):
        cfg.replace(train={"keep_activations": True}).validate()
    with pytest.raises(ConfigError, match=r"train.memory_budget = 0.5 is invalid: must be 1 without train.compile"):
        cfg.replace(train={"memory_budget": 0.5}).validate()
    with pytest.raises(ConfigError, match=r"train.memory_budget = 0.0 is invalid: must be in \(0, 1\]"):
        cfg.replace(train={"compile": True, "memory_budget": 0}).validate()


def test_fused_qkv_gives_the_same_output_and_gradients_with_and_without_lora():
    """One GEMM for q, k, v (and one rank-3r LoRA down / block-diagonal up) equals three."""
    from eridiffusion import networks

    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).train()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 20])
    ctx, y = torch.randn(2, 77, 96, generator=g), torch.randn(2, 256, generator=g)
    w = torch.randn(2, 4, 16, 16, generator=g)

    def run(fused: bool, params):
        assert speed.fuse_qkv(unet, fused) == sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
        for p in params:
            p.grad = None
        xi = x.clone().requires_grad_()
        out = unet(xi, t, ctx, y)
        (out * w).sum().backward()
        return [out.detach(), xi.grad] + [p.grad for p in params]

    unet.requires_grad_(False)
    plain = run(False, [])
    torch.testing.assert_close(run(True, []), plain, rtol=0, atol=1e-5)
    net = networks.inject(unet, "unet", rank=4, alpha=2)  # q, k, v, out and more, up weights non-zero below
    net.set_multiplier(0.5)
    with torch.no_grad():
        for p in net.lora_parameters():
            p.normal_(std=0.1, generator=g)
    params = net.lora_parameters()
    ref = run(False, params)
    assert (ref[0] - plain[0]).abs().max() > 1e-2  # the LoRA path matters
    for ours, want in zip(run(True, params), ref):
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_optimize_vae_keeps_names_and_values_and_compiles_each_stack_whole(tiny_vae):
    vae, plain = tiny_vae(), tiny_vae()
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    x, z = torch.rand(2, 3, 64, 48) * 2 - 1, torch.randn(2, 4, 8, 6)
    torch._dynamo.reset()
    counters.clear()
    assert speed.optimize_vae(vae, channels_last=False, backend="eager") is vae
    after = vae.state_dict()
    assert list(after) == list(state)  # in place: no `_orig_mod.` prefix
    assert all(torch.equal(after[k], v) for k, v in state.items())
    post, ref = vae.encode(x), plain.encode(x)
    torch.testing.assert_close(post.mean, ref.mean, rtol=0, atol=0)
    torch.testing.assert_close(post.logvar, ref.logvar, rtol=0, atol=0)
    torch.testing.assert_close(vae.decode(z), plain.decode(z), rtol=0, atol=0)
    # one graph for the encoder, one for the decoder: compiled (not silently eager) and no graph break
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


@torch.no_grad()
def test_optimize_vae_channels_last_same_outputs_and_one_graph_for_all_buckets(tiny_vae):
    """Channels-last weights change only the conv kernels' rounding: the compiled VAE (dynamo + AOT
    autograd, eager kernels) equals an eager VAE with the same layout exactly and the plain one to fp32
    rounding; a second image shape compiles a shape-generic graph that a third reuses."""
    vae, plain, same_layout = tiny_vae(), tiny_vae(), tiny_vae()
    same_layout.encoder.to(memory_format=torch.channels_last)
    same_layout.decoder.to(memory_format=torch.channels_last)
    keys = list(vae.state_dict())
    torch._dynamo.reset()
    counters.clear()
    speed.optimize_vae(vae, backend="aot_eager")  # channels_last=True, dynamic=None: as latent caching runs it
    assert list(vae.state_dict()) == keys
    assert vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), plain.state_dict().values()))
    graphs = []
    for h, w in ((64, 48), (48, 64), (64, 64)):  # three aspect buckets
        x, z = torch.rand(2, 3, h, w) * 2 - 1, torch.randn(2, 4, h // 8, w // 8)
        mean, image = vae.encode(x).mean, vae.decode(z)
        graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(mean, same_layout.encode(x).mean, rtol=0, atol=0)
        torch.testing.assert_close(image, same_layout.decode(z), rtol=0, atol=0)
        ref_mean, ref_image = plain.encode(x).mean, plain.decode(z)
        torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-5 * ref_mean.abs().max().item())
        torch.testing.assert_close(image, ref_image, rtol=0, atol=1e-5 * ref_image.abs().max().item())
    assert graphs == [2, 4, 4]  # encoder + decoder static, then shape-generic, then no recompile
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(vae.encode(x.contiguous(memory_format=torch.channels_last)).mean,
                               same_layout.encode(x).mean, rtol=0, atol=0)  # fmt: skip


def test_optimize_vae_rejects_unknown_parts(tiny_vae):
    with pytest.raises(ValueError, match=r"parts \['unet'\] unknown"):
        speed.optimize_vae(tiny_vae(), parts=("encoder", "unet"), backend="eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_latent_cache_with_compile_runs_the_compiled_encoder_and_writes_the_same_latents(tmp_path, monkeypatch):
    """`train.compile` on CUDA: the cache fill compiles the VAE encoder (two bucket shapes: the static
    graph, then the shape-generic one) and writes the latents the eager encoder writes."""
    from safetensors.torch import load_file

    from eridiffusion.train import build_cache

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions on both sides
    prepare(tmp_path, n_images=4, log=lambda s: None)
    cfg = demo_config(tmp_path, 1).replace(train={"device": "cuda"})
    build_cache(cfg.replace(cache={"dir": str(tmp_path / "eager")}), log=lambda s: None, progress=False)
    calls, original = [], speed.optimize_vae
    monkeypatch.setattr(speed, "VAE_COMPILE_MIN_IMAGES", 1)
    monkeypatch.setattr(speed, "optimize_vae", lambda vae, **kw: calls.append(kw) or original(vae, **kw))
    build_cache(cfg.replace(train={"compile": True}, cache={"dir": str(tmp_path / "compiled")}), log=lambda s: None,
                progress=False)  # fmt: skip
    assert calls == [{"parts": ("encoder",), "dynamic": None}]
    eager = sorted((tmp_path / "eager" / "latent").rglob("*.safetensors"))
    assert len(eager) == 8  # 4 images × 2 flips, in two bucket shapes
    for path in eager:
        want = load_file(path)
        got = load_file(tmp_path / "compiled" / path.relative_to(tmp_path / "eager"))
        for k in ("mean", "std"):
            # fp32; other conv kernels and the fused GroupNorm round differently, and GroupNorm over the
            # flat-colour images' near-constant groups amplifies that: on the CPU, channels-last weights
            # alone move these latents by up to 4e-3 of their largest value (random photos: 3e-6)
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-2 * want[k].abs().max().item())


def test_checkpointing_compiled_blocks_gives_the_eager_gradients(backend="aot_eager"):
    """A checkpoint around each compiled block body: no graph break, and the LoRA gradients
    equal the eager ones without checkpointing."""
    from eridiffusion import networks

    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 20])
    ctx, y, w = torch.randn(2, 77, 96), torch.randn(2, 256), torch.randn(2, 4, 16, 16)

    def grads(ckpt: bool, compiled: bool):
        torch.manual_seed(1)
        unet = UNet(UNetConfig.tiny()).requires_grad_(False)
        net = networks.inject(unet, "unet", rank=4, alpha=4, targets=["*.to_q", "*.to_k", "*.to_v", "*.to_out.0"])
        for p in net.lora_parameters():
            torch.nn.init.normal_(p, std=0.05)
        unet.train()
        speed.fuse_qkv(unet)
        unet.gradient_checkpointing = ckpt
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            speed.compile_regions(unet, backend=backend)
        (unet(x, t, ctx, y) * w).sum().backward()
        if compiled:
            assert not counters["graph_break"] and counters["stats"]["unique_graphs"] > 0
        return {n: p.grad for n, p in net.named_parameters()}

    ref, got = grads(False, False), grads(True, True)
    assert ref.keys() == got.keys() and len(ref) > 0
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_every_sdxl_block_compiles_none_is_left_eager_by_the_recompile_limit():
    """SDXL has 14 ResBlock shapes and 2 transformer-block shapes: all 16 compile (torch's
    default limit of 8 graphs per function would run 6 ResBlocks eagerly)."""
    torch._dynamo.reset()
    counters.clear()
    with torch.device("meta"):
        unet = UNet(UNetConfig.sdxl()).to(torch.bfloat16).requires_grad_(False)
    unet.out[2].weight.requires_grad_(True)  # a backward through every block
    unet.train()
    speed.compile_regions(unet, backend="eager")
    with torch.device("meta"):
        x, ctx = torch.randn(1, 4, 128, 128, dtype=torch.bfloat16), torch.randn(1, 77, 2048, dtype=torch.bfloat16)
        unet(x, torch.tensor([10]), ctx, torch.randn(1, 2816, dtype=torch.bfloat16))
    assert counters["stats"]["unique_graphs"] == 16
    assert counters["frames"]["total"] == counters["frames"]["ok"] == 16


@pytest.mark.parametrize("on", [False, True])
def test_cudnn_autotuning_follows_the_setting(monkeypatch, on):
    """train.cudnn_benchmark reaches cuDNN (off by default: seconds at every new bucket)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the CUDA branch, run on the CPU
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not on)
    speed.optimize_for_training(UNet(UNetConfig.tiny()), compile=False, cudnn_benchmark=on)
    assert torch.backends.cudnn.benchmark is on


def test_train_passes_its_cudnn_setting(monkeypatch):
    from types import SimpleNamespace

    from eridiffusion.config import TrainConfig
    from eridiffusion.families import FAMILIES
    from eridiffusion.train import run

    seen = {}
    monkeypatch.setattr(speed, "optimize_for_training", lambda unet, **kw: seen.update(kw))
    c = SimpleNamespace(unet=UNet(UNetConfig.tiny()), family=FAMILIES["sdxl-tiny"])
    assert TrainConfig().train.cudnn_benchmark is False
    run.make_fast(TrainConfig.from_dict({"train": {"cudnn_benchmark": True}}), c, [(64, 64)])
    assert seen["cudnn_benchmark"] is True


def test_warm_up_flushes_until_nothing_new_was_compiled_then_at_most_three_rounds():
    """speed._warm_up: after the first run, prepare() (Regions.flush) and one more run while it
    compiled something, so a capture records no eager block; a flush that keeps finding calls stops."""
    runs = []
    answers = iter([True, True, False])
    speed._warm_up(lambda: runs.append("run"), [], {}, warmup=2, prepare=lambda: next(answers))
    assert len(runs) == 2 + 2  # two warm-ups, and one re-run after each flush that compiled something
    runs.clear()
    speed._warm_up(lambda: runs.append("run"), [], {}, warmup=2, prepare=lambda: True)
    assert len(runs) == 2 + 3


def kept_for_backward(recompute: bool, device: str = "cpu", dim: int = 64, tokens: int = 64, batch: int = 2):
    """A compiled fp32 transformer block with LoRA (fused q/k/v), `speed.recompute_in_backward` and
    `speed.partitioner`'s remat on or off: the input and LoRA gradients of one step and
    (shapes, bytes) of every storage its forward kept for backward (parameters aside)."""
    import types

    from eridiffusion import networks

    torch._dynamo.reset()
    torch.manual_seed(0)
    holder = torch.nn.Module()  # LoRA target names as in a UNet ("….transformer_blocks.0.ff.net.2")
    holder.a = torch.nn.Module()
    holder.a.transformer_blocks = torch.nn.ModuleList([BasicTransformerBlock(dim, 32, 2)])
    holder.to(device).requires_grad_(False)
    holder.cfg = types.SimpleNamespace(adm_in_channels=2816)
    net = networks.inject(holder, "unet", rank=4, alpha=4).to(device)
    for p in net.lora_parameters():
        torch.nn.init.normal_(p, std=0.1)
    block = holder.a.transformer_blocks[0]
    speed.fuse_qkv(holder)
    assert speed.recompute_in_backward(holder, recompute) == 1
    speed.compile_regions(holder)
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
    ctx = torch.randn(batch, 7, 32, device=device)
    with speed.partitioner(remat=recompute):
        block(x, ctx).sum().backward()  # compiles
    x.grad = None
    for p in net.lora_parameters():
        p.grad = None
    out, kept = kept_tensors(block, x, ctx, exclude=list(holder.parameters()))
    out.sum().backward()
    return [x.grad, *(p.grad for p in net.lora_parameters())], kept


def check_recompute_keeps_less(device: str = "cpu", dim: int = 64, tokens: int = 64, batch: int = 2) -> None:
    (want, kept), (got, fewer) = (kept_for_backward(r, device, dim, tokens, batch) for r in (False, True))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    values = 4  # bytes per fp32 value
    geglu_out, norm_out = batch * tokens * 4 * dim * values, batch * tokens * dim * values
    assert sum(n for _, n in kept) - sum(n for _, n in fewer) >= geglu_out + 3 * norm_out
    weight = (3 * dim, dim)  # the fused q/k/v weight
    assert any(weight in shapes for shapes, _ in kept) and not any(weight in shapes for shapes, _ in fewer)


@pytest.mark.parametrize("triton_op", [False, True], ids=["plain", "kernels-op"])
def test_recompute_in_backward_keeps_less_and_gives_the_same_gradients(monkeypatch, triton_op):
    """With `speed.recompute_in_backward` and `speed.partitioner`'s remat a compiled transformer
    block keeps neither the GEGLU output nor the LayerNorm outputs nor the fused q/k/v weight for
    backward, and its gradients equal the keeping block's. `kernels-op`: the
    GEGLU through `kernels.geglu`'s custom op with its CPU body (torch traces into it on the CPU;
    on CUDA, where the partitioner cannot recompute it alone: tests/test_kernels_gpu.py)."""
    from eridiffusion import kernels

    if triton_op:
        monkeypatch.setattr(kernels, "available", lambda t: True)
    check_recompute_keeps_less()


def test_partitioner_works_in_a_process_that_has_compiled_nothing():
    """`speed.partitioner` patches torch._functorch.config, which `import torch` does not load."""
    import subprocess
    import sys

    code = ("import torch; from eridiffusion import speed\n"
            "with speed.partitioner(0.5, remat=True):\n"
            "    c = torch._functorch.config\n"
            "    assert c.activation_memory_budget == 0.5 and not c.ban_recompute_materialized_backward\n"
            "assert c.activation_memory_budget == 1.0 and c.ban_recompute_materialized_backward")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
