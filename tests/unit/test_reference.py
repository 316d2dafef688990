"""The scenario reference and the JSON Schema are generated from the schema: every key is in them, described, and
every shipped scenario checks against the JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from fedsim.config import Scenario
from fedsim.config.reference import _models, json_schema, markdown, sections

ROOT = Path(__file__).resolve().parents[2]


def _paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        out.add(prefix + name)
        for m in _models(field.annotation):
            out |= _paths(m, prefix + name + ".")
    return out


def test_every_key_of_the_schema_is_in_the_reference_and_described():
    keys = {k.path: k for s in sections() for k in s.keys}
    assert set(keys) == _paths(Scenario)
    assert not [p for p, k in keys.items() if not k.description.strip()]
    page = markdown()
    assert all(f"| `{p}` |" in page for p in keys)
    assert "| `compression.upload` | `none` \\| `fp16`" in page and "| `clients.lora.rank` | int (≥ 1, ≤ 4096) | `8` |" in page


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_checks_against_the_json_schema(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), json_schema())


def test_the_json_schema_refuses_what_the_loader_refuses_and_says_what_keys_mean(capsys):
    from fedsim.cli import main

    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"clients": {"num_clientz": 3}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"compression": {"upload": "int3"}}, schema)
    props = schema["$defs"]["ResourcesConfig"]["properties"]
    assert "pool" in props["pools"]["description"] and props["num_workers"]["description"]
