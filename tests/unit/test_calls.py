"""Several clients per worker call (resources.clients_per_call): the calls' sizes, and each client's numbers being its
own whichever call it is in."""

from dataclasses import replace

import pytest
import torch

from fedsim.config import scenario_from_dict
from fedsim.errors import ScenarioError
from fedsim.federation.prepare import prepare
from fedsim.runtime.ray.backend import RayBackend
from fedsim.runtime.ray.dispatch import CALL_BYTES, CALL_TARGET_S, auto_call_cap, call_size
from fedsim.runtime.worker import Worker
from fedsim.strategies import make_strategy
from fedsim.types import ClientFailure, ClientJob, RoundContext


def _sizes(n: int, workers: int, cap: int) -> list[int]:
    out = []
    while n:
        out.append(call_size(n, workers, cap))
        n -= out[-1]
    return out


def test_calls_are_long_early_and_single_clients_at_the_end():
    assert _sizes(40, 2, 64) == [10, 8, 6, 4, 3, 3, 2, 1, 1, 1, 1]
    assert _sizes(40, 2, 4) == [4] * 7 + [3, 3, 2, 1, 1, 1, 1]  # at most the cap
    assert _sizes(3, 2, 64) == [1, 1, 1]  # fewer clients than workers can share: one each
    assert _sizes(5, 1, 1) == [1] * 5
    assert sum(_sizes(1000, 7, 50)) == 1000


def test_auto_cap_from_the_last_rounds_clients():
    assert auto_call_cap(None, None) == 1  # the first round: nothing measured yet
    assert auto_call_cap(0.1, 30_000.0) == int(CALL_TARGET_S / 0.1)  # short clients: calls of ~CALL_TARGET_S
    assert auto_call_cap(2.0, 30_000.0) == 1  # long clients: one per call
    assert auto_call_cap(0.001, 50 * 2**20) == CALL_BYTES // (50 * 2**20)  # a call's updates stay within CALL_BYTES
    assert auto_call_cap(0.001, 500 * 2**20) == 1


def test_backend_cap_follows_the_setting_and_faults(tiny_raw):
    b = RayBackend()
    b.resources = scenario_from_dict(tiny_raw).resources
    assert b.clients_per_call() == 1  # auto, before any round
    b.last_client = (0.05, 1000.0)
    assert b.clients_per_call() == 10
    b.faulty = True  # injected kills or hangs: one client per call
    assert b.clients_per_call() == 1
    b.resources = scenario_from_dict(tiny_raw, ["resources.clients_per_call=3"]).resources
    assert b.clients_per_call() == 3


def test_bad_settings_are_refused(tiny_raw):
    with pytest.raises(ScenarioError, match="clients_per_call must be between 1 and"):
        scenario_from_dict(tiny_raw, ["resources.clients_per_call=0"])
    with pytest.raises(ScenarioError, match="a pack is already one call"):
        scenario_from_dict(tiny_raw, ["resources.clients_per_call=4", "resources.clients_per_pass=2"])
    with pytest.raises(ScenarioError, match="one client's draw would lose or hold every client of its call"):
        scenario_from_dict(tiny_raw, ["resources.backend=ray", "resources.clients_per_call=4",
                                      "faults.kill_worker_prob=0.1"])
    scenario_from_dict(tiny_raw, ["resources.backend=ray", "faults.kill_worker_prob=0.1"])  # auto: fine


def test_a_call_of_several_clients_gives_each_its_own_numbers_and_fails_one_alone(tiny_raw):
    sc = scenario_from_dict(tiny_raw)
    prep = prepare(sc)
    strategy = make_strategy(sc.strategy.name, sc.strategy.params)
    clients = prep.clients[:3]
    payloads = strategy.configure(RoundContext(1, 3, sc.seed), strategy.init_state(prep.spec), clients)
    items = [(ClientJob(c, prep.parts[c.client_id], 1), payloads[c.client_id]) for c in clients]
    broken = (items[1][0], replace(items[1][1], procedure="no-such-procedure"))
    worker = Worker(sc, prep.data)
    out = worker.run_clients(iter([items[0], broken, items[2]]))
    alone = [worker.run_client(j, p) for j, p in items]  # one call each
    assert isinstance(out[1], ClientFailure) and "no-such-procedure" in out[1].reason
    for i in (0, 2):
        (r1, u1), (r2, u2) = alone[i], out[i]
        assert r2.client_id == r1.client_id and r2.metrics["engine/clients_per_call"] == 3.0
        assert r1.metrics["engine/clients_per_call"] == 1.0
        assert r2.metrics["train/loss"] == r1.metrics["train/loss"]
        for k in u1.tensors:
            assert torch.equal(u1.tensors[k], u2.tensors[k]), k
    assert worker.stats()["num_calls"] == 4 and worker.stats()["num_clients"] == 5
