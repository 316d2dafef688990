"""Fault injection (a testing aid driven by the scenario): dead workers are replaced and their clients retried, hung
clients time out, corrupt updates are rejected, and the round aggregates the survivors."""

import json

import pytest

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario
from fedsim.errors import ScenarioError

pytestmark = pytest.mark.usefixtures("ray_session")


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_killed_workers_nan_updates_and_hangs(tiny_raw, tmp_path):
    tiny_raw.update(rounds=2)
    tiny_raw["clients"]["per_round"] = 4
    tiny_raw["faults"] = {"kill_worker_prob": 0.25, "nan_update_prob": 0.25, "hang_prob": 0.15, "hang_s": 120}
    tiny_raw["resources"].update(backend="ray", max_retries=1, client_timeout_s=5)
    tiny_raw["eval"]["at_start"] = False
    summary = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    rows = _rows(tmp_path / "run")
    reasons = [r for row in rows for r in row.get("clients/failures", [])]
    assert sum(row["workers/replaced"] for row in rows) >= 1
    assert any("NaN or Inf" in r for r in reasons), reasons
    for row in rows:  # every sampled client is accounted for: succeeded or failed with a reason
        assert row["clients/succeeded"] + row["clients/failed"] == row["clients/sampled"] == 4
        assert len(row.get("clients/failures", [])) == row["clients/failed"]
    assert sum(row["clients/succeeded"] for row in rows) >= 1
    assert summary["final/eval/accuracy"] is not None
    # the pool never shrank: both worker slots are alive at the end
    assert len(summary["workers"]) == 2


def test_retries_recover_exactly_the_clients_that_can_be_recovered(tiny_raw, tmp_path):
    """Kills are drawn per (seed, round, client, attempt): a client fails only if all its attempts draw a kill."""
    import numpy as np

    p, retries = 0.3, 2
    tiny_raw.update(rounds=2)
    tiny_raw["clients"]["per_round"] = 4
    tiny_raw["faults"] = {"kill_worker_prob": p}
    tiny_raw["resources"].update(backend="ray", max_retries=retries)
    tiny_raw["eval"]["at_start"] = False
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert sum(row["workers/replaced"] for row in rows) >= 1
    for row in rows:
        sampled = [int(c) for c in row["comm/per_client"]]
        doomed = {c for c in sampled if all(
            np.random.default_rng([tiny_raw["seed"], row["round"], c, a, 13]).random(3)[0] < p
            for a in range(1, retries + 2))}
        failed = {int(f.split(":")[0]) for f in row.get("clients/failures", [])}
        assert failed == doomed, (row["round"], failed, doomed)
        assert all(f"after {retries + 1} attempts" in f for f in row.get("clients/failures", []))


def test_timeout_cancels_a_hanging_client(tiny_raw, tmp_path):
    tiny_raw.update(rounds=1)
    tiny_raw["clients"]["per_round"] = 1  # each hung client costs its worker a replacement
    tiny_raw["faults"] = {"hang_prob": 1.0, "hang_s": 300}
    tiny_raw["resources"].update(backend="ray", max_retries=0, client_timeout_s=3)
    tiny_raw["eval"]["at_start"] = False
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    row = _rows(tmp_path / "run")[-1]
    assert row["clients/failed"] == 1 and row["clients/succeeded"] == 0
    assert all("timed out after 3s" in r for r in row["clients/failures"])
    assert "unchanged" in row["note"]


def test_kill_faults_need_ray(tiny_raw):
    tiny_raw["faults"] = {"kill_worker_prob": 0.1}
    with pytest.raises(ScenarioError, match="Ray backend"):
        scenario_from_dict(tiny_raw)


def test_a_killed_server_actor_is_named_and_the_run_resumes(tiny_raw, tmp_path):
    import ray

    from fedsim.driver import Driver, resume_run
    from fedsim.errors import BackendError
    from fedsim.runtime.ray.backend import RayBackend

    class KillServerInRound2(RayBackend):
        calls = 0

        def train(self, jobs, on_done=None):
            KillServerInRound2.calls += 1
            if KillServerInRound2.calls == 2:
                ray.kill(self.server_actor, no_restart=True)
            return super().train(jobs, on_done=on_done)

    tiny_raw.update(rounds=3)
    tiny_raw["resources"].update(backend="ray", server={"num_cpus": 0.5})  # a server actor of its own
    out = tmp_path / "run"
    with pytest.raises(BackendError) as e:
        Driver(scenario_from_dict(tiny_raw), out, KillServerInRound2()).run()
    msg = str(e.value)
    assert "server actor died" in msg and "checkpoint of round 1 is intact" in msg
    assert f"fedsim run --resume {out}" in msg
    assert [r["round"] for r in _rows(out)] == [0, 1]
    summary = resume_run(out)
    assert [r["round"] for r in _rows(out)] == [0, 1, 2, 3] and summary["final/eval/accuracy"] is not None
