"""The Train form: its schema from the config dataclasses, one-line docs, presets, field errors.

The form has one input per field of every `TrainConfig` section, found with
`dataclasses.fields`, so a field added to `config.py` appears without touching the UI. Its
one-line doc comes from `docs/config.md`'s tables, copied into `static/config_docs.json` (the
wheel has no docs/ folder): `python -m eridiffusion.ui.schema` rewrites the copy and
tests/ui checks that it is in sync. Errors come from the trainer's own checks
(`TrainConfig.from_dict`, which validates), turned into `{"section.field": message}`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import eridiffusion
from eridiffusion.config import SECTIONS, ConfigError, TrainConfig
from eridiffusion.ui.paths import PathRefused, Root

DOCS_JSON = Path(__file__).parent / "static" / "config_docs.json"
PATH_FIELDS = ("model.path", "data.dir", "save.output_dir", "cache.dir")  # resolved under the root
_FIELD = re.compile(r"\b(" + "|".join(SECTIONS) + r")\.(\w+)")
_ROW = re.compile(r"^\|\s*`(\w+)`\s*\|[^|]*\|\s*(.*?)\s*\|\s*$")


# ---------------------------------------------------------------- docs


def parse_config_docs(markdown: str) -> dict[str, dict[str, str]]:
    """`{section: {field: meaning}}` from docs/config.md: `## [section]` (or `## [[data.subsets]]`)
    then `| `field` | default | meaning |` rows."""
    docs: dict[str, dict[str, str]] = {}
    section = None
    for line in markdown.splitlines():
        head = re.match(r"^## \[+([\w.]+)\]+", line)
        if head:
            section = head.group(1)
            docs[section] = {}
            continue
        row = _ROW.match(line)
        if section is not None and row:
            docs[section][row.group(1)] = row.group(2)
    return docs


def write_config_docs(markdown_path: str | Path, json_path: str | Path = DOCS_JSON) -> Path:
    """Regenerate the shipped copy of the field docs from docs/config.md."""
    from eridiffusion.io import write_text

    docs = parse_config_docs(Path(markdown_path).read_text(encoding="utf-8"))
    return write_text(json_path, json.dumps(docs, indent=1, ensure_ascii=False) + "\n")


def config_docs() -> dict[str, dict[str, str]]:
    return json.loads(DOCS_JSON.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- schema


def field_type(tp: Any, docs: dict[str, str] | None = None) -> dict[str, Any]:
    """How the form edits a value of type `tp`: kind bool/int/float/str/choice/list/tables/dict/json.

    `X | None` adds `"optional": true`; a tuple of dataclasses (`[[data.subsets]]`) is "tables",
    with the item's fields; anything else the form does not know is edited as JSON text."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return {**field_type(inner[0] if len(inner) == 1 else Any, docs), "optional": True}
    if origin is Literal:
        return {"kind": "choice", "choices": list(args)}
    if origin is tuple and args and dataclasses.is_dataclass(args[0]):
        return {"kind": "tables", "fields": _fields(args[0], docs or {}, {})}
    if origin is tuple and args and args[0] in (str, int, float, bool):
        length = None if len(args) == 2 and args[1] is Ellipsis else len(args)
        return {"kind": "list", "item": args[0].__name__, "length": length}
    if tp in (bool, int, float, str):
        return {"kind": tp.__name__}
    return {"kind": "dict" if tp is dict or origin is dict else "json"}


def _fields(cls: type, docs: dict[str, str], defaults: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    hints = typing.get_type_hints(cls)
    return [
        {"name": f.name, "key": prefix + f.name, "type": field_type(hints[f.name], docs),
         "default": defaults.get(f.name, _default(f)), "doc": docs.get(f.name, "")}
        for f in dataclasses.fields(cls)
    ]  # fmt: skip


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None
    return list(value) if isinstance(value, tuple) else value


def form_schema() -> list[dict[str, Any]]:
    """One entry per config section: its fields with type, default and doc, in dataclass order."""
    docs = config_docs()
    defaults = TrainConfig().to_dict()
    sections = []
    for name, cls in SECTIONS.items():
        fields = _fields(cls, docs.get(name, {}), defaults[name], prefix=name + ".")
        for f in fields:  # a table inside a section is documented under its own heading
            if f["type"]["kind"] == "tables":
                f["type"] = field_type(typing.get_type_hints(cls)[f["name"]], docs.get(f["key"], {}))
        sections.append({"name": name, "fields": fields})
    return sections


# ---------------------------------------------------------------- validation


def field_of(message: str) -> str | None:
    """The first `section.field` a ConfigError names, or None."""
    m = _FIELD.search(message)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def path_values(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """(`section.field`, path) for every non-empty path of a raw config, the subsets' dirs included."""
    found = []
    for key in PATH_FIELDS:
        section, name = key.split(".")
        value = raw.get(section, {}).get(name) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value:
            found.append((key, value))
    subsets = raw.get("data", {}).get("subsets", []) if isinstance(raw.get("data"), dict) else []
    for s in subsets if isinstance(subsets, list) else []:
        if isinstance(s, dict) and isinstance(s.get("dir"), str) and s["dir"]:
            found.append(("data.subsets", s["dir"]))
    return found


def check(raw: dict[str, Any], root: Root | None = None) -> tuple[TrainConfig | None, dict[str, str]]:
    """Build the config the trainer would; every error found as `{"section.field": message}`.

    `from_dict` stops at the first problem, so each named field is reset to its default and
    the rest is checked again; when the default fails too (a check across fields), the whole
    section is. An error naming no field is returned under the key "config". Paths
    (PATH_FIELDS) must resolve under `root`.
    """
    raw = copy.deepcopy(raw)
    errors: dict[str, str] = {}
    if root is not None:
        for key, value in path_values(raw):
            try:
                root.resolve(value)
            except (PathRefused, ValueError) as e:
                errors.setdefault(key, str(e))
    for _ in range(sum(len(dataclasses.fields(c)) for c in SECTIONS.values()) + 1):
        try:
            cfg = TrainConfig.from_dict(raw, source="form")
        except ConfigError as e:
            message = str(e).removeprefix("form: ")
            key = field_of(message)
            if key is None:
                errors.setdefault("config", message)
                return None, errors
            errors.setdefault(key, message)
            section, name = key.split(".")
            if not isinstance(raw.get(section), dict):
                return None, errors
            if name in raw[section]:
                del raw[section][name]
            else:
                del raw[section]
            continue
        return (None if errors else cfg), errors
    return None, errors


# ---------------------------------------------------------------- presets


def demo_preset() -> TrainConfig:
    """The `eri demo` run with paths relative to the root (`eri ui --demo` prepares them there)."""
    from eridiffusion.tiny import demo_config

    return demo_config(".", steps=100).replace(save={"output_dir": "runs/demo"})


def config_folders(root: Path) -> list[Path]:
    """`configs/` of the repository holding the root (if any) and of the package's checkout."""
    found = []
    for folder in (root, *root.parents):
        if (folder / "configs").is_dir() and (folder / "pyproject.toml").is_file():
            found.append(folder / "configs")
            break
    checkout = Path(eridiffusion.__file__).resolve().parents[1] / "configs"
    if checkout.is_dir() and checkout not in found:
        found.append(checkout)
    return found


def presets(root: Path) -> list[dict[str, Any]]:
    """The demo config, then the shipped `configs/*.toml` that parse (`{name, source, config}`)."""
    out = [{"name": "demo", "source": "eridiffusion.tiny.demo_config", "config": demo_preset().to_dict()}]
    for folder in config_folders(root):
        for path in sorted(folder.glob("*.toml")):
            try:
                cfg = TrainConfig.from_toml(path)
            except ConfigError:
                continue
            out.append({"name": f"configs/{path.name}", "source": str(path), "config": cfg.to_dict()})
    return out


if __name__ == "__main__":
    print(write_config_docs(sys.argv[1] if len(sys.argv) > 1 else "docs/config.md"))
