"""Fault injection (a testing aid driven by the scenario): dead workers are replaced and their clients retried, hung
clients time out, corrupt updates are rejected, and the round aggregates the survivors."""

import json

import pytest
import torch
from tolerances import F32_NETWORK

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario
from fedsim.errors import ScenarioError

pytestmark = pytest.mark.usefixtures("ray_session")


def _rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def _first_round(tiny_raw, seed: int) -> list:
    """Round 1's sampled clients and each one's fault draws on attempts 1..3: [(client, [(kill, nan, hang)])]."""
    from fedsim.pipeline.transforms import fault_draws
    from fedsim.sampling import sample_clients

    c = tiny_raw["clients"]
    return [(cid, [fault_draws(seed, 1, cid, a) for a in (1, 2, 3)])
            for cid in sample_clients(c["num_clients"], c["per_round"], seed, 1)]


def test_killed_workers_nan_updates_and_hangs(tiny_raw, tmp_path):
    """One round whose seed makes a client's first attempt kill its worker, another hang, another send NaN, and
    another train cleanly (found from the faults' own draws: one round is enough)."""
    kill, nan, hang = 0.25, 0.25, 0.15
    tiny_raw["clients"]["per_round"] = 4

    def fits(seed):
        first = [d[0] for _, d in _first_round(tiny_raw, seed)]
        return (any(u[0] < kill for u in first) and any(u[2] < hang and u[0] >= kill for u in first)
                and any(u[1] < nan and u[0] >= kill and u[2] >= hang for u in first)
                and any(min(u[0] / kill, u[1] / nan, u[2] / hang) >= 1 for u in first))

    tiny_raw.update(rounds=1, seed=next(s for s in range(1000) if fits(s)))
    # a hang is a hang (an hour), the timeout generous against a client's work: a tiny-model client trains in well
    # under a second on a quiet machine and a replacement worker starts in a few; 30 s holds on a machine loaded 4-6
    # times over its cores, where 5 s timed every client out
    tiny_raw["faults"] = {"kill_worker_prob": kill, "nan_update_prob": nan, "hang_prob": hang, "hang_s": 3600}
    tiny_raw["resources"].update(backend="ray", max_retries=1, client_timeout_s=30)
    tiny_raw["eval"]["at_start"] = False
    summary = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    rows = _rows(tmp_path / "run")
    reasons = [r for row in rows for r in row.get("clients/failures", [])]
    assert sum(row["workers/replaced"] for row in rows) >= 2  # the kill and the hang
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

        def train(self, jobs, on_done=None, **kwargs):
            KillServerInRound2.calls += 1
            if KillServerInRound2.calls == 2:
                ray.kill(self.server_actor, no_restart=True)
            return super().train(jobs, on_done=on_done, **kwargs)

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


def _a_kill_at_the_third_client(tiny_raw):
    """(seed, kill probability) under which round 1's third client alone draws a kill, on its first attempt only."""
    from fedsim.pipeline.transforms import fault_draws
    from fedsim.sampling import sample_clients

    c = tiny_raw["clients"]
    for seed in range(1000):
        order = sample_clients(c["num_clients"], c["per_round"], seed, 1)
        first = [fault_draws(seed, 1, cid, 1)[0] for cid in order]
        p = first[2] + 1e-9
        if all(u > p for i, u in enumerate(first) if i != 2) and fault_draws(seed, 1, order[2], 2)[0] > p:
            return seed, p, order
    raise AssertionError("no seed found")


def test_a_worker_lost_with_its_partial_fails_its_clients_and_the_round_aggregates_the_rest(tiny_raw, tmp_path):
    """resources.worker_partials with one worker: it folds clients 1 and 2, dies at the start of client 3 (an
    injected kill); 1 and 2 fail with the reason, 3 is retried on the replacement, and the round's global state is
    the FedIT mean of exactly the updates of 3 and 4 — trained again here, in-process, from the same seeds."""
    from fedsim.checkpoint import load
    from fedsim.federation.prepare import prepare
    from fedsim.runtime.worker import Worker
    from fedsim.strategies import make_strategy
    from fedsim.types import ClientJob, RoundContext

    tiny_raw["clients"]["per_round"] = 4
    seed, p, order = _a_kill_at_the_third_client(tiny_raw)
    tiny_raw.update(rounds=1, seed=seed)
    tiny_raw["faults"] = {"kill_worker_prob": p}
    tiny_raw["resources"].update(backend="ray", num_workers=1, max_retries=1, worker_partials=True)
    tiny_raw["eval"].update(at_start=False, every=100)
    sc = scenario_from_dict(tiny_raw)
    run_scenario(sc, tmp_path / "run")
    row = _rows(tmp_path / "run")[-1]
    lost = {int(f.split(":")[0]) for f in row["clients/failures"] if "holding its folded update" in f}
    assert lost == set(order[:2]) and row["clients/failed"] == 2 and row["clients/succeeded"] == 2
    assert row["workers/replaced"] == 1 and row["engine/server_in_objects"] == 1.0
    _, state, _, _ = load(tmp_path / "run")

    prep = prepare(sc)
    strategy = make_strategy("fedit")
    start = strategy.init_state(prep.spec)
    ctx = RoundContext(1, 1, seed)
    payloads = strategy.configure(ctx, start, [prep.clients[c] for c in order[2:]])
    worker = Worker(sc.model_copy(update={"faults": sc.faults.model_copy(update={"kill_worker_prob": 0.0})}),
                    prep.data)
    updates = [worker.run_client(ClientJob(prep.clients[c], prep.parts[c], 1), payloads[c])[1] for c in order[2:]]
    expected = strategy.aggregate(ctx, start, updates)
    for k, v in expected.tensors.items():
        assert torch.allclose(state.tensors[k], v, rtol=F32_NETWORK, atol=F32_NETWORK), k
