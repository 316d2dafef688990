"""Worker-side partials (resources.worker_partials): the server's merge of partials, and where they are refused."""

import pytest
import torch

from fedsim.config import scenario_from_dict
from fedsim.errors import ScenarioError
from fedsim.lora import ops
from fedsim.server import Folder, Server
from fedsim.strategies import StrategySpec
from fedsim.types import ClientUpdate, LoraSpec, ModuleShape, RoundContext

SHAPES = {"m.q_proj": ModuleShape(d_in=4, d_out=3)}
LORA = LoraSpec(2, 4.0)
CTX = RoundContext(1, 3, 0)


def _update(cid: int, nan: bool = False) -> ClientUpdate:
    g = torch.Generator().manual_seed(cid)
    a, b = torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g)
    if nan:
        a[0, 0] = float("nan")
    return ClientUpdate(cid, 10 + cid, LORA, {ops.a_key("m.q_proj"): a, ops.b_key("m.q_proj"): b})


def test_the_server_merges_partials_into_the_aggregate_of_their_clients_and_rejects_the_rest():
    spec = StrategySpec(SHAPES, LORA, seed=0)
    server, reference = Server("fedit", {}, spec), Server("fedit", {}, spec)
    results, partials = {}, []
    for clients in ([0, 1, 6], [2, 3]):  # two workers; client 6 sent NaN, rejected where it was made
        folder = Folder(server.strategy)
        for cid in clients:
            results[cid] = folder.fold(server.fold_spec(CTX), _update(cid, nan=cid == 6))
        partials.append(folder.take(CTX.server_round))
    stale = Folder(server.strategy)
    results[4] = stale.fold(server.fold_spec(RoundContext(2, 3, 0)), _update(4))  # a partial of another round
    partials.append(stale.take(2))
    results[5] = ((1, 1), None)  # trained, but its partial never came
    up = server.aggregate_partials(CTX, iter(partials), results)
    assert up["aggregated"] == 4.0 and up["engine/server_in_objects"] == 2.0
    assert "NaN or Inf" in up["rejected"][6] and "round 2" in up["rejected"][4] and "no partial" in up["rejected"][5]
    assert sorted(up["per_client_up"]) == [0, 1, 2, 3, 4, 5, 6]  # every upload counted, rejected or not
    same = reference.aggregate(CTX, [_update(c) for c in (3, 1, 0, 2)])
    assert same["comm/up_bytes"] == sum(up["per_client_up"][c][1] for c in range(4))
    for k, v in reference.state.tensors.items():
        assert torch.equal(server.state.tensors[k], v), k


@pytest.mark.parametrize(("change", "match"), [
    ({"strategy": {"name": "fedit", "robust": {"method": "median"}}}, "strategy.robust"),
    ({"privacy": {"mode": "central", "clipping_norm": 1.0, "noise_multiplier": 0.1}}, "central"),
    ({"strategy": {"name": "fedit", "client_objective": {"name": "scaffold"}}}, "control variate"),
    ({"clock": {"deadline_s": 5.0}}, "deadline"),
])
def test_worker_partials_are_refused_where_the_server_must_see_each_update(tiny_raw, change, match):
    tiny_raw["resources"]["worker_partials"] = True
    tiny_raw["clients"]["per_round"] = 6
    tiny_raw.update(change)
    with pytest.raises(ScenarioError, match=match) as err:
        scenario_from_dict(tiny_raw)
    assert err.value.field == "resources.worker_partials"


def test_a_strategy_that_does_not_stream_and_a_stage_that_reads_updates_are_refused(tiny_raw):
    from fedsim.components import resolve
    from fedsim.pipeline import ServerStage
    from fedsim.server import partials_refusal
    from fedsim.strategies import make_strategy
    from fedsim.strategies.fedit import FedIT

    class Whole(FedIT):
        streams = False

        def aggregate(self, ctx, state, updates):
            return super().aggregate(ctx, state, updates)

    class Peek(ServerStage):
        def admit(self, ctx, state, update):
            return update, None

    assert "does not stream" in partials_refusal(Whole(), ())
    assert "Peek" in partials_refusal(make_strategy("fedit"), (Peek(),))
    assert partials_refusal(make_strategy("flora"), ()) is None
    tiny_raw["resources"]["worker_partials"] = True
    with pytest.raises(ScenarioError, match="does not stream"):
        resolve(scenario_from_dict(tiny_raw), Whole())


@pytest.mark.parametrize(("change", "folds", "says"), [
    ({}, True, "3 clients a round per worker"),  # 6 clients for 2 workers
    ({"resources": {"backend": "local"}, "clients": {"per_round": 3}}, True, "3 clients"),  # one in-process worker
    ({"clients": {"per_round": 4}}, False, "2 clients a round per worker"),  # a partial weighs two updates
    ({"strategy": {"name": "flora"}}, False, "float32"),  # product sums would group by worker
    ({"strategy": {"name": "fedit", "robust": {"method": "median"}}}, False, "strategy.robust"),
    ({"clock": {"deadline_s": 5.0}}, False, "deadline"),
    ({"faults": {"kill_worker_prob": 0.1}}, False, "kill_worker_prob"),
    ({"resources": {"worker_partials": False}}, False, "worker_partials: false"),
])
def test_auto_folds_on_workers_where_the_partials_merge_exactly_and_say_why(tiny_raw, change, folds, says):
    """#50 point 1: resources.worker_partials defaults to auto, which folds on the workers where it changes no
    number and saves memory, and says which path it took and why."""
    from fedsim.components import aggregation_path, resolve

    tiny_raw["clients"]["per_round"] = 6
    tiny_raw["resources"].update(backend="ray", num_workers=2)
    for key, value in change.items():
        tiny_raw[key] = {**tiny_raw.get(key, {}), **value} if key != "strategy" else value
    sc = scenario_from_dict(tiny_raw)
    components = resolve(sc)
    path = aggregation_path(sc, components.strategy, components.stages)
    assert path.folds is folds and says in path.note
    assert path.note.startswith("aggregation: workers fold" if folds else "aggregation: the server ")
    assert path.feeds is (not folds and "robust" not in change.get("strategy", {}) and "clock" not in change)


@pytest.mark.parametrize("name", ["fedit", "ffa", "fedsa", "hetlora", "feddpa", "fedqlora", "pf2lora", "flora", "flexlora",
                                  "fedex"])
def test_partials_exact_is_honest_any_grouping_equals_one_server_fold_bit_for_bit(name):
    """What auto relies on (Strategy.partials_exact): the float64 sums of any grouping of the round's clients by
    worker, merged in any order, give the same float32 state (tensors and base deltas) as the server folding every
    update itself; the float32 product sums of FLoRA, FlexLoRA and FedEx-LoRA do not (so they are not exact)."""
    from fedsim.strategies import make_strategy

    spec = StrategySpec({"m.q_proj": ModuleShape(d_in=64, d_out=48), "m.v_proj": ModuleShape(d_in=64, d_out=64)},
                        LoraSpec(4, 8.0), seed=0)
    strategy = make_strategy(name)
    state, clients = strategy.init_state(spec), list(range(24))

    def update(cid):
        g = torch.Generator().manual_seed(100 + cid)
        return ClientUpdate(cid, 5 + 3 * cid, LoraSpec(4, 8.0), {
            k: torch.randn(t.shape, generator=g) * (10.0 ** (cid % 5 - 2)) for k, t in state.tensors.items()})

    server = Server(strategy, spec=spec)
    server.aggregate(CTX, [update(c) for c in clients])
    same = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        order, cut = torch.randperm(len(clients), generator=g).tolist(), sorted(torch.randperm(23, generator=g)[:2] + 1)
        other, results, partials = Server(make_strategy(name), spec=spec), {}, []
        for group in (order[: cut[0]], order[cut[0]: cut[1]], order[cut[1]:]):  # three workers
            folder = Folder(other.strategy)
            for cid in group:
                results[cid] = folder.fold(other.fold_spec(CTX), update(cid))
            partials.append(folder.take(CTX.server_round))
        other.aggregate_partials(CTX, reversed(partials), results)
        mine, theirs = server.state, other.state
        same.append(all(torch.equal(theirs.tensors[k], v) for k, v in mine.tensors.items()) and all(
            torch.equal(a[k], b[k]) for a, b in zip(mine.base_deltas, theirs.base_deltas, strict=True) for k in a))
    assert all(same) if strategy.partials_exact else not all(same), same
