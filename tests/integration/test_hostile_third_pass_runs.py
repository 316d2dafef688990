"""The third hostile pass (#45), the findings that need a run: what a run writes is strict JSON, and says which
values were not finite."""

from __future__ import annotations

import json
import sys

import pytest

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario


def _strict(text: str):
    """JSON as a strict parser reads it: NaN, Infinity and -Infinity are errors (Python's json writes them)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_a_nan_user_metric_is_null_in_strict_json_and_named(tiny_raw, tmp_path, monkeypatch):
    """A user metric that returns NaN: summary.json held NaN (a strict parser refused the file) and metrics.jsonl a
    bare null. Both are strict JSON now, with the key and what it was under not_finite."""
    (tmp_path / "nanmetric.py").write_text("def always_nan(prediction: str, reference: str) -> float:\n"
                                           "    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("nanmetric", None)
    tiny_raw.update(rounds=1)
    tiny_raw["eval"].update(at_start=False, metrics=["nanmetric:always_nan"],
                            generate={"every": 1, "max_samples": 4, "max_new_tokens": 2})
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    summary = _strict((tmp_path / "run" / "summary.json").read_text())
    rows = [_strict(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval/gen/always_nan"] is None
    assert rows[-1]["not_finite"]["eval/gen/always_nan"] == "nan"
    assert summary["final/eval/gen/always_nan"] is None
    assert summary["not_finite"]["final/eval/gen/always_nan"] == "nan"
    assert summary["final/eval/loss"] is not None  # the rest of the run is as it was
    assert [_strict(x) for x in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]


def test_finite_json_names_every_kind_and_depth():
    from fedsim.federation.rundir import dumps

    text = dumps({"a": float("inf"), "b": {"c": [1.0, float("-inf")]}, "d": float("nan"), "e": 2})
    out = _strict(text)
    assert out == {"a": None, "b": {"c": [1.0, None]}, "d": None, "e": 2,
                   "not_finite": {"a": "inf", "b.c[1]": "-inf", "d": "nan"}}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nothing_non_finite_reaches_the_file(value):
    from fedsim.federation.rundir import dumps

    assert "NaN" not in dumps({"x": value}) and "Infinity" not in dumps({"x": value})
