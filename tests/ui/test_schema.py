"""The Train form: every config field, its doc from docs/config.md, field errors, presets."""

import dataclasses
import json
import typing
from pathlib import Path

from eridiffusion.config import SECTIONS, TrainConfig
from eridiffusion.ui import schema

REPO = Path(__file__).resolve().parents[2]


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_form_schema_covers_every_config_field(client):
    form = client.get("/api/schema").json()
    assert [s["name"] for s in form] == list(SECTIONS)
    defaults = TrainConfig().to_dict()
    for section, cls in zip(form, SECTIONS.values()):
        assert [f["name"] for f in section["fields"]] == _names(cls)
        hints = typing.get_type_hints(cls)
        for f in section["fields"]:
            assert f["key"] == f"{section['name']}.{f['name']}"
            assert f["default"] == defaults[section["name"]][f["name"]]
            kind = f["type"]["kind"]
            assert kind in ("bool", "int", "float", "str", "choice", "list", "tables", "dict", "json"), f
            if kind == "tables":  # a table inside a section: its own fields too
                item = typing.get_args(hints[f["name"]])[0]
                assert [g["name"] for g in f["type"]["fields"]] == _names(item)


def test_field_types_and_docs():
    form = {f["key"]: f for s in schema.form_schema() for f in s["fields"]}
    assert form["train.max_steps"]["type"] == {"kind": "int"}
    assert form["optim.betas"]["type"] == {"kind": "list", "item": "float", "length": 2}
    assert form["sample.prompts"]["type"] == {"kind": "list", "item": "str", "length": None}
    assert form["model.dtype"]["type"]["choices"] == ["bf16", "fp16", "fp32", "fp8", "fp8_e4m3", "fp8_e5m2"]
    assert form["train.max_steps"]["doc"].startswith("optimizer steps")
    assert form["lora.rank"]["doc"] == "LoRA rank of linear and 1×1 layers"


def test_shipped_docs_are_in_sync_with_docs_config_md():
    """static/config_docs.json is docs/config.md's tables; regenerate with
    `python -m eridiffusion.ui.schema docs/config.md` after editing the docs."""
    fresh = schema.parse_config_docs((REPO / "docs" / "config.md").read_text(encoding="utf-8"))
    assert json.loads(schema.DOCS_JSON.read_text(encoding="utf-8")) == fresh, (
        "eridiffusion/ui/static/config_docs.json is stale: run python -m eridiffusion.ui.schema docs/config.md"
    )


def test_parse_config_docs():
    md = "# x\n## [train]\n| field | default | meaning |\n|---|---|---|\n| `seed` | `42` | seeds `everything` |\n" \
         "## [[data.subsets]]\n| `dir` | `\"\"` | a folder |\n"  # fmt: skip
    assert schema.parse_config_docs(md) == {"train": {"seed": "seeds `everything`"}, "data.subsets": {"dir": "a folder"}}


def test_invalid_values_come_back_as_field_errors(client):
    cfg = client.get("/api/presets").json()[0]["config"]
    cfg["train"]["max_steps"] = -3
    cfg["train"]["batch_size"] = "two"
    cfg["lora"]["rank"] = 1.5
    cfg["optim"]["betas"] = [0.9]
    cfg["data"]["bucket_min"] = 100
    cfg["sample"]["sampler"] = "nope"
    cfg["lora"]["rnak"] = 4
    r = client.post("/api/validate", json={"config": cfg}).json()
    assert not r["ok"] and r["toml"] is None
    errors = r["errors"]
    assert set(errors) == {"train.max_steps", "train.batch_size", "lora.rank", "optim.betas", "data.bucket_min",
                           "sample.sampler", "lora.rnak"}  # fmt: skip
    assert "train.batch_size expects an integer" in errors["train.batch_size"]
    assert "train.max_steps = -3 is invalid" in errors["train.max_steps"]
    assert "did you mean lora.rank?" in errors["lora.rnak"]
    # the same errors stop a start, and nothing is started
    r = client.post("/api/train/start", json={"config": cfg})
    assert r.status_code == 400 and set(r.json()["errors"]) == set(errors)
    assert client.get("/api/train/status").json()["state"] == "idle"


def test_a_valid_config_validates_to_its_toml(client):
    cfg = client.get("/api/presets").json()[0]["config"]
    r = client.post("/api/validate", json={"config": cfg}).json()
    assert r == {"ok": True, "errors": {}, "toml": schema.demo_preset().to_toml()}


def test_start_names_missing_inputs_and_earlier_outputs(client, demo_root):
    cfg = client.get("/api/presets").json()[0]["config"]
    cfg["model"]["path"] = "missing.safetensors"
    cfg["data"]["dir"] = "nowhere"
    r = client.post("/api/train/start", json={"config": cfg})
    assert r.status_code == 400 and set(r.json()["errors"]) == {"model.path", "data.dir"}
    old = demo_root / "runs" / "old"
    old.mkdir(parents=True)
    (old / "loss.csv").write_text("step,loss,lr,time\n")
    cfg = client.get("/api/presets").json()[0]["config"]
    cfg["save"]["output_dir"] = "runs/old"
    r = client.post("/api/train/start", json={"config": cfg})
    assert r.status_code == 400 and "--overwrite" in r.json()["errors"]["save.output_dir"]


def test_presets_are_the_demo_and_the_shipped_configs(client, demo_root):
    presets = client.get("/api/presets").json()
    assert presets[0]["name"] == "demo" and presets[0]["config"]["model"]["path"] == "tiny_sdxl.safetensors"
    shipped = {p["name"] for p in presets[1:]}
    assert {f"configs/{p.name}" for p in (REPO / "configs").glob("*.toml")} <= shipped
