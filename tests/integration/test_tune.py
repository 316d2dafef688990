"""fedsim tune (#48 point 2): a small Ray Tune search end to end on the local Ray — trials as fedsim runs on the Ray
backend inside their placement groups, ASHA stopping the worse ones by round, the table and the best scenario, a
resume that keeps what finished; and a bad space refused before any trial."""

from __future__ import annotations

import csv

import pytest
import yaml

from fedsim.config import load_scenario
from fedsim.errors import ScenarioError
from fedsim.tune import run_tune


@pytest.fixture
def search(tiny_raw, tmp_path):
    tiny_raw["resources"]["backend"] = "ray"
    tiny_raw["rounds"] = 2
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(tiny_raw))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"space": {"training.lr": {"loguniform": [1e-3, 2e-2]},
                                               "clients.lora.rank": {"choice": [2, 4]}},
                                     "metric": "eval/loss", "mode": "min", "samples": 3, "concurrent": 1,
                                     "asha": {"grace_period": 1, "reduction_factor": 2, "max_t": 2}}))
    return scenario, space


@pytest.mark.usefixtures("ray_session")
def test_a_search_runs_stops_the_worse_trials_and_resumes(search, tmp_path):
    scenario, space = search
    out = tmp_path / "search"
    best = run_tune(scenario, space, out=out)
    rows = list(csv.DictReader(open(out / "tune.csv")))
    assert len(rows) == 3 and not any(r["error"] for r in rows)
    losses = [float(r["best eval/loss"]) for r in rows]
    assert losses == sorted(losses) and best["best eval/loss"] == pytest.approx(losses[0])  # best first
    for r in rows:  # each trial a fedsim run of its sampled keys; ASHA stopped one before its last round, or none ran
        run = load_scenario(f"{r['run_dir']}/scenario.yaml")
        assert run.training.lr == pytest.approx(float(r["training.lr"]))
        assert run.clients.lora.rank == int(r["clients.lora.rank"])
        assert (r["stopped_early"] == "True") == (int(r["rounds"]) < 2)
    assert any(r["stopped_early"] == "True" for r in rows)  # sequential trials: the later ones meet the milestones
    chosen = load_scenario(out / "best.yaml")
    assert chosen.training.lr == pytest.approx(float(rows[0]["training.lr"]))
    trials = sorted(p.name for p in (out / "trials").iterdir())
    again = run_tune(scenario, space, out=out, resume=True)  # finished: nothing runs again
    assert again["trial"] == best["trial"] and sorted(p.name for p in (out / "trials").iterdir()) == trials
    with pytest.raises(ScenarioError, match="holds a search already"):
        run_tune(scenario, space, out=out)


def test_a_space_that_does_not_fit_is_refused_before_any_trial(search, tmp_path):
    scenario, space = search
    spec = yaml.safe_load(space.read_text())
    for bad, says in (({"training.nope": {"choice": [1]}}, "training.nope"),
                      ({"clients.lora.rank": {"choice": [4, -1]}}, "clients.lora.rank = -1"),
                      ({"training.lr": {"loguniform": [0, 1]}}, "loguniform takes"),
                      ({"training.lr": {"normal": [0, 1]}}, "give one distribution")):
        space.write_text(yaml.safe_dump({**spec, "space": bad}))
        with pytest.raises(ScenarioError, match=says):
            run_tune(scenario, space, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()
