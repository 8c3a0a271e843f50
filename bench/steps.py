"""Benchmark-only step variants (not used by `eri train`).

- `GraphedStep`: the whole step (forward, backward and a capturable optimizer) in one CUDA
  graph; `eri train` keeps the optimizer, clipping and the NaN guard eager (speed.GraphedBackward).
- `training_step(body, ...)`: a body run eagerly or as a GraphedStep.
- `attention_priority(backend)`: SDPA kernel priority for a case.
- `training_batch(cfg, batch, size, g)`: a random SDXL micro-batch, as the GPU tests and benchmarks draw it.
- `compile_stages(unet)`: the "stages" compile scope, every `input_blocks.i` / `middle_block` /
  `output_blocks.i` whole, so the GroupNorm / proj_in / reshapes around the blocks fuse too.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from eridiffusion.models.unet import sdxl_vector  # noqa: E402
from eridiffusion.speed import _capture, _Replayed  # noqa: E402


def training_batch(cfg, batch: int, size: int, g: torch.Generator, dtype=torch.bfloat16) -> tuple:
    """(x, t, ctx, y, target) for `cfg` (a UNetConfig) at size × size latents, all drawn from the
    CUDA generator `g` in this order; y from random pooled text and square-image time ids."""
    x = torch.randn(batch, 4, size, size, device="cuda", generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device="cuda", generator=g)
    ctx = torch.randn(batch, 77, cfg.context_dim, device="cuda", generator=g, dtype=dtype)
    pooled = torch.randn(batch, cfg.adm_in_channels - 6 * cfg.addition_time_embed_dim, device="cuda", generator=g)
    time_ids = torch.tensor([[size * 8.0, size * 8, 0, 0, size * 8, size * 8]], device="cuda").repeat(batch, 1)
    y = sdxl_vector(pooled, time_ids, cfg.addition_time_embed_dim).to(dtype)
    target = torch.randn(batch, 4, size, size, device="cuda", generator=g, dtype=dtype)
    return x, t, ctx, y, target


def compile_stages(unet, mode: str | None = None, backend: str = "inductor", dynamic: bool | None = False) -> int:
    regions = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(regions))
    for m in regions:
        m.compile(backend=backend, mode=mode, dynamic=dynamic)
    return len(regions)


def attention_priority(backend: str = "auto"):
    """Context manager choosing the SDPA kernel ("auto", "cudnn", "flash", "efficient")."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    }[backend]
    return sdpa_kernel(order, set_priority=True)



class GraphedStep(_Replayed):
    """A whole training step (forward, backward, optimizer) captured in a CUDA graph.

    Host overhead (Python, kernel launches, LoRA wrappers, compiled-region guards) is paid
    once at capture; each later step copies its inputs into static buffers and replays the
    graph. One graph per input signature (bucket shape). `fn(*tensors) -> loss` must run
    forward + backward + `optimizer.step()` and must not zero the gradients (they are
    written, not accumulated, by the captured backward). The optimizer must be
    capturable (`fused=True, capturable=True`; a changing LR as a CUDA tensor).

    Warm-up steps before capture would change the weights; the parameters and optimizer
    state are snapshotted before and restored after, so step N of a graphed run is step N
    of an eager one.
    """

    def __init__(self, fn, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, warmup: int = 2):
        self.fn, self.params, self.optimizer, self.warmup = fn, params, optimizer, warmup
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.Tensor, torch.cuda.CUDAGraph]] = {}
        # peak GiB allocated while warming up (compilation, autotuning) and while capturing, over all captures
        self.phase_peaks = {"warmup_gib": 0.0, "capture_gib": 0.0}

    def _state_tensors(self) -> list[torch.Tensor]:
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return list(self.params) + state

    def _body(self, *tensors: torch.Tensor) -> torch.Tensor:
        loss = self.fn(*tensors)
        for p in self.params:  # the next warm-up / the capture starts from no gradient
            p.grad = None
        return loss

    def _capture(self, tensors: tuple[torch.Tensor, ...]):
        static_in = [t.clone() for t in tensors]
        for p in self.params:
            p.grad = None
        if not self.optimizer.state:  # materialise the optimizer state outside the graph
            for p in self.params:
                p.grad = torch.zeros_like(p)
            saved = [t.detach().clone() for t in self.params]
            self.optimizer.step()
            with torch.no_grad():
                for t, s in zip(self.params, saved):
                    t.copy_(s)
                for st in self.optimizer.state.values():
                    for v in st.values():
                        if torch.is_tensor(v):
                            v.zero_()
            for p in self.params:
                p.grad = None
        snapshot = [t.detach().clone() for t in self._state_tensors()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._body(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t, s in zip(self._state_tensors(), snapshot):
                t.copy_(s)
        torch.cuda.synchronize()
        self._note_peak("warmup_gib")
        graph, loss = _capture(self.fn, static_in, {}, warmup=0)
        torch.cuda.synchronize()
        self._note_peak("capture_gib")
        return static_in, loss, graph

    def _note_peak(self, phase: str) -> None:
        """Keep the peak since the last reset as `phase`'s, then reset it (callers timing a first
        step take the max of their own peak and these)."""
        self.phase_peaks[phase] = max(self.phase_peaks[phase], torch.cuda.max_memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()


def training_step(body, params: list[torch.Tensor], optimizer: torch.optim.Optimizer, graph: bool = False):
    """`body(*tensors) -> loss` runs forward, backward and `optimizer.step()`; the returned
    callable runs it eagerly and zeroes the gradients, or replays it from a CUDA graph."""
    if graph:
        return GraphedStep(body, params, optimizer)

    def step(*tensors: torch.Tensor) -> torch.Tensor:
        loss = body(*tensors)
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step
