import pytest
import torch

from fedsim.lora import ops
from fedsim.server import Server
from fedsim.strategies import StrategySpec
from fedsim.types import ClientUpdate, LoraSpec, ModuleShape, RoundContext

SHAPES = {"m.q_proj": ModuleShape(d_in=4, d_out=3)}
LORA = LoraSpec(2, 4.0)
CTX = RoundContext(1, 1, 0)


def _update(cid, **tensors):
    base = {ops.a_key("m.q_proj"): torch.ones(2, 4), ops.b_key("m.q_proj"): torch.ones(3, 2)}
    base.update(tensors)
    return ClientUpdate(cid, 10, LORA, {k: v for k, v in base.items() if v is not None})


def test_bad_updates_are_rejected_with_a_reason_and_never_aggregated():
    server = Server("fedit", {}, StrategySpec(SHAPES, LORA, seed=0))
    a, b = ops.a_key("m.q_proj"), ops.b_key("m.q_proj")
    bad = [
        _update(1, **{a: torch.full((2, 4), float("nan"))}),
        _update(2, **{b: torch.tensor([[float("inf"), 0.0]] * 3)}),
        _update(3, **{a: torch.ones(2, 5)}),
        _update(4, **{b: None}),
        _update(5, **{"m.q_proj.lora_C.weight": torch.ones(1)}),
    ]
    summary = server.aggregate(CTX, [_update(0)] + bad)
    assert summary["aggregated"] == 1.0
    reasons = summary["rejected"]
    assert sorted(reasons) == [1, 2, 3, 4, 5]
    assert "NaN or Inf" in reasons[1] and "NaN or Inf" in reasons[2]
    assert "shape (2, 5)" in reasons[3] and "missing" in reasons[4] and "unexpected" in reasons[5]
    assert all(torch.equal(t, torch.ones_like(t)) for t in server.state.tensors.values())  # only client 0 counted


def test_a_round_where_everything_failed_leaves_the_state_unchanged():
    server = Server("fedit", {}, StrategySpec(SHAPES, LORA, seed=0))
    before = {k: v.clone() for k, v in server.state.tensors.items()}
    summary = server.aggregate(CTX, [_update(1, **{ops.a_key("m.q_proj"): torch.full((2, 4), float("nan"))})])
    assert summary["aggregated"] == 0.0
    assert all(torch.equal(server.state.tensors[k], before[k]) for k in before)
    server.aggregate(CTX, [])
    assert all(torch.equal(server.state.tensors[k], before[k]) for k in before)


def test_the_fused_finiteness_check_finds_nan_and_inf_and_accepts_huge_finite_values():
    ok = torch.ones(3, 3)
    huge = torch.full((4, 4), 3e38)  # finite, but its norm overflows to inf
    assert ops.first_nonfinite({}) is None
    assert ops.first_nonfinite({"a": ok, "b": huge}) is None
    assert ops.first_nonfinite({"a": ok, "b": huge, "c": torch.tensor([0.0, float("nan")])}) == "c"
    assert ops.first_nonfinite({"a": torch.tensor([float("-inf")]), "b": ok}) == "a"
    mixed = {"a": ok.double(), "b": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), "i": torch.arange(3)}
    assert ops.first_nonfinite(mixed) == "b"  # mixed dtypes: one tensor at a time


def test_a_streaming_server_holds_one_update_at_a_time_and_rejects_as_before():
    """The server folds a lazy stream of updates: when the next one is made, the last is gone (a weak reference to
    its tensor is dead); rejections and accounting are those of the server that takes the round at once."""
    import gc
    import weakref

    from fedsim.pipeline import ServerStage, StageResult
    from fedsim.pipeline.robust import RobustAggregation

    a = ops.a_key("m.q_proj")
    made = [(cid, torch.full((2, 4), float(cid))) for cid in range(6)]
    made[3] = (3, torch.full((2, 4), float("nan")))
    refs, alive = [], []

    def stream():
        for cid, t in made:
            gc.collect()
            alive.extend(r() is not None for r in refs)  # every update before this one: gone?
            u = _update(cid, **{a: t.clone()})
            refs.append(weakref.ref(u.tensors[a]))
            yield u
            del u

    server = Server("fedit", {}, StrategySpec(SHAPES, LORA, seed=0))
    assert server.streams
    streamed = server.aggregate(CTX, stream())
    assert alive and not any(alive)
    class Whole(ServerStage):  # a stage over the whole round (as a median's): the server gathers the round
        def before(self, ctx, state, updates):
            return StageResult(list(updates))

    whole = Server("fedit", {}, StrategySpec(SHAPES, LORA, seed=0), stages=[Whole()])
    assert not whole.streams
    assert Server("fedit", {}, StrategySpec(SHAPES, LORA, seed=0),  # norm bounding clips one update at a time
                  stages=[RobustAggregation("norm_bound", max_norm=1e9)]).streams
    together = whole.aggregate(CTX, [_update(cid, **{a: t}) for cid, t in made])
    assert streamed["rejected"].keys() == together["rejected"].keys() == {3}
    for key in ("aggregated", "comm/up_params", "comm/up_bytes", "per_client_up"):
        assert streamed[key] == together[key]
    assert all(torch.equal(server.state.tensors[k], whole.state.tensors[k]) for k in server.state.tensors)
    assert float(server.state.tensors[a][0, 0]) == pytest.approx((0 + 1 + 2 + 4 + 5) / 5)
