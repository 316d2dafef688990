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
