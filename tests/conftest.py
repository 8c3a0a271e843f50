import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to other jobs on the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def _kept_bytes(fn, *args, exclude=()) -> tuple:
    """Run fn(*args); return its output and the bytes autograd keeps for backward, counted once
    per storage, leaving out the storages of the tensors in `exclude` (weights)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(kept.values())


@pytest.fixture
def kept_bytes():
    """`kept_bytes(fn, *args, exclude=()) -> (output, bytes kept for backward)` (tests/test_ops.py,
    tests/test_speed_gpu.py)."""
    return _kept_bytes
