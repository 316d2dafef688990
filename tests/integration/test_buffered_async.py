"""Buffered asynchronous aggregation (``asynchronous``; FedBuff): the server step against its formula, the schedule
on the simulated clock, both backends, an exact resume with clients in flight, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from stopping import StopAt
from tolerances import F32_ALGEBRA, F32_NETWORK

from fedsim.config import scenario_from_dict
from fedsim.driver import resume_run, run_scenario

SLOW = {"tiers": [{"fraction": 0.75, "steps_per_s": 20.0}, {"fraction": 0.25, "steps_per_s": 2.0}]}


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _async(raw: dict, **cfg) -> dict:
    raw.update(rounds=5, clock=SLOW, asynchronous={"concurrency": 4, "buffer": 2, **cfg})
    raw["clients"] = {**raw["clients"], "num_clients": 8}
    return raw


@pytest.mark.parametrize("name", ["fedit", "ffa"])
def test_a_server_step_is_fedbuffs_formula(name):
    """x ← x + η (1/K') Σ w(s_i) (x_i − x_{v_i}): updates of clients started at versions 0 and 1, aggregated at
    step 3 (version 2), equal the formula in float64 to float32 rounding (F32_ALGEBRA, Frobenius); the kept versions are pruned to the live
    ones and the new one."""
    from fedsim.pipeline.asynchronous import BufferedAsync
    from fedsim.server import Server
    from fedsim.strategies import StrategySpec
    from fedsim.types import AsyncStep, ClientSpec, ClientUpdate, LoraSpec, ModuleShape, RoundContext

    spec = StrategySpec({"m.q_proj": ModuleShape(6, 5), "m.v_proj": ModuleShape(6, 7)}, LoraSpec(2, 4.0), seed=0)
    stage = BufferedAsync(0.7, lambda s: (1 + s) ** -0.5)
    server = Server(name, {}, spec, stages=[stage])
    g = torch.Generator().manual_seed(0)
    clients = [ClientSpec(i, 10 + i, LoraSpec(2, 4.0)) for i in range(3)]

    def trained(payload_tensors, cid):
        upd = {k: v + torch.randn(v.shape, generator=g) for k, v in payload_tensors.items()
               if server.strategy.is_shared(k)}
        return ClientUpdate(cid, 10 + cid, LoraSpec(2, 4.0), upd)

    versions, updates = {}, {}
    for r in (1, 2, 3):  # a client starts in each of the first three steps; steps 1 and 2 aggregate nobody
        payloads, _ = server.configure(RoundContext(r, 5, 0), [clients[r - 1]])
        versions[r - 1] = dict(server.state.tensors)
        updates[r - 1] = trained(payloads[r - 1].tensors, r - 1)
        if r < 3:
            ctx = RoundContext(r, 5, 0, AsyncStep((), live=tuple(range(r))))
            server.aggregate(ctx, [])  # an idle step: the state stays, the version moves on
            server.state = type(server.state)(**{**server.state.__dict__, "tensors": {
                k: v + 0.1 * (r + 1) for k, v in server.state.tensors.items()}})  # a stand-in for other clients' steps
    before = dict(server.state.tensors)
    starts = ((0, 0), (1, 1))  # clients 0 and 1 arrive at step 3, 2 and 1 versions stale
    server.aggregate(RoundContext(3, 5, 0, AsyncStep(starts, live=(2,))), [updates[0], updates[1]])
    for k in updates[0].tensors:
        step = sum(0.7 * (1 + 2 - v) ** -0.5 * (updates[c].tensors[k].double() - versions[v][k].double())
                   for c, v in starts) / 2
        want = before[k].double() + step
        assert float((server.state.tensors[k].double() - want).norm() / want.norm()) <= F32_ALGEBRA, k
    assert sorted(stage.kept) == [2, 3] and stage.version == 3


def test_a_run_steps_every_k_arrivals_on_the_simulated_clock(tiny_raw, tmp_path):
    """Every step takes K = 2 arrivals; slow clients arrive stale; the simulated clock moves forward; the clients
    that start fill the slots (4 at first, then one per arrival)."""
    out = tmp_path / "run"
    summary = run_scenario(scenario_from_dict(_async(tiny_raw)), out)
    rows = [r for r in _rows(out) if r["round"] >= 1]
    assert len(rows) == 5 and summary["final/eval/loss"] < _rows(out)[0]["eval/loss"]
    assert [r["clients/sampled"] for r in rows] == [5, 2, 2, 2, 2]
    for r in rows:
        assert r["clients/succeeded"] + r["clients/failed"] == 2
        moved = list(r["comm/per_client"].values())  # those that started in the step and those that arrived
        assert sum(m[1] for m in moved) == r["comm/up_bytes"] and sum(m[3] for m in moved) == r["comm/down_bytes"]
        assert 0 <= r["async/staleness_mean"] <= r["async/staleness_max"]
        assert 0 < r["async/weight_mean"] <= 1
    assert max(r["async/staleness_max"] for r in rows) >= 1
    totals = [r["time/sim_total_s"] for r in rows]
    assert totals == sorted(totals) and totals[-1] > 0


@pytest.mark.usefixtures("shared_ray")
def test_ray_with_packed_clients_and_compressed_uploads_equals_the_local_backend(tiny_raw, tmp_path):
    raw = _async(tiny_raw, staleness="hinge", hinge_after=0)
    raw["compression"] = {"upload": "int8"}
    run_scenario(scenario_from_dict(raw), tmp_path / "local")
    run_scenario(scenario_from_dict(raw, ["resources.backend=ray", "resources.clients_per_pass=2"]), tmp_path / "ray")
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert len(a) == len(b) == 6 and max(r.get("train/clients_per_pass", 1) for r in b) > 1
    for ra, rb in zip(a, b):
        for k in ("eval/loss", "train/loss", "async/staleness_mean", "time/sim_total_s", "comm/up_bytes"):
            assert (k in ra) == (k in rb), (ra["round"], k)
            assert ra.get(k) == pytest.approx(rb.get(k), rel=F32_NETWORK) if k in ra else True, (ra["round"], k)


def test_a_resume_with_clients_in_flight_is_exact(tiny_raw, tmp_path):
    """Cut after step 3's checkpoint (clients in flight from older versions, one of them slow): the resumed run
    configures them from the versions they started from (their int8 broadcasts drawn as before, their top-k
    residuals from the restored client state store), and every later number is the uninterrupted run's."""
    raw = _async(tiny_raw)
    raw["compression"] = {"download": "int8", "upload": "topk"}  # each start's broadcast; residuals in the store
    whole = tmp_path / "whole"
    run_scenario(scenario_from_dict(raw), whole)
    with pytest.raises(RuntimeError, match="stopped"):
        run_scenario(scenario_from_dict(raw), tmp_path / "cut", callbacks=[StopAt(4)])
    meta = json.loads((tmp_path / "cut" / "checkpoint" / "meta.json").read_text())
    flights = meta["strategy_state"]["__async__"]["flights"]
    assert meta["round"] == 3 and len(flights) == 3 and min(f["version"] for f in flights) < 3
    resume_run(tmp_path / "cut")
    a, b = _rows(whole), _rows(tmp_path / "cut")
    assert [r["round"] for r in b] == [0, 1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        for k in ("eval/loss", "train/loss", "async/staleness_mean", "time/sim_total_s", "clients/sampled"):
            assert ra.get(k) == rb.get(k), (ra["round"], k)


@pytest.mark.parametrize(("change", "says"), [
    ({"strategy": {"name": "flora"}}, "asynchronous: strategy 'flora' stacks each round's factors"),
    ({"asynchronous": {"concurrency": 2, "buffer": 3}}, "asynchronous: buffer 3 is larger than concurrency 2"),
    ({"asynchronous": {"exponent": -1}}, "asynchronous: exponent -1 is negative"),
    ({"asynchronous": {"concurrency": 6, "buffer": 4}}, "asynchronous.concurrency: 6 clients in flight and a buffer"),
    ({"clock": {"deadline_s": 5}}, "clock.deadline_s: asynchronous aggregation cannot take it"),
    ({"privacy": {"mode": "local", "clipping_norm": 1.0, "noise_multiplier": 1.0}}, "privacy: asynchronous"),
    ({"strategy": {"name": "fedit", "robust": {"method": "median"}}}, "strategy.robust: asynchronous"),
])
def test_what_cannot_run_asynchronously_is_one_line(tiny_raw, change, says):
    from fedsim.components import resolve
    from fedsim.errors import ScenarioError

    raw = {**tiny_raw, "asynchronous": {"concurrency": 4, "buffer": 2}}
    for key, value in change.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(raw.get(key), dict) and key != "strategy" else value
    with pytest.raises(ScenarioError) as e:
        resolve(scenario_from_dict(raw))
    assert str(e.value).startswith(says) and "\n" not in str(e.value)
