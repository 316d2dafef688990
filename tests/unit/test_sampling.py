"""Client sampling (uniform, size-weighted), availability and dropout: seeded, and what they promise."""

import json

import numpy as np
import pytest
from tolerances import F64

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario
from fedsim.sampling import available_clients, dropped_out, sample_clients


def test_uniform_sampling_is_seeded_distinct_and_sorted():
    a = sample_clients(1000, 100, seed=3, server_round=7)
    assert a == sample_clients(1000, 100, seed=3, server_round=7) and a == sorted(set(a)) and len(a) == 100
    assert a != sample_clients(1000, 100, seed=3, server_round=8)


def test_size_weighted_sampling_prefers_large_clients():
    sizes = np.array([1] * 50 + [20] * 50)
    counts = np.zeros(100)
    for r in range(1, 201):
        counts[sample_clients(100, 10, 0, r, sizes=sizes)] += 1
    assert counts[50:].sum() > 8 * counts[:50].sum()  # ∝ size: 20× per client, less the without-replacement cap
    uniform = np.zeros(100)
    for r in range(1, 201):
        uniform[sample_clients(100, 10, 0, r)] += 1
    assert 0.7 < uniform[50:].sum() / uniform[:50].sum() < 1.4


def test_availability_limits_the_pool_and_can_leave_it_short():
    pool = available_clients(10_000, 0.3, 0, 1)
    assert 2700 < len(pool) < 3300
    picked = sample_clients(10_000, 100, 0, 1, availability=0.3)
    assert set(picked) <= set(pool.tolist()) and len(picked) == 100
    few = sample_clients(20, 10, 0, 1, availability=0.1)  # fewer reachable than requested: all of them
    assert set(few) == set(available_clients(20, 0.1, 0, 1).tolist()) and len(few) < 10


def test_dropout_is_per_client_and_seeded():
    gone = dropped_out(range(1000), 0.2, 0, 1)
    assert 150 < len(gone) < 250 and gone == dropped_out(range(1000), 0.2, 0, 1)
    assert dropped_out(range(1000), 0.0, 0, 1) == set()


def test_dropouts_and_unavailable_clients_in_a_run(tiny_raw, tmp_path):
    tiny_raw.update(rounds=4)
    tiny_raw["clients"].update(sampling="size", availability=0.5, dropout=0.5, per_round=4)
    tiny_raw["resources"]["max_failed_rounds"] = 1  # simulated absences never count as failing rounds
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert sum(row["clients/dropped"] for row in rows) >= 1
    for row in rows:
        assert row["clients/succeeded"] + row["clients/failed"] == row["clients/sampled"] <= 4
        dropped = [f for f in row.get("clients/failures", []) if "dropped out" in f]
        assert len(dropped) == row["clients/dropped"]
        assert len(row["comm/per_client"]) == row["clients/sampled"]  # dropped clients still downloaded


def test_simulated_clock_and_round_deadline(tiny_raw, tmp_path):
    """Two speed tiers; 2-bit clients twice as fast; a deadline between the tiers drops exactly the slow clients."""
    from fedsim.driver import prepare

    tiny_raw.update(rounds=3)
    tiny_raw["clients"].update(per_round=6, quant={"tiers": [{"fraction": 0.5, "bits": 2}, {"fraction": 0.5,
                                                                                              "bits": 32}],
                                                   "group_size": 32})
    tiny_raw["training"]["local_steps"] = 3
    clock = {"tiers": [{"fraction": 0.5, "steps_per_s": 10.0}, {"fraction": 0.5, "steps_per_s": 0.5}],
             "by_bits": {2: 2.0}, "down_mbps": 1000.0, "up_mbps": 1000.0, "latency_s": 0.0}
    tiny_raw["clock"] = clock
    sc = scenario_from_dict(tiny_raw)
    speeds = {c.client_id: c.speed for c in prepare(sc).clients}
    assert set(speeds.values()) <= {10.0, 20.0, 0.5, 1.0} and len(set(speeds.values())) >= 3
    run_scenario(sc, tmp_path / "free")
    free = [json.loads(x) for x in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()][1:]
    total = 0.0
    for row in free:  # the slowest sampled client sets the round's time: 3 steps at its speed plus transfers
        slowest = min(speeds[int(c)] for c in row["comm/per_client"])
        assert 3 / slowest <= row["time/sim_round_s"] < 3 / slowest + 0.01
        total += row["time/sim_round_s"]
        assert row["time/sim_total_s"] == total and row["clients/late"] == 0
    tiny_raw["clock"] = {**clock, "deadline_s": 2.0}  # 3 steps: fast tiers 0.15–0.3 s, slow ones 3–6 s
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "deadline")
    rows = [json.loads(x) for x in (tmp_path / "deadline" / "metrics.jsonl").read_text().splitlines()][1:]
    for row in rows:
        slow = {int(c) for c in row["comm/per_client"] if speeds[int(c)] < 2}
        late = {int(f.split(":")[0]) for f in row.get("clients/failures", []) if "deadline" in f}
        assert late == slow and row["clients/late"] == len(slow)
        if slow:
            assert row["time/sim_round_s"] == 2.0  # the round waits until the deadline, not for the stragglers
        assert row["clients/succeeded"] == row["clients/sampled"] - len(slow)
    assert any(row["clients/late"] for row in rows)


def test_a_speed_tier_brings_its_own_links(tiny_raw, tmp_path):
    """A tier's down_mbps / up_mbps replace the clock's for its clients: each client's simulated time is its steps at
    its speed plus its own bytes over its own links (bandwidth tiers), the round the slowest of them."""
    from fedsim.driver import prepare

    tiny_raw.update(rounds=1)
    tiny_raw["clients"].update(per_round=8)
    tiny_raw["clock"] = {"tiers": [{"fraction": 0.5, "steps_per_s": 100.0},
                                   {"fraction": 0.5, "steps_per_s": 100.0, "down_mbps": 0.01, "up_mbps": 0.002}],
                         "down_mbps": 100.0, "up_mbps": 50.0, "latency_s": 0.0}
    sc = scenario_from_dict(tiny_raw)
    clients = prepare(sc).clients
    assert sorted({c.links for c in clients}) == [(0.01, 0.002), (100.0, 50.0)]
    run_scenario(sc, tmp_path / "run")
    row = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    times = [3 / 100 + 8 * down / (clients[int(c)].links[0] * 1e6) + 8 * up / (clients[int(c)].links[1] * 1e6)
             for c, (_, up, _, down) in row["comm/per_client"].items()]
    assert row["time/sim_round_s"] == pytest.approx(max(times), rel=F64)  # the same float64 arithmetic
    assert max(times) > 10 * min(times)


def test_ten_thousand_registered_clients_partition_sample_and_track(tiny_raw, tmp_path):
    """10,000 registered clients, 5 sampled: the run trains only those, and personalized evaluation scores a fixed
    subset (eval.local_clients) rather than every registered client."""
    import csv

    tiny_raw.update(rounds=2, strategy={"name": "fedsa"})
    tiny_raw["data"]["synthetic"]["num_train"] = 30_000
    tiny_raw["partition"] = {"method": "iid", "min_samples": 2}
    tiny_raw["clients"].update(num_clients=10_000, per_round=5, state_budget_mb=0.01)
    tiny_raw["training"]["local_steps"] = 1
    tiny_raw["eval"].update(local_test_fraction=0.34, local_clients=50, at_start=False)
    summary = run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients/sampled"] for r in rows] == [5, 5]
    assert sum(w["num_clients"] for w in summary["workers"]) == 10
    with open(tmp_path / "run" / "personalized.csv") as f:
        assert len(list(csv.DictReader(f))) == 50
    with open(tmp_path / "run" / "clients.csv") as f:
        assert len(list(csv.DictReader(f))) == 10_000
