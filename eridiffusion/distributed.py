"""Multi-process training under torchrun: process group, DDP / FSDP2 wrapping, batch slicing.

    torchrun --nproc-per-node N -m eridiffusion.cli train CONFIG

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init` reads them
and joins the group (NCCL on CUDA with device cuda:LOCAL_RANK, gloo on the CPU). Without
them everything here is a no-op for one process, so the trainer has a single code path.

Data parallelism (PyTorch DDP, Li et al. 2020, "PyTorch Distributed: Experiences on
Accelerating Data Parallel Training"): every rank holds the whole frozen model and the LoRA,
runs its slice of the global batch, and the LoRA gradients are averaged by bucketed
all-reduces that overlap the backward pass. Only the LoRA parameters require grad, so only
they are reduced; the frozen weights are never communicated.

Global batch: the sampler hands every rank the same global batch (one bucket, batch_size ×
world samples) and each rank takes its contiguous slice (`batch_slice`). Random draws for
the global batch (timesteps, noise, latent samples) come from one generator seeded alike on
every rank and are sliced too, so N processes compute the same update as one process with
the N-times-larger batch, and a resumed run may use another number of processes.

FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023): when the frozen model does
not fit one device, its weights are sharded per UNet block and all-gathered block by block
in forward and backward; the LoRA parameters stay replicated (`ignored_params`) and their
gradients are all-reduced once per optimizer step (`all_reduce_grads`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from eridiffusion.config import ConfigError
from eridiffusion.errors import FaultError, UserError

# Rank 0 may spend long stretches alone (validation images, saving): wait this long at a
# collective before calling the run hung. ERI_DIST_TIMEOUT_MIN overrides it.
DEFAULT_TIMEOUT_MIN = 60


@dataclass(frozen=True)
class World:
    """This process's place in the run; `owned` is True when `init` created the group."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    owned: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def launched() -> bool:
    """True under torchrun (any launcher that sets WORLD_SIZE and MASTER_ADDR), even for one process."""
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init(device: torch.device) -> World:
    """Join the torchrun process group (idempotent) and return this process's `World`.

    `device` is the one the config asked for; on CUDA it becomes cuda:LOCAL_RANK. Outside
    torchrun (and with an already initialised group) nothing is created.
    """
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        return World(rank, local, size, _local_device(device, local, size), owned=False)
    if not launched():
        return World(device=device)
    rank, size, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    device = _local_device(device, local, size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=_env_int("ERI_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    if device.type == "cuda":
        if device.index is None:  # one process under torchrun: "cuda" is the current device
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout, device_id=device)
    else:
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout)
    w = World(rank, local, size, device, owned=True)
    FaultWatch.start(w)
    return w


def local_device(device: torch.device) -> torch.device:
    """cuda → cuda:LOCAL_RANK under torchrun with several processes; anything else unchanged."""
    return _local_device(device, _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1))


def _local_device(device: torch.device, local_rank: int, size: int) -> torch.device:
    if device.type != "cuda" or size == 1:
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this host has {count} CUDA devices; use --nproc-per-node {count} or fewer"
        )
    return torch.device("cuda", local_rank)


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def cleanup(w: World | None = None) -> None:
    """Leave the process group if `init` made it (or unconditionally when `w` is None)."""
    if dist.is_available() and dist.is_initialized() and (w is None or w.owned):
        FaultWatch.stop()
        dist.destroy_process_group()


# ---------------------------------------------------------------- a fault on one rank


class RankFailed(FaultError):
    """Another rank failed first; `str()` is its one-line reason, `exit_code` its exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class FaultWatch:
    """An exception on one rank stops every rank within seconds, with that rank's reason.

    Without it the other ranks would wait in their next collective for ERI_DIST_TIMEOUT_MIN.
    A failing rank reports `code|rank|message` under `KEY` in the process group's store
    (`error_for`; the first report wins). A daemon thread on every rank polls the key once a
    second (one ~60 µs TCP request, off the training thread: no per-step cost). A rank blocked
    in a collective with the failed one gets out so: under gloo the collective raises as soon as
    the failed process's sockets close; NCCL does not notice, so the watcher aborts the process
    group, which makes the blocked collective raise. The training thread then takes its fault
    path (rank 0 saves the last good state) and exits with `RankFailed`. Should it still be
    stuck `GRACE_S` after the report, the watcher prints the reason and ends the process.
    """

    KEY = "eri/fault"
    POLL_S = 1.0
    GRACE_S = 30.0
    current: FaultWatch | None = None

    def __init__(self, w: World, store):
        self.w, self.store = w, store
        self.seen: tuple[int, int, str] | None = None  # (exit code, rank, message) of another rank
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="eri-fault-watch", daemon=True)

    @classmethod
    def start(cls, w: World) -> None:
        if w.size > 1 and cls.current is None:
            cls.current = cls(w, dist.distributed_c10d._get_default_store())
            cls.current._thread.start()

    @classmethod
    def stop(cls) -> None:
        """End the watcher and wait for it: a poll still running when the process group (and
        its store) is destroyed can end the process in C++ ("terminate called without an
        active exception", seen once at exit on a loaded 2-core machine)."""
        watch, cls.current = cls.current, None
        if watch is not None:
            watch._done.set()
            if watch._thread.is_alive() and watch._thread is not threading.current_thread():
                watch._thread.join(timeout=cls.POLL_S + 5.0)

    def _read(self) -> tuple[int, int, str] | None:
        if not self.store.check([self.KEY]):
            return None
        code, rank, message = self.store.get(self.KEY).decode().split("|", 2)
        return int(code), int(rank), message

    def _watch(self) -> None:
        while not self._done.wait(self.POLL_S):
            try:
                report = self._read()
            except Exception:  # the store went away: the run is ending
                return
            if report is None or report[1] == self.w.rank:
                continue
            self.seen = report
            if dist.is_initialized() and dist.get_backend() == "nccl":
                with contextlib.suppress(Exception):
                    dist.distributed_c10d._abort_process_group()  # the blocked collective raises
            if not self._done.wait(self.GRACE_S):  # still stuck: end it here, with the reason
                print(f"eri train: {report[2]}", file=sys.stderr, flush=True)
                os._exit(report[0])
            return

    def error_for(self, e: BaseException) -> BaseException:
        """The error this rank ends with after `e`: another rank's earlier report as
        `RankFailed`, else `e` itself, reported to the other ranks."""
        try:
            report = self.seen or self._read()
            if report is None or report[1] == self.w.rank:
                text = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                mine = f"{getattr(e, 'exit_code', 1)}|{self.w.rank}|rank {self.w.rank}: {text.splitlines()[0] if text else ''}"
                code, rank, message = self.store.compare_set(self.KEY, "", mine).decode().split("|", 2)
                report = int(code), int(rank), message
        except Exception:  # no store to tell: this rank's own error
            return e
        return e if report[1] == self.w.rank else RankFailed(report[2], report[0])


def error_for(e: BaseException) -> BaseException:
    """Under torchrun: the error to end this rank with after `e` (see `FaultWatch`); else `e`."""
    watch = FaultWatch.current
    if watch is None or not isinstance(e, Exception):
        return e
    return watch.error_for(e)


# ---------------------------------------------------------------- batches


def batch_slice(n: int, rank: int, size: int) -> slice:
    """This rank's contiguous part of a global batch of `n`: sizes differ by at most one,
    the first `n % size` ranks take one more. Empty when n < size (see `slice_weights`)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def slice_weights(n: int, rank: int, size: int) -> tuple[slice, float]:
    """(rows this rank runs, loss scale) so that DDP's average over ranks of
    scale · mean(local losses) equals the mean over the whole global batch of `n`.

    Even split: scale 1. Uneven split (the last, short batch of a bucket): scale = size·n_r/n.
    A rank left without rows (n < size) runs row 0 again with scale 0, so that every rank
    still takes part in the gradient all-reduce.
    """
    s = batch_slice(n, rank, size)
    count = s.stop - s.start
    if count == 0:
        return slice(0, 1), 0.0
    return s, size * count / n


# ---------------------------------------------------------------- wrapping


class DDP(DistributedDataParallel):
    """DistributedDataParallel that still answers `.cfg` (the UNet's config) like the model."""

    @property
    def cfg(self):
        return self.module.cfg


def broadcast_params(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy `params` from rank `src` to all ranks (the LoRA init; the frozen weights come
    from the same file on every rank and are not sent)."""
    if world() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src)


def wrap_ddp(module: nn.Module, w: World, find_unused: bool = False) -> nn.Module:
    """`module` (frozen weights + trainable LoRA) in DDP; the module itself when one process.

    - `init_sync=False` + `broadcast_params`: DDP would otherwise broadcast the whole state
      dict (5 GB of frozen SDXL weights) at construction; only the LoRA needs it.
    - `broadcast_buffers=False`: the UNet has no buffers that training changes.
    - `gradient_as_bucket_view=True`: grads live in the all-reduce buckets, no copy.
    - `find_unused`: text encoders, whose last layer's LoRA gets no gradient when the
      penultimate layer is the context (SDXL TE1).
    """
    if not w.distributed:
        return module
    trainable = [p for p in module.parameters() if p.requires_grad]
    broadcast_params(trainable)
    device_ids = [w.device.index] if w.device.type == "cuda" else None
    return DDP(module, device_ids=device_ids, broadcast_buffers=False, init_sync=False,
               gradient_as_bucket_view=True, find_unused_parameters=find_unused)  # fmt: skip


def no_sync(modules: Iterable[nn.Module], skip: bool):
    """Context: while `skip`, DDP modules accumulate gradients locally (grad accumulation
    micro-steps before the last). Forwards must run inside it too: DDP decides at forward
    time whether the backward all-reduces. Not needed under FSDP2, whose sharded weights
    are frozen (nothing to reduce-scatter) and whose LoRA grads go through `all_reduce_grads`."""
    stack = contextlib.ExitStack()
    if skip:
        for m in modules:
            if isinstance(m, DistributedDataParallel):
                stack.enter_context(m.no_sync())
    return stack


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Average the gradients of `params` over ranks with one flat all-reduce (FSDP2 path,
    where the LoRA parameters are not managed by DDP). Missing grads count as zeros."""
    if world() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numel,)
    dist.all_reduce(flat, op=dist.ReduceOp.AVG if flat.is_cuda else dist.ReduceOp.SUM)
    if not flat.is_cuda:  # gloo has no AVG
        flat /= world()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g)
        offset += n


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (asynchronous on the GPU stream with NCCL)."""
    if world() > 1:
        dist.all_reduce(t)
    return t


def agree_max(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks (every rank must call it): a stop signal seen by one
    rank stops all of them at the same step, instead of leaving the others in an all-reduce."""
    if world() == 1:
        return value
    t = torch.tensor(value, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def shard_unet(unet: nn.Module, trainable: list[nn.Parameter]) -> nn.Module:
    """FSDP2: shard the frozen weights of every `input_blocks.i`, `middle_block`,
    `output_blocks.i` (one all-gather per block), then the rest at the root. The LoRA
    parameters in `trainable` stay whole on every rank (`ignored_params`)."""
    from torch.distributed.fsdp import fully_shard

    ignored = set(trainable)
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        fully_shard(block, ignored_params=ignored)
    fully_shard(unet, ignored_params=ignored)
    return unet


# ---------------------------------------------------------------- sampler position


def sampler_state(sampler) -> dict:
    """The bucket sampler's state in global terms: epoch, global batches consumed, the global
    batch size and the samples consumed in this epoch (what resuming with another size needs)."""
    done = sum(len(b) for b in sampler._epoch_batches(sampler.epoch)[: sampler.position])
    return {**sampler.state_dict(), "global_batch": sampler.batch_size, "samples": done}


def restore_sampler(sampler, state: dict) -> bool:
    """Load `state` into `sampler`; True when exact. With the same global batch (batch_size ×
    processes) the position is the same list of batches; with another one the epoch is kept
    and the position becomes the first batch boundary at or after the samples already
    consumed this epoch (the epoch is cut into other batches, so a few samples of the
    current epoch may be seen twice or skipped once)."""
    old_batch = int(state.get("global_batch", sampler.batch_size))
    if old_batch == sampler.batch_size:
        sampler.load_state_dict(state)
        return True
    sampler.load_state_dict({**state, "position": 0})
    done, position = int(state.get("samples", 0)), 0
    batches = sampler._epoch_batches(sampler.epoch)
    seen = 0
    while position < len(batches) and seen < done:
        seen += len(batches[position])
        position += 1
    sampler.position = position
    return False
