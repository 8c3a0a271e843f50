import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to other jobs on the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory, request):
    """The tiny demo model and `DEMO_IMAGES` (module constant, default 8) captioned images, once per module."""
    from eridiffusion.tiny import prepare

    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    prepare(root, n_images=getattr(request.module, "DEMO_IMAGES", 8), log=lambda s: None)
    return root


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def _tiny_vae(seed: int = 0):
    """Tiny VAE with default conv init and randomised GroupNorm affines (so a skipped or swapped
    norm shows)."""
    from eridiffusion.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    return vae


@pytest.fixture
def tiny_vae():
    """The factory `tiny_vae(seed=0) -> AutoencoderKL` (tests/models/test_vae.py, tests/test_speed.py)."""
    return _tiny_vae


def kept_tensors(fn, *args, exclude=()) -> tuple:
    """Run fn(*args); return its output and, per storage autograd keeps for backward, (the shapes
    kept of it, its bytes), leaving out the storages of the tensors in `exclude` (weights)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            kept.setdefault(ptr, (set(), t.untyped_storage().nbytes()))[0].add(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, list(kept.values())


def _kept_bytes(fn, *args, exclude=()) -> tuple:
    """Run fn(*args); return its output and the bytes autograd keeps for backward, counted once
    per storage, leaving out the storages of the tensors in `exclude` (weights)."""
    out, kept = kept_tensors(fn, *args, exclude=exclude)
    return out, sum(n for _, n in kept)


@pytest.fixture
def kept_bytes():
    """`kept_bytes(fn, *args, exclude=()) -> (output, bytes kept for backward)` (tests/test_ops.py,
    tests/test_speed_gpu.py)."""
    return _kept_bytes


def _eval_loss(result, root, multiplier: float, resolution: int = 128) -> float:
    """Plain MSE of a training result's UNet (its adapters at `multiplier`; 0 = the base model) on
    a fixed batch: every square latent of `resolution`² in `root/cache`, fixed noise and timesteps."""
    from safetensors.torch import load_file

    from eridiffusion import diffusion
    from eridiffusion.families import FAMILIES
    from eridiffusion.train import diffusion_loss

    unet, networks = result.components.unet, result.networks
    entries = [load_file(p) for p in sorted((root / "cache" / "latent").rglob("*.safetensors"))]
    entries = [e for e in entries if e["mean"].shape[-2:] == (resolution // 8, resolution // 8)]
    texts = [load_file(p) for p in sorted((root / "cache" / "text").rglob("*.safetensors"))]
    dev = next(unet.parameters()).device
    x0 = torch.stack([e["mean"] for e in entries]).to(dev)
    time_ids = torch.stack([e["time_ids"] for e in entries]).to(dev)
    cond = {k: torch.stack([texts[i % len(texts)][k] for i in range(len(entries))]).to(dev) for k in texts[0]}
    g = torch.Generator().manual_seed(1234)
    t = torch.linspace(20, 980, len(entries)).long().to(dev)
    noise = torch.randn(x0.shape, generator=g).to(dev)
    ac = diffusion.alphas_cumprod(diffusion.scaled_linear_betas()).to(dev)
    for net in networks.values():
        net.set_multiplier(multiplier)
    unet.eval()
    with torch.no_grad():
        loss = diffusion_loss(FAMILIES["sdxl-tiny"], unet, x0, cond, time_ids, t, noise, ac, "epsilon").item()
    for net in networks.values():
        net.set_multiplier(1.0)
    return loss


@pytest.fixture
def eval_loss():
    """`eval_loss(result, root, multiplier, resolution=128) -> float`: a `train()` result's loss on
    the fixed batch of its cache (tests/test_train.py, tests/test_optim_training.py,
    tests/train/test_adapters.py)."""
    return _eval_loss
