"""Robust aggregation (#27 point 4, and point 6's references): median, trimmed mean, Krum / Multi-Krum and norm
bounding against float64 references written here; refusals; and an attacked run where the median holds and the mean
does not."""

import dataclasses

import numpy as np
import pytest
import torch
from tolerances import F32_ALGEBRA, F32_ELEMENTWISE

from fedsim.config import scenario_from_dict
from fedsim.errors import ScenarioError
from fedsim.pipeline.robust import RobustAggregation
from fedsim.types import ClientUpdate, GlobalState, LoraSpec, RoundContext

LORA = LoraSpec(rank=2, alpha=4)
SHAPES = {"m.lora_A": (2, 3), "m.lora_B": (4, 2)}


def updates(n, seed=0, outliers=()):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}
        if i in outliers:
            t = {k: v * -50.0 for k, v in t.items()}
        out.append(ClientUpdate(client_id=i, num_examples=10 + i, lora=LORA, tensors=t))
    return out


def state(value=0.0):
    return GlobalState(tensors={k: torch.full(s, value) for k, s in SHAPES.items()}, lora=LORA)


def run_stage(stage, ups, st=None):
    st = st or state()
    ctx = RoundContext(server_round=1, num_rounds=1, seed=0)
    res = stage.before(ctx, st, ups)
    if res.skip:  # as the server does: nothing aggregated, the stages' idle
        new, metrics = stage.idle(ctx, st, st)
        return res, new, metrics
    mean = {k: torch.stack([u.tensors[k] for u in res.updates]).mean(0) for k in SHAPES}  # a stand-in strategy
    new, metrics = stage.after(ctx, st, dataclasses.replace(st, tensors=mean))
    return res, new, metrics


def as_np(ups, key):
    return np.stack([u.tensors[key].double().numpy() for u in ups])


@pytest.mark.parametrize("n, ties", [(5, False), (6, False), (6, True), (4, True)])
def test_median_and_trimmed_mean_equal_numpy_in_float64(n, ties):
    ups = updates(n)
    if ties:  # repeated values: the two middle ones may be equal
        ups = [dataclasses.replace(u, tensors={k: (v * 2).round() / 2 for k, v in u.tensors.items()}) for u in ups]
    _, new, _ = run_stage(RobustAggregation("median"), ups)
    for k in SHAPES:
        np.testing.assert_allclose(new.tensors[k].double().numpy(), np.median(as_np(ups, k), axis=0), rtol=F32_ELEMENTWISE)
    _, new, _ = run_stage(RobustAggregation("trimmed_mean", trim=0.2), ups)
    cut = int(0.2 * n)
    for k in SHAPES:
        ref = np.sort(as_np(ups, k), axis=0)[cut : n - cut].mean(axis=0)
        np.testing.assert_allclose(new.tensors[k].double().numpy(), ref, rtol=F32_ALGEBRA)


@pytest.mark.parametrize("threads", [1, 2])
def test_median_and_trimmed_mean_of_many_updates_in_blocks_and_threads(threads, monkeypatch):
    """More updates than one copy block (64), an odd count, a bf16 tensor, NaN and ties: every coordinate as numpy's
    median / sorted trimmed mean (NaN sorts last, as numpy.sort), whichever thread reduced its tensor."""
    n = 151
    g = torch.Generator().manual_seed(5)
    ups = []
    for i in range(n):
        t = {"m.lora_A": torch.randn(3, 70, generator=g), "m.lora_B": (torch.randn(40, 3, generator=g) * 2).round(),
             "n.lora_A": torch.randn(2, 9, generator=g).to(torch.bfloat16)}
        if i == 7:
            t["m.lora_A"][0, 0] = float("nan")
        ups.append(ClientUpdate(client_id=i, num_examples=1, lora=LORA, tensors=t))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    st = GlobalState(tensors={k: torch.zeros(v.shape) for k, v in ups[0].tensors.items()}, lora=LORA)
    ctx = RoundContext(server_round=1, num_rounds=1, seed=0)
    for stage, ref in [(RobustAggregation("median"), lambda a: np.median(a, axis=0)),
                       (RobustAggregation("trimmed_mean", trim=0.1),
                        lambda a: np.sort(a, axis=0)[15 : n - 15].mean(axis=0))]:
        stage.before(ctx, st, ups)
        new, _ = stage.after(ctx, st, st)
        for k in st.tensors:
            a = np.stack([u.tensors[k].double().numpy() for u in ups])
            if k == "m.lora_A":  # numpy.median would give NaN where a NaN is; the sort puts it last like numpy.sort
                a[7, 0, 0] = np.inf
            np.testing.assert_allclose(new.tensors[k].double().numpy(), ref(a), rtol=F32_ALGEBRA)


def krum_reference(ups, f, m):
    flat = np.stack([np.concatenate([u.tensors[k].double().numpy().ravel() for k in sorted(SHAPES)]) for u in ups])
    n = len(ups)
    scores = []
    for i in range(n):
        d = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return sorted(range(n), key=lambda i: scores[i])[:m]


@pytest.mark.parametrize("method, m", [("krum", 1), ("multi_krum", 3)])
def test_krum_selects_as_the_reference_and_leaves_the_outliers_out(method, m):
    ups = updates(8, seed=2, outliers=(1, 6))
    _, new, metrics = run_stage(RobustAggregation(method, byzantine=2, select=m), ups)
    chosen = krum_reference(ups, 2, m)
    assert not {1, 6} & set(chosen) and metrics == {"robust/selected": float(m)}
    for k in SHAPES:
        np.testing.assert_allclose(new.tensors[k].double().numpy(), as_np([ups[i] for i in chosen], k).mean(0),
                                   rtol=F32_ALGEBRA)


def test_krum_with_too_few_updates_leaves_the_shared_tensors_unchanged():
    _, new, metrics = run_stage(RobustAggregation("krum", byzantine=2), updates(6), state(0.5))
    assert metrics == {"robust/skipped": 1.0}
    assert all(torch.equal(new.tensors[k], torch.full(s, 0.5)) for k, s in SHAPES.items())


def test_norm_bounding_clips_each_change_to_the_bound_and_leaves_small_ones():
    ups = updates(4, seed=3)
    st = state(0.1)
    small = dataclasses.replace(ups[0], tensors={k: torch.full(s, 0.1) + 1e-3 for k, s in SHAPES.items()})
    res, _, metrics = run_stage(RobustAggregation("norm_bound", max_norm=1.0), [small, *ups[1:]], st)
    assert metrics == {"robust/clipped": 3.0}
    assert all(torch.equal(res.updates[0].tensors[k], small.tensors[k]) for k in SHAPES)
    for before, after in zip(ups[1:], res.updates[1:]):
        d_after = np.concatenate([(after.tensors[k].double() - 0.1).numpy().ravel() for k in SHAPES])
        d_before = np.concatenate([(before.tensors[k].double() - 0.1).numpy().ravel() for k in SHAPES])
        assert np.linalg.norm(d_after) == pytest.approx(1.0, rel=F32_ALGEBRA)
        np.testing.assert_allclose(d_after / np.linalg.norm(d_after), d_before / np.linalg.norm(d_before),
                                   rtol=F32_ALGEBRA, atol=F32_ALGEBRA)  # the direction is kept


@pytest.mark.parametrize("change, match", [
    ({"strategy": {"name": "flora", "robust": {"method": "median"}}}, "does not average factors"),
    ({"strategy": {"name": "fedit", "robust": {"method": "norm_bound"}}}, "norm_bound needs the bound"),
    ({"strategy": {"name": "fedit", "robust": {"method": "krum", "byzantine": 1}}}, r"more than 4 clients per round.*samples 3"),
    ({"strategy": {"name": "fedit", "robust": {"method": "median"}, "client_objective": {"name": "scaffold"}}},
     "SCAFFOLD's control variates"),
    ({"strategy": {"name": "hetlora", "robust": {"method": "median"}}}, "rescaled, truncated copy"),
])
def test_robust_aggregation_is_refused_where_it_does_not_apply(tiny_raw, change, match):
    for section, value in change.items():
        tiny_raw[section] = {**tiny_raw.get(section, {}), **value}
    with pytest.raises(ScenarioError, match=match):
        scenario_from_dict(tiny_raw)


def test_an_attacked_run_holds_with_the_median_and_degrades_with_the_mean(tiny_raw, tmp_path):
    """Two of five clients (clients.malicious) send their change flipped and scaled ×20: the mean follows them, the
    median does not; each row names the attackers."""
    import json

    from fedsim.driver import run_scenario

    tiny_raw.update(rounds=3)
    tiny_raw["clients"].update(num_clients=5, per_round=5)
    tiny_raw["training"].update(local_steps=10, lr=0.01)
    tiny_raw["partition"] = {"method": "iid"}
    attack = {"fraction": 0.4, "attack": "sign_flip", "factor": 20.0}
    out = {}
    for name, robust, malicious in (("clean", None, None), ("mean", None, attack),
                                    ("median", {"method": "median"}, attack)):
        raw = {**tiny_raw, "strategy": {"name": "fedit", **({"robust": robust} if robust else {})},
               "clients": {**tiny_raw["clients"], **({"malicious": malicious} if malicious else {})}}
        out[name] = run_scenario(scenario_from_dict(raw), tmp_path / name)["final/eval/loss"]
    attackers = scenario_from_dict(raw).clients.malicious.clients(5, tiny_raw["seed"])
    rows = [json.loads(x) for x in (tmp_path / "median" / "metrics.jsonl").read_text().splitlines()[1:]]
    assert len(attackers) == 2 and all(r["malicious/clients"] == sorted(attackers) for r in rows)
    assert "malicious/clients" not in json.loads((tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()[1])
    assert out["mean"] > out["clean"] + 0.3  # the attack works on the mean
    # the median of 3 honest and 2 attacking values is an honest client's value: near the clean run
    assert abs(out["median"] - out["clean"]) < (out["mean"] - out["clean"]) / 3


def test_a_skipped_krum_round_leaves_the_state_even_with_a_momentum_server_optimizer():
    """#45: a Krum round with too few updates (n <= 2f + 2) still moved the adapter when a server optimizer was set —
    FedAvgM stepped on a zero pseudo-gradient with the momentum of the rounds before. Now the round is one without
    updates for every stage after Krum (idle, not after): the state stays exactly, the momentum is kept for later."""
    from fedsim.pipeline.server_opt import ServerOptimizer
    from fedsim.server import Server
    from fedsim.strategies.base import StrategySpec
    from fedsim.types import ClientUpdate, LoraSpec, ModuleShape

    conf = {"m.q_proj": ModuleShape(d_in=6, d_out=5)}
    server = Server("fedit", {}, StrategySpec(conf, LoraSpec(2, 4.0), seed=0),
                    stages=[RobustAggregation("krum", byzantine=1), ServerOptimizer("fedavgm", lr=1.0, momentum=0.9)])
    g = torch.Generator().manual_seed(0)

    def round_of(r: int, n: int) -> dict:
        start = server.state.tensors
        ups = [ClientUpdate(c, 10, LoraSpec(2, 4.0), {k: v + torch.randn(v.shape, generator=g) for k, v in
                                                        start.items()}) for c in range(n)]
        return server.aggregate(RoundContext(server_round=r, num_rounds=3, seed=0), ups)

    round_of(1, 6)  # Krum with f = 1 selects one of 6: a step, and momentum
    assert server.stages[-1].m
    before = {k: v.clone() for k, v in server.state.tensors.items()}
    report = round_of(2, 4)  # 4 <= 2f + 2: skipped
    assert report["stage_metrics"]["robust/skipped"] == 1.0 and report["aggregated"] == 0.0
    assert all(torch.equal(server.state.tensors[k], before[k]) for k in before)
    assert "server_opt/step_norm" not in report["stage_metrics"]


def test_norm_bounding_streams_the_server_folds_the_clipped_updates_as_they_come(tiny_raw):
    """Norm bounding clips one update at a time, so the server folds the round as it comes (no gathering): the
    streamed round is the weighted mean of the updates clipped in float64 by numpy, and counts what it clipped."""
    from fedsim.components import aggregation_path, resolve
    from fedsim.lora import ops
    from fedsim.server import Server
    from fedsim.strategies import StrategySpec
    from fedsim.types import ModuleShape

    bound, keys = 1.0, {ops.a_key("m"): (2, 3), ops.b_key("m"): (4, 2)}
    g = torch.Generator().manual_seed(4)
    ups = [ClientUpdate(i, 3 + i, LORA, {k: torch.randn(*s, generator=g) for k, s in keys.items()}) for i in range(5)]
    spec = StrategySpec({"m": ModuleShape(d_in=3, d_out=4)}, LORA, seed=0)
    server = Server("fedit", {}, spec, stages=[RobustAggregation("norm_bound", max_norm=bound)])
    assert server.streams
    server.state = dataclasses.replace(server.state, tensors={k: torch.full(s, 0.1) for k, s in keys.items()})
    up = server.aggregate(RoundContext(1, 1, 0), iter(ups))
    clipped, total = 0, {k: 0.0 for k in keys}
    for u in ups:
        change = {k: u.tensors[k].double().numpy() - 0.1 for k in keys}
        norm = np.sqrt(sum((c ** 2).sum() for c in change.values()))
        clipped += norm > bound
        for k in keys:
            total[k] = total[k] + u.num_examples * (0.1 + change[k] * min(1.0, bound / norm))
    n = sum(u.num_examples for u in ups)
    for k in keys:
        np.testing.assert_allclose(server.state.tensors[k].double().numpy(), total[k] / n, rtol=F32_ALGEBRA,
                                   atol=F32_ALGEBRA)
    assert clipped >= 3 and up["stage_metrics"] == {"robust/clipped": float(clipped)}
    tiny_raw["strategy"] = {"name": "fedit", "robust": {"method": "norm_bound", "max_norm": 1.0}}
    tiny_raw["resources"]["worker_partials"] = False
    sc = scenario_from_dict(tiny_raw)
    c = resolve(sc)
    assert aggregation_path(sc, c.strategy, c.stages).feeds  # folded while the clients train, not gathered
