"""Generation-based evaluation in a run (#24 points 3 and 5): on Ray, with a user's metric function named by import
path and evaluated on the workers, the global and the personalized models generating, samples kept on disk."""

import json
import sys

import pytest
from tolerances import F64

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario


@pytest.mark.usefixtures("ray_session")
def test_generation_on_ray_with_a_user_metric_and_personal_models(tiny_raw, tmp_path, monkeypatch):
    pkg = tmp_path / "usermetrics"
    pkg.mkdir()
    (pkg / "my_metrics.py").write_text(
        "def first_char(prediction: str, reference: str) -> float:\n"
        "    return float(prediction[:1] == reference[:1])\n\n\n"
        "def same(prediction: str, reference: str) -> float:\n"
        "    return float(prediction == reference)\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", str(pkg))  # the Ray workers import it by name
    sys.modules.pop("my_metrics", None)
    tiny_raw["data"]["synthetic"]["tasks"] = ["count", "upper"]
    tiny_raw["training"].update(local_steps=10, lr=0.01)
    tiny_raw["eval"]["local_clients"] = 4  # each client scored on its own split generates there too
    tiny_raw["resources"]["backend"] = "ray"
    tiny_raw["eval"].update(at_start=False, local_test_fraction=0.2, metrics=["exact_match", "my_metrics:first_char",
                                                                            "my_metrics:same"],
                            generate={"every": 1, "max_samples": None, "log_samples": 1000, "max_new_tokens": 16})
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gens = [json.loads(x) for x in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        mine = [g for g in gens if g["round"] == row["round"]]
        assert len(mine) == 48 and {g["task"] for g in mine} == {"count", "upper"}
        # greedy generation reproduces the reference exactly when, and only when, teacher forcing says so
        assert row["eval/accuracy"] == sum(g["prediction"] == g["reference"] for g in mine) / 48
        assert row["eval/gen/first_char"] == pytest.approx(
            sum(g["prediction"][:1] == g["reference"][:1] for g in mine) / 48, abs=F64)
        count = [g for g in mine if g["task"] == "count"]
        assert row["eval/gen/task/count/first_char"] == pytest.approx(
            sum(g["prediction"][:1] == g["reference"][:1] for g in count) / len(count), abs=F64)
        assert 0.0 <= row["eval/personal/gen/exact_match"] <= 1.0 and "eval/personal/gen/first_char" in row
    assert rows[-1]["eval/accuracy"] > 0  # the test means something: some answers are right
    # each scored client's own model generated on its local split: pooled, exact match equals teacher forcing there
    import csv

    table = list(csv.DictReader(open(tmp_path / "run" / "personalized.csv")))
    assert len(table) == 4
    n = sum(int(r["num_local_test"]) for r in table)
    right = sum(float(r["personal_accuracy"]) * int(r["num_local_test"]) for r in table)
    assert rows[-1]["eval/personal/gen/same"] == pytest.approx(right / n, abs=F64)
