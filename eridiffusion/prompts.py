"""Preview prompts with per-prompt options, kohya's format: `a cat --n blurry --w 832 --h 1216 --d 42`.

Kohya sd-scripts `library/train_util.py` `line_to_prompt_dict` / `load_prompts` (commit
48d368fa557731ad0488c07304dfeba8c07910eb): a line is split on " --"; the first part is the
prompt, each other part an option `NAME VALUE` (case-insensitive): `n` negative prompt, `w` / `h`
width / height, `s` sampler steps (clamped to 1..1000), `l` CFG scale, `d` seed, `ss` sampler.
A prompt file (.txt) has one such line per prompt; blank lines and lines starting with `#` are
skipped. Unlike kohya, an unknown option or a bad value is a one-line error, not a log line.
Torch-free: `config.validate` parses `sample.prompts` with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from eridiffusion.errors import ConfigError

SAMPLER_NAMES = ("euler", "euler_a", "dpmpp_2m", "ddim")  # samplers.SAMPLERS, without importing torch
OPTIONS = {"n": "negative", "w": "width", "h": "height", "s": "steps", "l": "cfg", "d": "seed", "ss": "sampler"}


@dataclass(frozen=True)
class PromptSpec:
    """One preview prompt; None = the `[sample]` setting of that name."""

    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None  # one image with this seed instead of a column per `sample.seeds`
    sampler: str | None = None


def _number(kind, text: str, option: str, where: str):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{where}: --{option} {text!r} is not {what}") from None


def parse_prompt(line: str, where: str = "sample.prompts") -> PromptSpec:
    """`"a cat --n blurry --w 832 --d 3"` → PromptSpec; `where` names the source in errors."""
    prompt, *parts = (" " + line.strip()).split(" --")  # a leading space: "--n x" has an empty prompt
    values: dict[str, object] = {}
    for part in parts:
        name, _, text = part.strip().partition(" ")
        name, text = name.lower(), text.strip()
        if name not in OPTIONS:
            known = ", ".join(f"--{k}" for k in OPTIONS)
            raise ConfigError(f"{where}: unknown option --{name} in {line.strip()!r}; known: {known}")
        if not text and name != "n":
            raise ConfigError(f"{where}: --{name} needs a value in {line.strip()!r}")
        if name == "n":
            values["negative"] = text
        elif name in ("w", "h", "d"):
            value = _number(int, text, name, where)
            if name != "d" and (value <= 0 or value % 8):
                raise ConfigError(f"{where}: --{name} {value} must be a positive multiple of 8")
            values[OPTIONS[name]] = value
        elif name == "s":
            values["steps"] = max(1, min(1000, _number(int, text, name, where)))  # kohya's clamp
        elif name == "l":
            values["cfg"] = _number(float, text, name, where)
        else:  # ss: kohya's k_ names are ours without the prefix
            sampler = text.lower().removeprefix("k_")
            if sampler not in SAMPLER_NAMES:
                raise ConfigError(f"{where}: --ss {text} is unknown: use one of {', '.join(SAMPLER_NAMES)}")
            values["sampler"] = sampler
    if not prompt.strip():
        raise ConfigError(f"{where}: {line.strip()!r} has no prompt before its options")
    return PromptSpec(prompt.strip(), **values)


def read_prompt_file(path: str | os.PathLike) -> list[PromptSpec]:
    """A kohya .txt prompt file: one prompt (with options) per line; blank and `#` lines skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"sample.prompt_file = {os.fspath(path)!r} cannot be read ({e.strerror or e})") from None
    specs = [parse_prompt(line, f"{os.fspath(path)}:{n}") for n, line in enumerate(lines, 1)
             if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip
    if not specs:
        raise ConfigError(f"sample.prompt_file = {os.fspath(path)!r} has no prompts: write one per line")
    return specs
