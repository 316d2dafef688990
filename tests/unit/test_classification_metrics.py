"""Classification metrics (macro-F1, Matthews' correlation) from confusion counts: additive across batches, equal to
scikit-learn's over the whole set, and reported from a scenario's eval.metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import news_data

from fedsim.config import scenario_from_dict
from fedsim.errors import ScenarioError
from fedsim.eval.metrics import combine, default_metrics, reduce_eval
from fedsim.eval.outputs import EvalOutputs


def _outputs(label, predicted):
    n = len(label)
    return EvalOutputs(logp=torch.zeros(n, 1), valid=torch.ones(n, 1, dtype=torch.bool),
                       correct=torch.as_tensor(np.asarray(label) == np.asarray(predicted)), tasks=np.full(n, -1),
                       task_names=[], indices=np.arange(n), split=None, predicted=np.asarray(predicted),
                       label=np.asarray(label))


@pytest.mark.parametrize("classes, seed", [(2, 0), (4, 1), (5, 2)])
def test_macro_f1_and_mcc_equal_scikit_learn_whatever_the_batches(classes, seed):
    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, 203)
    predicted = np.where(rng.random(203) < 0.6, label, rng.integers(0, classes, 203))
    predicted[predicted == classes - 1] = 0  # a class never predicted: its F1 is 0
    metrics = default_metrics(("macro_f1", "mcc"))
    cuts = [0, 17, 90, 150, 203]  # uneven batches, as workers split them
    parts = [{k: v for m in metrics for k, v in m.sums(_outputs(label[a:b], predicted[a:b])).items()}
             for a, b in zip(cuts, cuts[1:])]
    out = reduce_eval(parts, metrics)
    assert out["eval/macro_f1"] == pytest.approx(f1_score(label, predicted, average="macro", zero_division=0), abs=1e-12)
    assert out["eval/mcc"] == pytest.approx(matthews_corrcoef(label, predicted), abs=1e-12)
    assert out["eval/accuracy"] == pytest.approx(float((label == predicted).mean()))
    assert reduce_eval(parts[::-1], metrics) == out  # sums: the order of the batches does not matter
    assert sum(v for k, v in combine(parts).items() if k.startswith("confusion/")) == 203


def test_degenerate_predictions_score_zero_correlation():
    from sklearn.metrics import matthews_corrcoef

    metrics = default_metrics(("mcc",))
    label, predicted = np.array([0, 1, 1, 0]), np.zeros(4, dtype=int)  # one class predicted throughout
    parts = [{k: v for m in metrics for k, v in m.sums(_outputs(label, predicted)).items()}]
    assert reduce_eval(parts, metrics)["eval/mcc"] == 0.0 == matthews_corrcoef(label, predicted)


def _news(tmp_path, tiny_raw):
    tiny_raw["data"] = news_data(tmp_path)
    tiny_raw["partition"] = {"method": "iid"}
    return tiny_raw


def test_a_classification_run_reports_macro_f1_and_mcc(tiny_raw, tmp_path):
    """Wired from the scenario to every evaluation row and the summary (the values' exactness is tested above)."""
    from fedsim.driver import run_scenario

    raw = _news(tmp_path, tiny_raw)
    raw.update(rounds=1)
    raw["eval"]["metrics"] = ["macro_f1", "mcc"]
    summary = run_scenario(scenario_from_dict(raw), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        assert -1.0 <= row["eval/mcc"] <= 1.0 and 0.0 <= row["eval/macro_f1"] <= 1.0
        assert row["eval/num_samples"] == 15
    assert summary["final/eval/mcc"] == rows[-1]["eval/mcc"]
    assert summary["final/eval/macro_f1"] == rows[-1]["eval/macro_f1"]


def test_eval_metrics_are_checked_by_name_and_by_format(tiny_raw, tmp_path):
    tiny_raw["eval"]["metrics"] = ["f1_macro"]
    with pytest.raises(ScenarioError, match="eval.metrics: unknown metric 'f1_macro'.*macro_f1"):
        scenario_from_dict(tiny_raw)
    tiny_raw["eval"]["metrics"] = ["mcc"]
    with pytest.raises(ScenarioError, match="metric 'mcc' needs a classification.*data.format: classification"):
        scenario_from_dict(tiny_raw)
