"""Classification metrics (macro-F1, Matthews' correlation) from confusion counts: additive across batches, equal to
scikit-learn's over the whole set, and reported from a scenario's eval.metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import news_data
from tolerances import F64

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
    assert out["eval/macro_f1"] == pytest.approx(f1_score(label, predicted, average="macro", zero_division=0), abs=F64)
    assert out["eval/mcc"] == pytest.approx(matthews_corrcoef(label, predicted), abs=F64)
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


def test_macro_f1_and_mcc_per_task_equal_scikit_learn_on_each_tasks_rows():
    """With a task field: ``eval/task/<task>/mcc`` and ``/macro_f1`` are the metric over that task's rows alone (CoLA's
    MCC in a multi-task run), from additive counts whatever the batches; rows of no task count only overall."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    rng = np.random.default_rng(3)
    n = 240
    label, tasks = rng.integers(0, 2, n), rng.integers(-1, 3, n)
    predicted = np.where(rng.random(n) < 0.7, label, 1 - label)
    metrics = default_metrics(("macro_f1", "mcc"))

    def outputs(a, b):
        o = _outputs(label[a:b], predicted[a:b])
        o.tasks, o.task_names = tasks[a:b], ["cola", "mr", "subj"]
        return o

    parts = [{k: v for m in metrics for k, v in m.sums(outputs(a, b)).items()} for a, b in ((0, 50), (50, 199), (199, n))]
    out = reduce_eval(parts, metrics)
    for t, name in enumerate(["cola", "mr", "subj"]):
        sel = tasks == t
        assert out[f"eval/task/{name}/mcc"] == pytest.approx(matthews_corrcoef(label[sel], predicted[sel]), abs=F64)
        assert out[f"eval/task/{name}/macro_f1"] == pytest.approx(
            f1_score(label[sel], predicted[sel], average="macro", zero_division=0), abs=F64)
    assert out["eval/mcc"] == pytest.approx(matthews_corrcoef(label, predicted), abs=F64)


def test_personalized_rows_carry_each_clients_mcc():
    """Each client's row of the personalized table has the MCC and macro-F1 of its local test split (global adapter
    alone and its own model), and the summary their mean over clients."""
    from sklearn.metrics import matthews_corrcoef

    from fedsim.eval.personal import personal_metrics

    metrics = default_metrics(("macro_f1", "mcc"))
    rng = np.random.default_rng(0)
    per_client, want = {}, {}
    for c in range(3):
        label = rng.integers(0, 2, 40)
        own = np.where(rng.random(40) < 0.8, label, 1 - label)
        alone = np.where(rng.random(40) < 0.5, label, 1 - label)
        sums = [{k: v for m in metrics for k, v in m.sums(_outputs(label, p)).items()} for p in (alone, own)]
        per_client[c] = tuple({**s, "loss_sum": 1.0, "tokens": 40.0} for s in sums)
        want[c] = (matthews_corrcoef(label, alone), matthews_corrcoef(label, own))
    out, table = personal_metrics(per_client)
    for row in table:
        assert row["global_mcc"] == pytest.approx(want[row["client_id"]][0], abs=F64)
        assert row["personal_mcc"] == pytest.approx(want[row["client_id"]][1], abs=F64)
    assert out["eval/personal/mcc"] == pytest.approx(np.mean([w[1] for w in want.values()]), abs=F64)
    assert "personal_mcc" not in personal_metrics({0: ({"correct": 1.0, "count": 2.0, "loss_sum": 1.0, "tokens": 2.0},
                                                       {"correct": 1.0, "count": 2.0, "loss_sum": 1.0,
                                                        "tokens": 2.0})})[1][0]
