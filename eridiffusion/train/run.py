"""`train(cfg)`: the LoRA training run, top to bottom.

    setup:  checkpoint ─► frozen UNet / VAE / text encoders; dataset ─► cache (latents, text)
    adapters on the family's parts (fp32 trainable), speed options, DDP / FSDP under torchrun
    optimizer (optim.py), sampler, resume
    loop:   lr schedule ─► TrainStep (micro-steps, clip, NaN guard, optimizer) ─► log, save,
            previews; SIGINT / SIGTERM / OOM / NaN stop it with a saved state
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eridiffusion import distributed, faults, fp8_matmul, optim, runs, speed
from eridiffusion.checkpoint import Components
from eridiffusion.compile_cache import CompileCache
from eridiffusion.config import TrainConfig
from eridiffusion.data.buckets import BucketBatchSampler
from eridiffusion.devices import resolve_device
from eridiffusion.errors import ConfigError
from eridiffusion.io import remove_temp_files, write_text
from eridiffusion.train.batches import Batches
from eridiffusion.train.finetune import FullModel
from eridiffusion.train.metadata import training_metadata
from eridiffusion.train.outputs import Log, RunLog, plot_loss
from eridiffusion.train.periodic import Periodic, build_evaluators
from eridiffusion.train.setup import Setup, fill_cache, load_setup
from eridiffusion.train.state import check_resumable, load_state, restore, save_state
from eridiffusion.train.step import TrainStep
from eridiffusion.train.trackers import Trackers, require_wandb
from eridiffusion.train.trainable import Adapters
from eridiffusion.train.validation import validation_dataset

TRAINABLES = {"lora": Adapters, "finetune": FullModel}  # train.mode → what the run trains (trainable.py)


@dataclass
class TrainResult:
    """What a run produced; `losses` has one value per optimizer step since step 1."""

    output_dir: Path
    lora_path: Path | None  # the saved weights: the LoRA, or the checkpoint in train.mode = "finetune"
    step: int
    losses: list[float]
    components: Components
    networks: dict = field(default_factory=dict)
    interrupted: bool = False
    stop_signal: int = 0  # SIGINT / SIGTERM that stopped the run (eri train exits 128 + it)
    nonfinite_skipped: int = 0  # steps skipped for a NaN/inf loss or gradient


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def data_parallel(s: Setup, trainable, text_encoder, w, fsdp: bool, log: Log) -> tuple[torch.nn.Module, list]:
    """The module forward runs and the DDP modules: FSDP2 shards the frozen UNet; DDP wraps
    the UNet (and the trained text encoders); one process runs the UNet itself."""
    c = s.components
    if fsdp:
        distributed.broadcast_params(trainable.parameters())
        distributed.shard_unet(c.unet, trainable.parameters())
        log(f"fsdp: frozen UNet sharded per block over {w.size} processes")
        return c.unet, []
    if not w.distributed:
        return c.unet, []
    model = distributed.wrap_ddp(c.unet, w)
    synced = [model]
    if text_encoder is not None and s.cfg.trains_text_encoders:
        for part in c.family.text_parts:
            wrapped = distributed.wrap_ddp(getattr(c, part), w, find_unused=True)
            setattr(text_encoder, part, wrapped)
            synced.append(wrapped)
    return model, synced


def step_budget(cfg: TrainConfig, s: Setup, world_size: int) -> tuple[BucketBatchSampler, int, int]:
    """The sampler of global batches (batch_size × processes, one bucket), the total steps and
    the steps per epoch."""
    t = cfg.train
    repeats = s.dataset.repeats
    sampler = BucketBatchSampler(s.dataset.buckets, t.batch_size * world_size, t.seed, repeats=repeats)
    if t.batch_size * world_size > sum(repeats):
        procs = f" × {world_size} processes" if world_size > 1 else ""
        raise ConfigError(f"train.batch_size = {t.batch_size}{procs} is larger than the {sum(repeats)} samples "
                          f"per epoch in {cfg.data.dir}: lower train.batch_size or add images")  # fmt: skip
    per_epoch = max(1, len(sampler) // t.grad_accum)
    total = t.max_steps or t.epochs * per_epoch
    if t.max_steps and t.epochs:
        total = min(total, t.epochs * per_epoch)
    return sampler, total, per_epoch


def check_cuda_graph(cfg: TrainConfig, device: torch.device, processes: int) -> None:
    why = None
    if device.type != "cuda":
        why = f"needs a CUDA device, and this run is on {device}"
    elif processes > 1:
        why = f"runs in one process, and this run has {processes} under torchrun"
    elif cfg.trains_text_encoders:
        why = f"does not capture the text encoders: set {cfg.text_encoder_key}=false"
    if why:
        raise ConfigError(f"train.cuda_graph = true {why}; or set train.cuda_graph=false")


class Saver:
    """Rank 0's trained weights (final name or -step{N}), state and loss.png."""

    def __init__(self, cfg: TrainConfig, s: Setup, trainable, opt: optim.Optim, sampler, generators, runlog: RunLog,
                 prediction: str, t_start: float, main: bool, run_id: str = ""):  # fmt: skip
        self.__dict__.update(cfg=cfg, s=s, trainable=trainable, opt=opt, sampler=sampler, generators=generators,
                             runlog=runlog, prediction=prediction, t_start=t_start, main=main, run_id=run_id)  # fmt: skip
        self.out = Path(cfg.save.output_dir)

    def __call__(self, step: int, final: bool) -> Path | None:
        if not self.main:
            return None
        self.runlog.flush()
        t = self.trainable
        path = self.out / (t.final_name if final else t.step_name(step))
        with self.opt.eval_mode():  # schedule-free optimizers save their evaluation weights
            t.save(path, step, self.sampler.epoch, len(self.s.dataset), self.prediction)
        save_state(self.out / "state", step, t, self.opt.optimizer, distributed.sampler_state(self.sampler),
                   self.generators, self.runlog.history, time.perf_counter() - self.t_start, self.cfg,
                   run_id=self.run_id)  # fmt: skip
        plot_loss(self.out / "loss.png", self.runlog.history, title=f"{self.cfg.save.name}: loss per step")
        return path


def preflight(cfg: TrainConfig, out: Path, kind: str, resume_dir: Path | None):
    """What can be checked before anything loads: the folders, the folder's run, the state to
    continue (returned as `load_state`'s (meta, tensors), or None) and optional libraries."""
    runs.check_layout(cfg)
    runs.check(out, kind, overwrite=cfg.save.overwrite, resume=resume_dir, name=cfg.save.name)
    resumed = None if resume_dir is None else load_state(resume_dir)
    if resumed is not None:
        check_resumable(resume_dir, resumed[0]["config"], cfg)
        at, max_steps = resumed[0]["step"], cfg.train.max_steps
        if max_steps and at >= max_steps:
            raise ConfigError(f"--resume {resume_dir}: the state is at step {at} and train.max_steps = {max_steps}: "
                              f"nothing to train; pass train.max_steps=N with N > {at}")  # fmt: skip
    if cfg.log.wandb:
        require_wandb()
    return resumed


def prediction_of(cfg: TrainConfig, fam) -> str:
    """The training target: train.prediction, or the family's (v-prediction with zero-terminal SNR;
    config.validate refuses epsilon with it)."""
    auto = "v_prediction" if cfg.train.zero_terminal_snr else fam.prediction
    return auto if cfg.train.prediction == "auto" else cfg.train.prediction


def make_fast(cfg: TrainConfig, c: Components, buckets, precompiled=None) -> None:
    """Gradient checkpointing, train mode, TF32 (and cuDNN autotuning with train.cudnn_benchmark) on
    CUDA, self-attention q/k/v (and LoRA) as one GEMM; with train.compile the family's regions: with
    several `buckets` (the dataset's sizes) shape-generic in H and W from the first compile, else
    for the one shape; `precompiled` (the compile cache's `precompile.Regions`): run those."""
    c.unet.gradient_checkpointing = cfg.train.gradient_checkpointing
    speed.optimize_for_training(c.unet, compile=False, fused_qkv=True, cudnn_benchmark=cfg.train.cudnn_benchmark,
                                recompute=recomputes(cfg.train))  # fmt: skip
    if cfg.train.fp8_matmul:  # after injection: LoRA-wrapped base layers swap too; before compile
        fp8_matmul.enable_fp8_matmul(c.unet)
    if cfg.train.compile:
        c.family.compile_regions(c.unet, dynamic=None, spatial_dynamic=speed.several_shapes(buckets),
                                 precompiled=precompiled)  # fmt: skip


def recomputes(t) -> bool:
    """Whether compiled regions recompute cheap activations in backward (`speed.partitioner`'s
    remat, `speed.recompute_in_backward`): unless train.keep_activations, or gradient checkpointing
    (which recomputes whole blocks)."""
    return not (t.gradient_checkpointing or t.keep_activations)


def resume(resumed, resume_dir: Path, total: int, trainable, opt: optim.Optim, sampler, generators,
           log: Log) -> tuple[int, list, float]:  # fmt: skip
    """Put a saved state back; returns (step, loss history, elapsed seconds)."""
    meta, tensors = resumed
    if meta["step"] >= total:  # a budget from train.epochs
        raise ConfigError(f"--resume {resume_dir}: the state is at step {meta['step']} and this run stops at step "
                          f"{total}: nothing to train; raise train.max_steps or train.epochs")  # fmt: skip
    restore(resume_dir, meta, tensors, trainable, opt, generators)
    if not distributed.restore_sampler(sampler, meta["sampler"]):
        log(f"resume: global batch {meta['sampler']['global_batch']} → {sampler.batch_size}, "
            "continuing at the same epoch and sample count (not the same batches)")  # fmt: skip
    log(f"resumed from {resume_dir} at step {meta['step']}")
    return meta["step"], meta["history"], meta["elapsed"]


def claim_folder(cfg: TrainConfig, s: Setup, kind: str, resume_dir: Path | None, log: Log) -> str:
    """Rank 0: the output folder becomes this run's (a replaced run's files move to
    .replaced/<run id>/); its config (without overwrite / resume) and dataset report. Returns the run id."""
    out = Path(cfg.save.output_dir)
    run_id = runs.claim(out, kind, runs.config_hash(cfg), overwrite=cfg.save.overwrite, resume=resume_dir,
                        name=cfg.save.name).run_id  # fmt: skip
    for stale in remove_temp_files(out) + remove_temp_files(out / "state"):
        log(f"removed {stale}, a partial write of a killed run")
    write_text(out / "config.toml", runs.saved_config(cfg).to_toml())
    s.dataset.report.write(out / "dataset_report.txt")  # every skipped / ignored file and why
    return run_id


def train(cfg: TrainConfig, *, resume_dir: str | os.PathLike | None = None, stop_after: int | None = None,
          log: Log = print, progress: bool = True, kind: str = "train") -> TrainResult:  # fmt: skip
    """Train a LoRA as `cfg` says; resume from `resume_dir` (or `save.output_dir/state` when
    `train.resume`). `stop_after=N` stops after step N as an interruption would (state saved).
    `kind` ("train", "demo") is recorded in the folder's run record (runs.py)."""
    from tqdm import tqdm

    out, t_cfg = Path(cfg.save.output_dir), cfg.train
    resume_dir = out / "state" if resume_dir is None and t_cfg.resume else resume_dir
    resume_dir = None if resume_dir is None else Path(resume_dir)
    resumed = preflight(cfg, out, kind, resume_dir)  # before anything loads
    w = distributed.init(resolve_device(t_cfg.device))  # torchrun: join the group; else one process
    if t_cfg.cuda_graph:
        check_cuda_graph(cfg, w.device, w.size)
    if t_cfg.fp8_matmul:
        fp8_matmul.check_device(w.device)
    if not w.main:  # only rank 0 logs and writes files
        log, progress = (lambda msg: None), False

    # -- models, data, cache --------------------------------------------------------------
    s = load_setup(cfg, log, w.device)
    c, device, fam = s.components, s.device, s.family
    prediction = prediction_of(cfg, fam)
    s.dataset, val_data = validation_dataset(cfg, s.dataset, log)  # held out before the cache fills
    fill_cache(s, log, progress, w.rank, w.size)
    distributed.barrier()  # every rank's share of the cache is written
    fsdp = t_cfg.fsdp and w.distributed
    # built before the VAE / text encoders are freed: they keep what they need
    previews, val_loss = build_evaluators(cfg, s, val_data, w.main, fsdp, prediction, log)
    if s.cache_latents:
        c.vae = None  # no longer needed: free its memory
    if s.cache_text:
        c.drop_text_encoders()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # -- what trains: fp32 adapters over frozen weights, or the weights (train.mode) ----------
    seed_everything(t_cfg.seed)  # here, so the adapter init does not depend on what the cache had to do
    trainable = TRAINABLES[t_cfg.mode](cfg, c)
    # train.compile: last run's compiled code for this key, loaded before anything compiles
    compiled = CompileCache.for_run(cfg, fam.name, device, s.dataset.buckets, log, write=w.main)
    make_fast(cfg, c, s.dataset.buckets, compiled and compiled.regions)
    text_encoder = None if s.cache_text else fam.text_encoder(c, cfg.data.max_tokens)
    log(trainable.describe())
    model, synced = data_parallel(s, trainable, text_encoder, w, fsdp, log)

    # -- optimizer (one param group per part, each with its LR), sampler, resume -----------
    opt = trainable.build_optimizer(device)
    sampler, total, per_epoch = step_budget(cfg, s, w.size)
    log(opt.describe())
    generators = {"data": torch.Generator().manual_seed(t_cfg.seed + 1),  # flips, caption dropout, tag order
                  "noise": torch.Generator(device).manual_seed(t_cfg.seed + 2)}  # timesteps, noise, latents
    step, history, elapsed0 = 0, [], 0.0
    if resumed is not None:
        step, history, elapsed0 = resume(resumed, resume_dir, total, trainable, opt, sampler, generators, log)
    if w.rank:  # LoRA dropout masks differ per rank (global torch RNG); data / noise generators do not
        torch.manual_seed((t_cfg.seed * 1_000_003 + w.rank * 65_537 + step) % (1 << 63))
    batches = Batches(s, sampler, generators["data"], generators["noise"], w, text_encoder, cfg.trains_text_encoders)
    train_step = TrainStep.from_config(t_cfg, fam, model, trainable.parameters(), opt.optimizer, prediction, synced=synced,
                                       fsdp=fsdp, world=w, device=device, prepare=compiled and compiled.prepare)  # fmt: skip

    # -- the loop -------------------------------------------------------------------------
    run_id = claim_folder(cfg, s, kind, resume_dir, log) if w.main else ""
    t_start = time.perf_counter() - elapsed0
    log(f"training {total} steps (batch {t_cfg.batch_size} × {w.size} processes × accumulation {t_cfg.grad_accum}"
        f" = global batch {t_cfg.batch_size * w.size * t_cfg.grad_accum}, {per_epoch} steps per epoch) → {out}")
    bar = tqdm(total=total, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    runlog = RunLog(out, history, w.main, Trackers.open(out, cfg, log) if w.main else None, bar, device)
    trainable.metadata = training_metadata(cfg, s.dataset, opt.optimizer, takes=opt.spec.takes, total_steps=total,
                                           per_epoch=per_epoch, val_images=len(val_data or ()))  # fmt: skip
    save = Saver(cfg, s, trainable, opt, sampler, generators, runlog, prediction, t_start, w.main, run_id)
    guard, lora_path, interrupted, saved_at, fault = train_step.guard, None, False, 0, None
    stop = faults.StopSignals(log).install()  # SIGINT / SIGTERM: finish this step, save, exit 130 / 143
    validate = val_loss and val_loss.for_step(train_step, c.unet, text_encoder, c.text_modules())
    periodic = Periodic(cfg, total, per_epoch, runlog, save, trainable, opt, previews, validate, bar, stop, log)
    try:
        with speed.partitioner(t_cfg.memory_budget, remat=recomputes(t_cfg)):  # read when the regions compile
            periodic.start(step)  # sample.at_start: the step-0 grid
            while step < total:
                if w.distributed:  # all ranks stop at the same step
                    stop.signum = distributed.agree_max(stop.signum, device)
                if stop.signum:
                    break
                opt.set_lr(step, total)  # the schedule's LR (or a schedule-free optimizer's warmup)
                result = train_step(batches, generators["noise"])
                if result.skipped:
                    norm = None if result.norm is None else float(result.norm)
                    log(f"step {step + 1}: loss {float(result.loss)}, gradient norm {norm}: step skipped "
                        f"({guard.in_row} in a row, {guard.skipped} in all)")  # fmt: skip
                    if guard.exhausted:
                        interrupted, fault = True, guard.error(step, out / "state")
                        break
                    continue
                step += 1
                runlog.add(step, result.loss, float(opt.optimizer.param_groups[0]["lr"]), time.perf_counter() - t_start)
                bar.update(1)
                if compiled is not None:  # the first step compiled, or a new bucket: save for the next run
                    compiled.after_step()
                if (saved := periodic(step)) is not None:  # validation, log, saves, previews
                    lora_path, saved_at = saved, step
                if stop_after is not None and stop_after <= step < total:
                    interrupted = True
                    break
    except KeyboardInterrupt:
        interrupted = True
        stop.keyboard_interrupt()
        log(f"\ninterrupted at step {step}: saving state, resume with train.resume=true")
    except torch.OutOfMemoryError:
        train_step.clear_grads()
        interrupted = True
        fault = faults.out_of_memory(step + 1, t_cfg.batch_size, cfg.data.resolution, t_cfg.gradient_checkpointing,
                                     s.cache_latents and s.cache_text)  # fmt: skip
        fault = distributed.error_for(fault)  # torchrun: the other ranks stop too
    except Exception as e:  # torchrun: this rank's error (told to the others), or another's that broke a collective
        if not w.distributed:
            raise
        interrupted, fault = True, distributed.error_for(e)
    finally:
        bar.close()
        stop.restore()
    if device.type == "cuda" and fault is not None:
        torch.cuda.empty_cache()
    interrupted = interrupted or (bool(stop.signum) and step < total)  # a signal in the last step: the run is done
    if interrupted and step and saved_at != step:
        with stop:  # a signal now (torchrun's SIGTERM after another rank failed) waits for the save
            lora_path = save(step, final=False)
    elif not interrupted:
        lora_path = save(step, final=True)
        if w.main:
            runs.finish(out)  # the runs this one replaced are gone only now
        log(f"saved {lora_path}, {out / 'loss.csv'}, {out / 'loss.png'}")
    runlog.close()
    if fault is not None:  # torchrun: the fault is reported; a poll still running at exit can abort the process in C++
        distributed.FaultWatch.stop()
        raise fault
    if guard.skipped:
        log(f"{guard.skipped} steps skipped for a NaN/inf loss or gradient")
    distributed.barrier()  # rank 0's files are written when train() returns on any rank
    distributed.cleanup(w)
    return TrainResult(out, lora_path, step, [h[1] for h in runlog.history], c, trainable.networks, interrupted,
                       stop.signum if interrupted else 0, guard.skipped)  # fmt: skip
