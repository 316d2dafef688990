"""Personalized runs end to end: two-level adapters on the Ray pool with the client state store spilling to a
chosen directory, the per-client table, and the errors a user can hit."""

import csv
import json
import subprocess
import sys

import pytest
import yaml

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario
from fedsim.errors import BackendError


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("shared_ray")
def test_pf2lora_on_ray_with_a_spilling_store_and_a_per_client_table(tiny_raw, tmp_path):
    tiny_raw.update(rounds=2, strategy={"name": "pf2lora", "params": {"personal_rank": 2}})
    tiny_raw["clients"].update(per_round=4, state_budget_mb=0.001, state_dir=str(tmp_path / "state"))
    tiny_raw["eval"]["local_test_fraction"] = 0.25
    tiny_raw["resources"]["backend"] = "ray"
    summary = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    rows = _rows(tmp_path / "run")
    last = rows[-1]
    for key in ("eval/personal/accuracy", "eval/personal/accuracy_std", "eval/personal/accuracy_worst10",
                "eval/local_global/accuracy", "eval/local_global/accuracy_worst10"):
        assert key in last and key in {k.removeprefix("final/") for k in summary}, key
    assert last["clients/failed"] == 0 and last["pf2lora/hvp_norm"] > 0
    with open(tmp_path / "run" / "personalized.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["client_id"]) for r in table] == list(range(8))  # every client, trained or not
    assert {"global_accuracy", "personal_accuracy", "num_local_test"} <= set(table[0])
    spilled = list((tmp_path / "state").glob("run-*/client_*.safetensors"))
    assert spilled, "states beyond the budget spill into clients.state_dir"
    trained = {int(c) for row in rows[1:] for c in row["comm/per_client"]}
    assert {int(p.stem.split("_")[1]) for p in spilled} <= trained


def test_an_unwritable_state_dir_is_one_clear_line(tiny_raw, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    tiny_raw.update(strategy={"name": "feddpa"})
    tiny_raw["eval"]["local_test_fraction"] = 0.25
    tiny_raw["clients"]["state_dir"] = str(blocker / "state")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    r = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", str(path), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "clients.state_dir" in r.stderr and "writable" in r.stderr


def test_a_run_whose_clients_all_keep_failing_stops_with_the_reason(tiny_raw, tmp_path):
    tiny_raw.update(rounds=5)
    tiny_raw["faults"] = {"nan_update_prob": 1.0}
    tiny_raw["resources"]["max_failed_rounds"] = 2
    with pytest.raises(BackendError, match=r"every sampled client failed in 2 consecutive rounds.*NaN or Inf"):
        run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    assert [row["round"] for row in _rows(tmp_path / "run")] == [0, 1, 2]  # what ran is kept


def test_feddpa_d_from_a_scenario_file(tiny_raw, tmp_path):
    """FedDPA-D end to end: the instance-wise weights are computed at every personalized evaluation and reported."""
    tiny_raw.update(rounds=2, strategy={"name": "feddpa", "params": {"inference": "dynamic", "instances": 3}})
    tiny_raw["eval"]["local_test_fraction"] = 0.25
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    last = _rows(tmp_path / "run")[-1]
    assert 0.0 < last["eval/personal/dynamic_weight"] <= 0.5
    with open(tmp_path / "run" / "personalized.csv") as f:
        table = list(csv.DictReader(f))
    assert all(0.0 < float(r["dynamic_weight"]) <= 0.5 for r in table)
