"""Full fine-tuning (`train.mode = "finetune"`) on the tiny SDXL-layout model (CPU).

One run (module fixture) is the reference: it lowers a fixed evaluation loss, its EMA equals
diffusers' `EMAModel` fed the same weights after each optimizer step, its checkpoint loads
strictly and reproduces the trained UNet exactly, and a run stopped half-way and resumed
ends with the same losses, weights, EMA and optimizer state bit for bit.
"""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from eridiffusion import checkpoint, diffusion
from eridiffusion.config import ConfigError, TrainConfig
from eridiffusion.families import FAMILIES
from eridiffusion.tiny import demo_config
from eridiffusion.train import diffusion_loss, train
from eridiffusion.train.finetune import EMA
from eridiffusion.train.run import check_cuda_graph

STEPS, EVERY, DECAY = 24, 2, 0.9
DEMO_IMAGES = 4  # the `root` fixture's dataset (tests/conftest.py)
QUIET = {"progress": False, "log": lambda s: None}


def _cfg(root, out, steps=STEPS, **sections):
    """64² buckets (a quarter of the demo's work per step), the UNet's weights, EMA on the CPU."""
    cfg = demo_config(root, steps)
    return cfg.replace(
        data={"resolution": 64, "bucket_min": 64, "bucket_max": 128, "flip": False, "caption_dropout": 0.0},
        optim={"unet_lr": 1e-3, "schedule": "constant", "warmup_steps": 0, **sections.pop("optim", {})},
        train={"mode": "finetune", "ema_decay": DECAY, "ema_every_n_steps": EVERY, "ema_device": "cpu",
               **sections.pop("train", {})},
        save={"output_dir": str(root / out), "every_n_steps": 0, "save_dtype": "fp32", "finetune_weights": "raw",
              **sections.pop("save", {})},
        sample={"every_n_steps": 0}, cache={"dir": str(root / "cache")}, **sections,
    )  # fmt: skip


def _eval_loss(unet, root):
    """Plain MSE on a fixed batch: every cached 64² latent, fixed noise and timesteps."""
    latents = [load_file(p) for p in sorted((root / "cache" / "latent").rglob("*.safetensors"))]
    latents = [e for e in latents if e["mean"].shape[-1] == 8]
    texts = [load_file(p) for p in sorted((root / "cache" / "text").rglob("*.safetensors"))]
    x0 = torch.stack([e["mean"] for e in latents])
    time_ids = torch.stack([e["time_ids"] for e in latents])
    cond = {k: torch.stack([texts[i % len(texts)][k] for i in range(len(latents))]) for k in texts[0]}
    t = torch.linspace(20, 980, len(latents)).long()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1234))
    ac = diffusion.alphas_cumprod(diffusion.scaled_linear_betas())
    unet.eval()
    with torch.no_grad():
        return diffusion_loss(FAMILIES["sdxl-tiny"], unet, x0, cond, time_ids, t, noise, ac, "epsilon").item()


@pytest.fixture(scope="module")
def reference(root):
    """The uninterrupted run, and diffusers' EMAModel stepped on its weights every EVERY steps."""
    from diffusers.training_utils import EMAModel

    initial = checkpoint.load(root / "tiny_sdxl.safetensors").unet.requires_grad_(True)
    seen = {"steps": 0, "ema": EMAModel(initial.parameters(), decay=DECAY)}  # starts at the weights, as ours

    def follow(optimizer, args, kwargs):  # after each optimizer step of the run
        params = [p for g in optimizer.param_groups for p in g["params"]]
        seen["steps"] += 1
        if seen["steps"] % EVERY == 0:
            seen["ema"].step(params)

    handle = register_optimizer_step_post_hook(follow)
    try:
        result = train(_cfg(root, "full"), **QUIET)
    finally:
        handle.remove()
    return result, seen["ema"]


def _state(folder):
    return load_file(next((folder / "state").glob("state-step*.safetensors")))


def test_finetune_lowers_a_fixed_evaluation_loss(root, reference):
    result, _ = reference
    before = _eval_loss(checkpoint.load(root / "tiny_sdxl.safetensors").unet, root)
    after = _eval_loss(result.components.unet, root)
    print(f"eval loss before {before:.4f}, after {after:.4f}, ratio {after / before:.3f}")
    assert after < 0.8 * before
    assert len(result.losses) == STEPS and result.networks == {}


def test_every_unet_weight_trains_and_the_rest_stays(root, reference):
    """Gradients reach every UNet weight, fused self-attention q/k/v included (ops.project
    falls back to one GEMM per layer for trainable weights); the VAE and text encoders are
    the original file's tensors."""
    result, _ = reference
    fresh = checkpoint.load(root / "tiny_sdxl.safetensors")
    trained = result.components.unet.state_dict()
    same = [k for k, v in fresh.unet.state_dict().items() if torch.equal(trained[k], v)]
    assert same == []
    with safe_open(str(result.lora_path), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    original = load_file(root / "tiny_sdxl.safetensors")
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], v) for k, v in original.items() if not k.startswith("model.diffusion_model."))
    assert meta["eridiffusion.weights"] == "raw" and meta["eridiffusion.steps"] == str(STEPS)


def test_ema_equals_diffusers_ema_model(root, reference):
    result, ref = reference
    state = _state(result.output_dir)
    names = [f"trained.ema.unet.{k}" for k, _ in result.components.unet.named_parameters()]  # the optimizer's order
    assert len(names) == len(ref.shadow_params) == sum(k.startswith("trained.ema.") for k in state) - 1
    for name, expected in zip(names, ref.shadow_params):
        assert torch.equal(state[name], expected), name
    assert state["trained.ema.counts"].tolist() == [STEPS, STEPS // EVERY]


def test_checkpoint_loads_strictly_and_reproduces_the_trained_unet(root, reference):
    result, _ = reference
    loaded = checkpoint.load(result.lora_path)  # strict: every key of every part
    unet = result.components.unet.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    ctx, y = torch.randn(2, 77, 96, generator=g), torch.randn(2, 256, generator=g)
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t, ctx, y), unet(x, t, ctx, y))


def test_resume_is_bit_exact_and_saves_the_ema(root, reference):
    result, ref = reference
    cfg = _cfg(root, "resumed", save={"finetune_weights": "ema"})
    first = train(cfg, stop_after=STEPS // 2 + 1, **QUIET)  # odd: between two EMA updates
    assert first.interrupted and first.losses == result.losses[: STEPS // 2 + 1]
    second = train(cfg.replace(train={"resume": True}), **QUIET)
    assert second.step == STEPS and second.losses == result.losses
    a, b = _state(result.output_dir), _state(second.output_dir)
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
    ema = checkpoint.load(second.lora_path).unet.state_dict()  # save.finetune_weights = "ema"
    for (name, w), expected in zip(ema.items(), ref.shadow_params):
        assert torch.equal(w, expected), name


def test_bf16_weights_train_through_fp32_master_weights(root):
    """bf16 weights: the optimizer's params and state are fp32 copies, the model's weights
    those copies rounded after each step; resume restores the copies, not the rounded weights."""
    cfg = _cfg(root, "bf16", steps=4, model={"dtype": "bf16"})
    seen = {}

    def grab(optimizer, args, kwargs):
        seen["opt"] = optimizer

    handle = register_optimizer_step_post_hook(grab)
    try:
        result = train(cfg, **QUIET)
    finally:
        handle.remove()
    masters = [p for g in seen["opt"].param_groups for p in g["params"]]
    weights = list(result.components.unet.parameters())
    assert all(m.dtype == torch.float32 for m in masters) and all(w.dtype == torch.bfloat16 for w in weights)
    assert all(s.dtype == torch.float32 for st in seen["opt"].state.values() for s in st.values() if s.dim())
    assert all(torch.equal(w, m.to(torch.bfloat16)) for w, m in zip(weights, masters))
    assert all(w.grad is None for w in weights)  # cleared with the masters' after each step
    assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in masters)  # fp32 detail kept
    state = _state(result.output_dir)
    assert state["trained.unet.out.2.weight"].dtype == torch.float32
    cut = _cfg(root, "bf16-resumed", steps=4, model={"dtype": "bf16"})
    train(cut, stop_after=2, **QUIET)
    resumed = train(cut.replace(train={"resume": True}), **QUIET)
    assert resumed.losses == result.losses
    b = _state(resumed.output_dir)
    assert all(torch.equal(state[k], b[k]) for k in state if not k.startswith("rng."))


def test_ema_warmup_and_interval():
    """diffusers' decay schedule, k-th update: 0, then min(decay, (1 + (k−1)) / (10 + (k−1)))."""
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5, device=torch.device("cpu"), every=2)
    assert [ema.decay_at(k) for k in (1, 2, 3)] == [0.0, 2 / 11, 0.25]
    assert ema.decay_at(100) == 0.5
    values = []
    for step in range(1, 7):
        p.data.fill_(float(step))
        ema.step()
        values.append(ema.shadow[0][0].item())
    # updates at steps 2, 4, 6 with decays 0, 2/11, 0.25
    e2 = 2.0
    e4 = e2 - (1 - 2 / 11) * (e2 - 4.0)
    e6 = e4 - 0.75 * (e4 - 6.0)
    assert values == pytest.approx([0.0, e2, e2, e4, e4, e6], abs=1e-6)


def test_config_fields_and_one_line_refusals(root):
    cfg = _cfg(root, "x")
    assert cfg.train.mode == "finetune" and not cfg.trains_text_encoders
    assert cfg.replace(train={"finetune_text_encoders": True}).trains_text_encoders
    with pytest.raises(ConfigError, match=r"train\.fsdp = true is invalid.*FSDP2.*train\.fsdp=false") as e:
        cfg.replace(train={"fsdp": True})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"train\.ema_decay"):
        cfg.replace(train={"ema_decay": 1.0})
    with pytest.raises(ConfigError, match=r"train\.finetune_text_encoders=false"):
        check_cuda_graph(cfg.replace(train={"finetune_text_encoders": True}), torch.device("cuda"), 1)
    assert TrainConfig.from_dict({"train": {"mode": "finetune"}}).save.finetune_weights == "ema"


def test_resume_refuses_another_mode(root, reference):
    result, _ = reference
    lora = demo_config(root, STEPS + 2).replace(save={"output_dir": str(result.output_dir)}, train={"resume": True},
                                                cache={"dir": str(root / "cache")}, sample={"every_n_steps": 0})  # fmt: skip
    with pytest.raises(ConfigError, match=r'train\.mode = "lora" but the saved run used "finetune"'):
        train(lora, **QUIET)


def _ddp_worker(rank: int, world: int, port: int, cfgs: list) -> None:
    """One torchrun-like rank (as tests/test_distributed.py's)."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    train(cfgs[rank], **QUIET)


@pytest.mark.slow
def test_ddp_two_processes_match_one(root):
    """DDP over the whole UNet (gloo): 2 processes × batch 1 = 1 process × batch 2, within float
    noise (SGD: Adam's first steps would turn that noise in near-zero gradients into ±lr)."""
    import socket

    import torch.multiprocessing as mp

    def cfg(out, batch):
        return _cfg(root, out, steps=3, optim={"optimizer": "sgd", "unet_lr": 0.05}, train={"batch_size": batch})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = cfg("ddp", 1)
    mp.start_processes(_ddp_worker, args=(2, port, [two, two.replace(save={"output_dir": str(root / "ddp-rank1")})]),
                       nprocs=2, join=True, start_method="spawn")  # fmt: skip
    one = train(cfg("ddp-one", 2), **QUIET)
    a, b = load_file(root / "ddp" / "lora.safetensors"), load_file(one.lora_path)
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    diff = max(float((a[k] - b[k]).abs().max()) for k in unet)
    moved = max(float((a[k] - load_file(root / "tiny_sdxl.safetensors")[k]).abs().max()) for k in unet[:4])
    print(f"max |UNet(2 procs × 1) - UNet(1 proc × 2)| after 3 steps = {diff:.3g}, moved {moved:.3g}")
    assert diff < 1e-6 and moved > 1e-4
    assert not (root / "ddp-rank1").exists()
