"""TensorBoard and MLflow beside W&B (#48 point 1), read back with each library's own reader — TensorBoard's event
accumulator, MLflow's client and search_runs: every round's numbers at its step, once, across a resume; the images,
the scenario, the tables, the adapter and the summary."""

from __future__ import annotations

import json

import pytest

from fedsim import checkpoint
from fedsim.config import scenario_from_dict
from fedsim.driver import resume_run, run_scenario
from fedsim.errors import FedsimError


def test_tensorboard_and_mlflow_record_a_resumed_run_once(tiny_raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default store: ./mlruns
    tiny_raw["logging"].update(plots=True, tensorboard=True, mlflow=True)
    real = checkpoint.save

    def interrupted(run_dir, server_round, *a, **k):
        if server_round == 2:  # round 2 is logged, its checkpoint never written: it runs again after the resume
            raise KeyboardInterrupt
        return real(run_dir, server_round, *a, **k)

    monkeypatch.setattr(checkpoint, "save", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_scenario(scenario_from_dict(tiny_raw, ["rounds=3"]), out)
    monkeypatch.setattr(checkpoint, "save", real)
    resume_run(out)
    rows = {r["round"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [0, 1, 2, 3]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    accuracy = events.Scalars("eval/accuracy")
    assert [e.step for e in accuracy] == [0, 1, 2, 3]  # no step twice: the re-run round 2's first events purged
    assert [e.value for e in accuracy] == pytest.approx([rows[s]["eval/accuracy"] for s in range(4)])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert {"partition", "curves"} <= set(events.Tags()["images"])
    assert "scenario/text_summary" in events.Tags()["tensors"]
    assert "_hparams_/session_start_info" in events.summary_metadata  # the scenario's numbers as hparams

    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["fedsim"])
    assert len(runs) == 1  # the resume continued the same MLflow run
    run = runs.iloc[0]
    assert run["params.strategy.name"] == "fedit" and run["params.rounds"] == "3" and run["status"] == "FINISHED"
    client = MlflowClient()
    history = client.get_metric_history(run["run_id"], "eval/accuracy")
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in history] == pytest.approx([rows[s]["eval/accuracy"] for s in range(4)])
    summary = json.loads((out / "summary.json").read_text())
    assert run["metrics.final/eval/accuracy"] == pytest.approx(summary["final/eval/accuracy"])
    names = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"model", "images", "tables", "summary.json"} <= names
    assert {a.path for a in client.list_artifacts(run["run_id"], "model")} >= {"model/adapter_config.json",
                                                                                "model/adapter_model.safetensors"}
    assert {a.path for a in client.list_artifacts(run["run_id"], "images")} == {"images/partition.png",
                                                                                 "images/curves.png"}
    clients = mlflow.artifacts.load_dict(f"runs:/{run['run_id']}/tables/clients.json")
    assert [c["client_id"] for c in clients] == list(range(tiny_raw["clients"]["num_clients"]))


def test_a_tracker_that_cannot_start_is_one_line_before_round_1(tiny_raw, tmp_path):
    tiny_raw["logging"]["mlflow"] = {"tracking_uri": "bogus-scheme://nowhere"}
    with pytest.raises(FedsimError) as e:
        run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    message = str(e.value)
    assert message.startswith("MLflow could not start at 'bogus-scheme://nowhere'") and "\n" not in message
    assert not (tmp_path / "run" / "summary.json").exists()
    assert scenario_from_dict({**tiny_raw, "logging": {"tensorboard": True, "mlflow": False}}).logging.mlflow is None
