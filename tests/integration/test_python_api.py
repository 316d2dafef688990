"""The Python API (#28 point 3): fedsim.run with overrides and callbacks, early stopping from a callback, and the
example script in examples/ as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fedsim
from fedsim.config import scenario_from_dict

ROOT = Path(__file__).resolve().parents[2]


def test_run_takes_a_path_a_mapping_or_a_scenario_and_a_callback_stops_it(tiny_raw, tmp_path):
    seen = []

    class StopAtTwo(fedsim.RoundCallback):
        def on_round_end(self, server_round, row):
            seen.append(server_round)
            if server_round == 2:
                raise fedsim.StopRun("enough")

        def on_run_end(self, summary):
            seen.append("end")

    summary, run_dir = fedsim.run(tiny_raw, overrides=["rounds=4"], callbacks=[StopAtTwo()], out=tmp_path / "a")
    assert seen == [0, 1, 2, "end"] and run_dir == tmp_path / "a"
    assert summary["stopped"] == {"round": 2, "reason": "enough"} and summary["rounds"] == 4
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert (run_dir / "checkpoint").is_dir() and (run_dir / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["stopped"]["round"] == 2
    # the stopped run's checkpoint is round 2's: a resume continues with round 3
    from fedsim import checkpoint

    assert checkpoint.last_round(run_dir) == 2
    sc = scenario_from_dict(tiny_raw, ["rounds=1"])
    summary, _ = fedsim.run(sc, overrides=["eval.at_start=false"], out=tmp_path / "b")
    assert "stopped" not in summary and summary["initial/eval/accuracy"] is None
    with pytest.raises(fedsim.ScenarioError, match="rounds"):
        fedsim.run(tiny_raw, overrides=["rounds=0"], out=tmp_path / "c")


def test_the_example_script_runs_as_a_user_runs_it(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "early_stopping.py"), "rounds=4", "seed=3",
                        "clients.num_clients=6", "clients.per_round=3", "training.local_steps=2",
                        "data.synthetic.num_train=120", "data.synthetic.num_test=40",
                        "model.tiny.num_layers=1", "logging.wandb.mode=disabled", "logging.console=false",
                        "training.lr=1e-12", "name=example"],  # accuracy cannot improve: it stops
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "round 0: accuracy" in r.stdout and "stopped after round 2: accuracy has not improved" in r.stdout
    assert (tmp_path / "runs" / "example" / "summary.json").is_file()
