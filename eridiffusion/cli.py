"""The `eri` command: one function per sub-command, registered with `@command`.

Add a sub-command by writing one function that takes the parsed `argparse.Namespace` and
returns an exit code, decorated with `@command(name, help, arg(...), ...)`. Errors about
errors a user can cause (`errors.UserError`) are caught once, in `main`, for every
sub-command: the user sees one line and the error's exit status (2 bad input, 1 a fault at run
time), never a traceback; so is a full disk.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from eridiffusion import checkpoint
from eridiffusion.errors import UserError
from eridiffusion.faults import DiskFull, is_disk_full
from eridiffusion.weights import WeightLoader


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    args: tuple[tuple[tuple[str, ...], dict], ...]
    passthrough: bool = False  # unknown arguments go to the command (args.extra) instead of an error


COMMANDS: dict[str, Command] = {}


def arg(*flags: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    """One `add_argument` call, written where the command is registered."""
    return flags, kwargs


def command(name: str, help: str, *args: tuple[tuple[str, ...], dict], passthrough: bool = False):
    """Register the decorated function as `eri NAME`."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, run, args, passthrough)
        return run

    return register


def build_parser() -> argparse.ArgumentParser:
    from eridiffusion import __version__

    parser = argparse.ArgumentParser(prog="eri", description="LoRA training for SDXL and SD1.5.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, add_help=not cmd.passthrough)
        for flags, kwargs in cmd.args:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(run=cmd.run, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if not COMMANDS[args.command].passthrough:  # flags anywhere: eri train CONFIG --overwrite k=v
        rest = argv[argv.index(args.command) + 1 :]
        args, extra = args.parser.parse_intermixed_args(rest, argparse.Namespace(command=args.command)), []
    args.extra = extra
    try:
        return args.run(args)
    except Exception as e:
        from eridiffusion import distributed

        error = distributed.error_for(e)  # torchrun: told to the other ranks, or the rank that failed first
        if isinstance(error, OSError) and is_disk_full(error):  # a full disk is the user's to fix
            error = DiskFull(error.filename or ".")
        if not isinstance(error, UserError):
            raise  # a bug: keep its traceback
        print(f"eri {args.command}: {error}", file=sys.stderr)
        return error.exit_code


# -- eri inspect ------------------------------------------------------------------------
def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}"


def _dtypes(loader: WeightLoader, keys: list[str]) -> dict[str, int]:
    return dict(Counter(str(loader.dtype(k)).removeprefix("torch.") for k in keys).most_common())


def _model_report(loader: WeightLoader) -> dict:
    fam = checkpoint.detect(loader)
    models = {p: fam.build(p, "meta") for p in fam.parts}
    checks, unclaimed = checkpoint.check(loader, fam, models)
    components, problems = {}, []
    for c in checks:
        keys = [k for k in loader.keys() if k.startswith(c.prefix) and not checkpoint.ignored(k, fam.name)]
        components[c.part] = {
            "prefix": c.prefix,
            "tensors": len(keys),
            "parameters": sum(loader.shape(k).numel() for k in keys),
            "dtypes": _dtypes(loader, keys),
        }
        if not keys:
            problems.append(f"{c.part}: absent (no keys under {c.prefix})")
        elif len(c.missing) == len(c.expected):
            problems.append(f"{c.part}: none of its {len(c.expected)} keys found under {c.prefix}")
        else:
            problems += [f"missing {c.prefix}{k}" for k in c.missing]
        problems += [f"unexpected {c.prefix}{k}" for k in c.unexpected]
        problems += [f"shape {c.prefix}{k}: file {found}, model {want}" for k, want, found in c.shapes]
    problems += [f"unexpected {k}" for k in unclaimed]
    return {
        "kind": "model",
        "family": fam.name,
        "base_model_version": fam.base_model_version,
        "prediction": fam.prediction,
        "components": components,
        "ignored": sorted(k for k in loader.keys() if checkpoint.ignored(k, fam.name)),
        "problems": problems,
    }


def _lora_report(loader: WeightLoader, modules: list[str]) -> dict:
    """What each module's adapter class (`networks` registry) says of its tensors' shapes."""
    from eridiffusion.networks import base as adapters

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in loader.keys():
        if (split := adapters.split_key(key, known=True)) is not None:
            shapes.setdefault(split[0], {})[split[1]] = tuple(loader.shape(key))
    counts: Counter[str] = Counter()
    ranks: Counter[int] = Counter()
    alphas: Counter[float] = Counter()
    problems = []
    for name in modules:
        counts[name.split("_", 2)[1]] += 1  # lora_<component>_<path>
        cls = adapters.adapter_for(shapes.get(name, {}))
        if cls is None:
            problems.append(adapters.unreadable(name, shapes.get(name, {})))
            continue
        rank, found = cls.check(shapes[name])
        problems += [f"{name}: {p}" for p in found]
        if rank is None:
            continue
        ranks[rank] += 1
        for s in cls.hyper:  # alpha
            if s in shapes[name]:
                alphas[float(loader.get(f"{name}.{s}").float().item())] += 1
            else:
                problems.append(f"{name}: no .{s} (read as scale 1.0 by ComfyUI/A1111)")
    return {
        "kind": "lora",
        "modules": len(modules),
        "components": dict(sorted(counts.items())),
        "ranks": {str(r): n for r, n in sorted(ranks.items())},
        "alphas": {f"{a:g}": n for a, n in sorted(alphas.items())},
        "metadata": loader.metadata,
        "problems": problems,
    }


def _print_report(r: dict) -> None:
    print(f"file:      {r['file']}")
    print(f"format:    {r['format']}, {r['tensors']} tensors, {_size(r['size'])} on disk")
    if r["kind"] == "model":
        print(f"family:    {r['family']} (ss_base_model_version {r['base_model_version']}, {r['prediction']})")
        print("components:")
        for part, c in r["components"].items():
            dtypes = ", ".join(f"{d} ({n})" if len(c["dtypes"]) > 1 else d for d, n in c["dtypes"].items()) or "-"
            print(f"  {part:<4} {c['prefix']:<38} {c['tensors']:>5} tensors {c['parameters']:>14,} params  {dtypes}")
        if r["ignored"]:
            more = ", …" if len(r["ignored"]) > 3 else ""
            print(f"ignored:   {len(r['ignored'])} ({', '.join(r['ignored'][:3])}{more})")
    else:
        comps = ", ".join(f"{k} {n}" for k, n in r["components"].items())
        print(f"LoRA:      {r['modules']} modules ({comps})")
        print(f"rank:      {', '.join(f'{k} ×{n}' for k, n in r['ranks'].items()) or '-'}")
        print(f"alpha:     {', '.join(f'{k} ×{n}' for k, n in r['alphas'].items()) or '-'}")
        print(f"metadata:  {len(r['metadata'])} entries")
        for k, v in sorted(r["metadata"].items()):
            print(f"  {k} = {v if len(v) <= 100 else v[:97] + '...'}")
    problems = r["problems"]
    print(f"problems:  {len(problems) or 'none'}")
    for p in problems[:10]:
        print(f"  {p}")
    if len(problems) > 10:
        print(f"  … and {len(problems) - 10} more (--json lists all)")


@command(
    "inspect",
    "show what a model or LoRA file holds: family, parts, ranks, metadata, problems",
    arg("file", help="a .safetensors checkpoint or LoRA file"),
    arg("--allow-pickle", action="store_true", help="read .ckpt/.pt/.bin files (weights_only=True)"),
    arg("--json", action="store_true", help="print one JSON object instead of text"),
)
def inspect(args: argparse.Namespace) -> int:
    with WeightLoader(args.file, allow_pickle=args.allow_pickle) as loader:
        modules = checkpoint.lora_modules(loader.keys())
        report = _lora_report(loader, modules) if modules else _model_report(loader)
        head = {"file": str(loader.path), "format": loader.format, "tensors": len(loader), "size": loader.file_size}
        report = {**head, **report}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_report(report)
    return 0


# -- eri train / eri cache / eri demo -------------------------------------------------------
@command(
    "train",
    "train a LoRA as a TOML config says (fields overridable as section.field=value)",
    arg("config", help="a TOML file, e.g. configs/sdxl_lora.toml (docs/config.md lists every field)"),
    arg("overrides", nargs="*", metavar="section.field=value", help="e.g. model.path=/models/x.safetensors"),
    arg("--resume", metavar="DIR", help="continue exactly from a saved state folder (OUTPUT_DIR/state)"),
    arg("--overwrite", action="store_true", help="replace an earlier run's outputs (= save.overwrite=true)"),
)
def train(args: argparse.Namespace) -> int:
    """Exit 0 done, 2 bad input, 1 run-time fault (docs/reliability.md), 128 + signal when stopped."""
    from eridiffusion import faults
    from eridiffusion.config import TrainConfig
    from eridiffusion.train import train as run

    overrides = [*args.overrides, *(["save.overwrite=true"] if args.overwrite else [])]
    try:
        result = run(TrainConfig.from_toml(args.config, overrides), resume_dir=args.resume)
    except KeyboardInterrupt:
        print("eri train: interrupted before the first step; nothing to save", file=sys.stderr)
        return 130
    if result.stop_signal:
        name = faults.SIGNAL_NAMES.get(result.stop_signal, str(result.stop_signal))
        print(f"eri train: stopped by {name} after step {result.step}; state saved in {result.output_dir / 'state'}, "
              "continue with train.resume=true", file=sys.stderr)  # fmt: skip
        return 128 + result.stop_signal
    return 0


@command(
    "cache",
    "encode the latent and text-embedding cache of a config without training",
    arg("config", help="a TOML training config"),
    arg("overrides", nargs="*", metavar="section.field=value"),
)
def cache(args: argparse.Namespace) -> int:
    from eridiffusion.config import TrainConfig
    from eridiffusion.train import build_cache

    stats = build_cache(TrainConfig.from_toml(args.config, args.overrides)).stats
    print(f"cache: {stats.writes} entries written")
    return 0


@command(
    "demo",
    "teach the shipped tiny shapes model a new shape (a bar) with a LoRA on CPU, scored before and after",
    arg("--dir", default="runs/demo", help="output folder (default runs/demo)"),
    arg("--steps", type=int, default=None, help="training steps (default: the demo recipe's, eridiffusion/tiny/demo.py)"),
    arg("--overwrite", action="store_true", help="use --dir even if it holds files that are not a demo run's"),
)
def demo(args: argparse.Namespace) -> int:
    from eridiffusion.tiny import demo as tiny_demo

    tiny_demo.check_folder(args.dir, args.overwrite)
    result, before, after = tiny_demo.run_demo(args.dir, args.steps or tiny_demo.STEPS)
    print(tiny_demo.summary(before, after))
    print(f"demo: {before.grid}, {after.grid}, {result.output_dir / 'loss.png'}; LoRA {result.lora_path}")
    return 0


# -- eri lora merge / resize (networks/tools.py) ---------------------------------------------
@command(
    "lora",
    "adapter files: merge into a checkpoint (merge CKPT LORA[:W] ... --out F) or cut a LoRA's rank (resize LORA --rank N --out F)",
    arg("action", choices=("merge", "resize")),
    arg("files", nargs="+", metavar="FILE", help="merge: CKPT then LORA[:STRENGTH] ...; resize: one LoRA file"),
    arg("--out", required=True, help="the file to write"),
    arg("--rank", type=int, help="resize: the new rank (modules of a lower rank keep theirs)"),
    arg("--allow-pickle", action="store_true", help="merge: read a .ckpt checkpoint (weights_only=True)"),
)
def lora(args: argparse.Namespace) -> int:
    from eridiffusion.networks import tools
    from eridiffusion.pipeline import parse_lora

    if args.action == "merge":
        if len(args.files) < 2:
            raise UserError("merge needs CKPT and at least one LORA[:STRENGTH]")
        changed = tools.merge_into_checkpoint(args.files[0], [parse_lora(x) for x in args.files[1:]], args.out,
                                              allow_pickle=args.allow_pickle)  # fmt: skip
        print(f"lora merge: {len(changed)} weights changed, the other tensors copied as they were; wrote {args.out}")
        return 0
    if args.rank is None or len(args.files) != 1:
        raise UserError("resize needs one LoRA file and --rank N")
    report = tools.resize(args.files[0], args.rank, args.out)
    for name, (old, new, energy) in report.items():
        print(f"{name}: rank {old} -> {new}, kept energy {energy:.2%}")
    low = min(report.items(), key=lambda kv: kv[1][2])
    print(f"lora resize: {len(report)} modules, lowest kept energy {low[1][2]:.2%} ({low[0]}); wrote {args.out}")
    return 0


# -- eri sample (docs/sampling.md) ------------------------------------------------------------
@command(
    "sample",
    "render PNGs from a checkpoint (+ LoRAs); each PNG carries the settings that repeat it",
    arg("--model", required=True, help="an SDXL or SD1.5 single-file checkpoint"),
    arg("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="a LoRA and its strength (default 1); repeatable"),
    arg("--prompt", action="append", required=True, help="the text; repeat for several prompts"),
    arg("--negative", default="", help="negative prompt (default empty: zeros for SDXL, as sgm/diffusers)"),
    arg("--steps", type=int, default=30),
    arg("--cfg", type=float, default=7.0, help="classifier-free guidance scale (default 7)"),
    arg("--sampler", default="dpmpp_2m", choices=("euler", "euler_a", "dpmpp_2m", "ddim")),
    arg("--karras", action="store_true", help="Karras sigma spacing"),
    arg("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k (default 0)"),
    arg("--batch", type=int, default=1, help="images per prompt (default 1)"),
    arg("--size", default=None, metavar="WxH", help="default 1024x1024 (SDXL), 512x512 (SD1.5)"),
    arg("--out", default="samples", help="output folder; files are numbered, never overwritten"),
    arg("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps"),
    arg("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="auto: bf16 on CUDA, fp32 elsewhere"),
    arg("--allow-pickle", action="store_true", help="read a .ckpt checkpoint (weights_only=True)"),
    arg("--prediction", default=None, choices=("epsilon", "v_prediction"), help="the model's target (default: the family's)"),
    arg("--zero-terminal-snr", action="store_true",
        help="a zero-terminal-SNR v-prediction model: its schedule, trailing steps, CFG rescale 0.7"),
    arg("--spacing", default=None, choices=("leading", "linspace", "trailing"),
        help="timestep spacing (default leading; trailing with --zero-terminal-snr)"),
    arg("--guidance-rescale", type=float, default=None, help="CFG rescale φ (default 0; 0.7 with --zero-terminal-snr)"),
    arg("--max-tokens", type=int, default=75, choices=(75, 150, 225), help="prompt tokens encoded in 75-token chunks"),
    arg("--compile", action="store_true", help="compile the UNet and VAE decoder: faster from a few images on"),
)
def sample(args: argparse.Namespace) -> int:
    from eridiffusion import pipeline

    size = pipeline.parse_size(args.size) if args.size else None
    pipeline.sample_files(
        args.model, args.prompt, args.out, negative=args.negative, steps=args.steps, cfg=args.cfg,
        sampler=args.sampler, karras=args.karras, seed=args.seed, size=size, batch=args.batch,
        loras=[pipeline.parse_lora(x) for x in args.lora], device=args.device, dtype=args.dtype,
        allow_pickle=args.allow_pickle, prediction=args.prediction, zero_terminal_snr=args.zero_terminal_snr,
        spacing=args.spacing, guidance_rescale=args.guidance_rescale, max_tokens=args.max_tokens,
        compile=args.compile,
    )  # fmt: skip
    return 0


# -- eri ui (docs/ui/README.md) -----------------------------------------------------------
@command(
    "ui",
    "a local web app: dataset captions and buckets, a training form, live loss and samples, runs, sampling",
    arg("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs a token)"),
    arg("--port", type=int, default=7860, help="default 7860"),
    arg("--root", default=".", help="the folder the UI may read and write (datasets, models, runs); default ."),
    arg("--token", default=None, help="require this token on every request (generated when --host is not local)"),
    arg("--demo", action="store_true", help="write the tiny demo model and dataset under --root first"),
)
def ui(args: argparse.Namespace) -> int:
    from eridiffusion.ui import serve

    return serve(args.root, host=args.host, port=args.port, token=args.token, demo=args.demo)


# -- eri bench --------------------------------------------------------------------------
@command(
    "bench",
    "the SDXL LoRA training-step benchmark on a CUDA GPU (bench/train_step.py; its flags pass through)",
    passthrough=True,
)
def bench(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"
    if not script.is_file():
        print(f"eri bench: {script} not found; the benchmarks live in the source checkout (git clone, pip install -e .)",
              file=sys.stderr)  # fmt: skip
        return 2
    sys.argv = [str(script), *args.extra]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
