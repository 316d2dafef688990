"""Two-level personalized methods: PF2LoRA's hypergradient, FedDPA's alternating training, the personal adapter on a
PEFT model next to the common one, and where personal tensors may (never) go."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import F32_ALGEBRA, F32_ELEMENTWISE, F32_NETWORK, F64, HALF_TRAINING
from torch.func import functional_call

from fedsim.client.batching import collate
from fedsim.client.procedures import _twice_differentiable, hypergradient
from fedsim.config import scenario_from_dict
from fedsim.data.datasets import load_data
from fedsim.errors import ScenarioError
from fedsim.lora import ops
from fedsim.models.adapters import AdapterHost
from fedsim.models.base import build_base_model, target_shapes
from fedsim.models.quant import FULL
from fedsim.runtime.worker import ClientJob, Worker
from fedsim.server import Server
from fedsim.strategies import StrategySpec, make_strategy
from fedsim.types import ClientSpec, LoraSpec, RoundContext

LORA = LoraSpec(4, 8.0)


def _small_problem(seed: int = 0):
    """A nonlinear loss of a two-adapter linear layer, in float64: f(x, y) = CE(tanh(inp (W + B A + D C)ᵀ) · 3, t)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w, inp, tgt = r(5, 4), r(7, 4), torch.randint(0, 5, (7,), generator=g)
    x = [r(3, 4).requires_grad_(), r(5, 3).requires_grad_()]  # common A (r, d_in), B (d_out, r)
    y = [r(2, 4).requires_grad_(), r(5, 2).requires_grad_()]  # personal C, D

    def f(xs, ys):
        m = w + xs[1] @ xs[0] + ys[1] @ ys[0]
        return torch.nn.functional.cross_entropy(torch.tanh(inp @ m.T) * 3.0, tgt)

    return f, x, y


def test_hypergradient_equals_autograd_with_the_explicit_mixed_hessian():
    f, x, y = _small_problem()
    alpha = 0.3
    hyper, y_plus, m = hypergradient(f, x, y, alpha)

    # independent reference: the full Hessian of f over (x, y) by torch.autograd.functional, its x–y block times v
    sizes = [t.numel() for t in x + y]
    nx = sum(sizes[: len(x)])

    def flat_f(z):
        parts = list(torch.split(z, sizes))
        ts = [p.view_as(t) for p, t in zip(parts, x + y)]
        return f(ts[: len(x)], ts[len(x):])

    z = torch.cat([t.detach().reshape(-1) for t in x + y])
    hess = torch.autograd.functional.hessian(flat_f, z)
    h_xy = hess[:nx, nx:]
    g_y = torch.autograd.grad(f(x, y), y)
    y_ref = [yi.detach() - alpha * gi for yi, gi in zip(y, g_y)]
    y_ref_req = [t.clone().requires_grad_() for t in y_ref]
    gx_plus_and_v = torch.autograd.grad(f(x, y_ref_req), x + y_ref_req)
    gx_plus = torch.cat([g.reshape(-1) for g in gx_plus_and_v[: len(x)]])
    v = torch.cat([g.reshape(-1) for g in gx_plus_and_v[len(x):]])
    expected = gx_plus - alpha * h_xy @ v
    got = torch.cat([h.reshape(-1) for h in hyper])
    torch.testing.assert_close(got, expected, atol=F64, rtol=0)
    for a, b in zip(y_plus, y_ref):
        torch.testing.assert_close(a, b, atol=F64, rtol=0)

    # and the same as differentiating the unrolled one-step objective F(x) = f(x, y − α ∇_y f(x, y))
    def unrolled(xs):
        gy = torch.autograd.grad(f(xs, y), y, create_graph=True)
        return f(xs, [yi - alpha * gi for yi, gi in zip(y, gy)])

    ref = torch.autograd.grad(unrolled(x), x)
    for h, r in zip(hyper, ref):
        torch.testing.assert_close(h, r, atol=F64, rtol=0)
    assert m["hvp_norm"] > 1e-3  # the second-order term is not negligible here...

    first, _, m1 = hypergradient(f, x, y, alpha, second_order=False)
    gap = max(float((a - b).abs().max()) for a, b in zip(first, hyper))
    assert gap > 1e-3 and m1["hvp_norm"] == 0.0  # ...so dropping it (the ablation) changes the gradient


def test_clipped_inner_step_is_exact_for_the_effective_learning_rate():
    f, x, y = _small_problem(1)
    g_norm = float(torch.sqrt(sum((g**2).sum() for g in torch.autograd.grad(f(x, y), y))))
    alpha, max_norm = 0.3, g_norm / 4
    hyper, y_plus, _ = hypergradient(f, x, y, alpha, max_norm=max_norm)
    ref, y_ref, _ = hypergradient(f, x, y, alpha * max_norm / (g_norm + 1e-6))
    for a, b in zip(hyper + y_plus, ref + y_ref):
        torch.testing.assert_close(a, b, atol=F32_ELEMENTWISE, rtol=F32_ELEMENTWISE)  # the clip factor: float32


def _tiny(tiny_raw, strategy: str = "pf2lora", **params):
    tiny_raw["strategy"] = {"name": strategy, "params": params}
    tiny_raw["eval"]["local_test_fraction"] = 0.2
    return scenario_from_dict(tiny_raw)


def test_hypergradient_through_the_peft_model_matches_unrolled_autograd(tiny_raw):
    sc = _tiny(tiny_raw)
    data = load_data(sc)
    host = AdapterHost(build_base_model(sc.model, torch.device("cpu")), sc.model.target_modules)
    personal = LoraSpec(2, 4.0)
    host.activate(LORA, personal)
    g = torch.Generator().manual_seed(0)
    for lora, is_personal in ((LORA, False), (personal, True)):
        host.load(lora, {k: torch.randn(p.shape, generator=g) * 0.2 for k, p in host.params(lora, is_personal).items()},
                  personal=is_personal)
    x = host.set_trainable(LORA, ("A", "B"))
    y = host.set_trainable(personal, ("A", "B"), personal=True)
    names = {id(t): n for n, t in host.model.named_parameters()}
    batch = collate(data.train, np.arange(8), data.pad_id, torch.device("cpu"))

    def f(xs, ys):
        override = {names[id(t)]: v for t, v in zip(x + y, list(xs) + list(ys))}
        return functional_call(host.model, override, args=(),
                               kwargs={"input_ids": batch["input_ids"], "labels": batch["labels"]}).loss

    alpha = 0.5
    with _twice_differentiable(True):
        hyper, _, m = hypergradient(f, x, y, alpha)

        def unrolled(xs):
            gy = torch.autograd.grad(f(xs, y), y, create_graph=True)
            return f(xs, [yi - alpha * gi for yi, gi in zip(y, gy)])

        ref = torch.autograd.grad(unrolled(x), x)
    for h, r in zip(hyper, ref):
        torch.testing.assert_close(h, r, atol=F64, rtol=0)
    assert m["hvp_norm"] > 0


def test_two_active_adapters_compute_the_mixture(tiny_raw):
    sc = _tiny(tiny_raw)
    host = AdapterHost(build_base_model(sc.model, torch.device("cpu")), sc.model.target_modules)
    personal = LoraSpec(2, 6.0, rslora=True)
    host.activate(LORA, personal, mix=(0.7, 0.2))
    g = torch.Generator().manual_seed(1)
    main = {k: torch.randn(p.shape, generator=g) for k, p in host.params(LORA).items()}
    own = {k: torch.randn(p.shape, generator=g) for k, p in host.params(personal, True).items()}
    host.load(LORA, main)
    host.load(personal, own, personal=True)
    module = "model.layers.0.self_attn.q_proj"
    layer = host.model.get_submodule("base_model.model." + module)
    inp = torch.randn(3, layer.in_features, generator=g)
    w0 = host.base_weight(module)
    expected = inp @ (w0 + 0.7 * ops.delta_w(main, module, LORA.scaling)
                      + 0.2 * ops.delta_w(own, module, personal.scaling)).T
    with torch.no_grad():
        torch.testing.assert_close(layer(inp), expected, atol=F32_ALGEBRA, rtol=F32_ALGEBRA)
        host.activate(LORA)  # the main adapter alone, at its own scaling again
        torch.testing.assert_close(layer(inp), inp @ (w0 + ops.delta_w(main, module, LORA.scaling)).T,
                                   atol=F32_ALGEBRA, rtol=F32_ALGEBRA)


@pytest.mark.parametrize("strategy,params", [("pf2lora", {}), ("pf2lora", {"mode": "first_order"}),
                                             ("pf2lora", {"mode": "simultaneous"}), ("feddpa", {})])
def test_personal_adapter_follows_its_client_across_workers_and_never_leaves_it(tiny_raw, strategy, params):
    sc = _tiny(tiny_raw, strategy, **params)
    data = load_data(sc)
    spec = StrategySpec(target_shapes(sc.model), LORA, 0)
    server = Server(strategy, params, spec)
    client = ClientSpec(5, 30, LORA)
    ctx2 = RoundContext(2, 3, 0)
    payload = server.configure(ctx2, [client])[0][5]
    assert payload.personal_lora is not None and not any(k.startswith(ops.PERSONAL_PREFIX) for k in payload.tensors)
    w1 = Worker(sc, data, "w1")
    res1, up1 = w1.run_client(ClientJob(client, np.arange(30), 2), payload)
    assert sorted(up1.tensors) == sorted(server.state.tensors)  # the upload is the common/global adapter only
    assert server.invalid_reason(up1) is None
    own = {k: v for k, v in res1.personal.items() if k.startswith(ops.PERSONAL_PREFIX)}
    assert own and len(own) == len(res1.personal)
    rank = payload.personal_lora.rank
    assert all((v.shape[0] if ops.factor_of(k) == "A" else v.shape[1]) == rank for k, v in own.items())
    assert any(v.abs().sum() > 0 for k, v in own.items() if ops.factor_of(k) == "B")  # trained from B = 0
    # a personal tensor smuggled into an upload is refused by the server
    leaked = type(up1)(up1.client_id, up1.num_examples, up1.lora, {**up1.tensors, **own})
    assert "unexpected" in server.invalid_reason(leaked)
    # round 3 on another worker, negligible learning rates: the personal adapter is where round 2 left it
    frozen_raw = dict(tiny_raw, training={**tiny_raw["training"], "lr": 1e-12})
    frozen_params = {**params, "inner_lr": 1e-12} if strategy == "pf2lora" else params
    frozen = Worker(_tiny(frozen_raw, strategy, **frozen_params), data, "w2")
    payload_f = Server(strategy, frozen_params, spec).configure(ctx2, [client])[0][5]
    res2, _ = frozen.run_client(ClientJob(client, np.arange(30), 3, personal=res1.personal), payload_f)
    for k, v in own.items():
        torch.testing.assert_close(res2.personal[k], v, atol=F32_ELEMENTWISE, rtol=0)
    # and the personal adapter changes what the client's model predicts
    items = [(5, res1.personal, np.arange(30, 40))]
    (alone, mixed), = frozen.evaluate_clients(server.eval_payload(), items).values()
    assert alone["loss_sum"] != mixed["loss_sum"]


def test_feddpa_trains_the_local_adapter_from_round_two_with_the_global_frozen(tiny_raw):
    sc = _tiny(tiny_raw, "feddpa")
    data = load_data(sc)
    server = Server("feddpa", {}, StrategySpec(target_shapes(sc.model), LORA, 0))
    client = ClientSpec(2, 30, LORA)
    worker = Worker(sc, data)
    p1 = server.configure(RoundContext(1, 3, 0), [client])[0][2]
    res1, up1 = worker.run_client(ClientJob(client, np.arange(30), 1), p1)
    assert "personal/loss" not in res1.metrics  # round 1: the global adapter only
    assert all(v.abs().max() == 0 for k, v in res1.personal.items() if ops.factor_of(k) == "B")
    p2 = server.configure(RoundContext(2, 3, 0), [client])[0][2]
    assert p2.mix == (0.5, 0.5)
    res2, up2 = worker.run_client(ClientJob(client, np.arange(30), 2, personal=res1.personal), p2)
    assert "personal/loss" in res2.metrics
    assert any(v.abs().max() > 0 for k, v in res2.personal.items() if ops.factor_of(k) == "B")
    assert any(not torch.equal(up2.tensors[k], p2.tensors[k]) for k in p2.tensors)  # then the global one trains


def test_feddpa_a_weights_the_local_adapter_and_global_adapters_average_equally():
    from fedsim.strategies import make_strategy
    from fedsim.types import ClientUpdate

    assert make_strategy("feddpa", {"a": 0.8}).mix() == pytest.approx((0.2, 0.8))  # (global, local): a on local
    assert make_strategy("feddpa", {"a": 0.8, "a_weights": "global"}).mix() == pytest.approx((0.8, 0.2))
    ups = [ClientUpdate(0, 10, LORA, {}), ClientUpdate(1, 30, LORA, {})]
    assert [make_strategy("feddpa").weight_of(u) for u in ups] == [1.0, 1.0]  # the authors' FedAvg: equal weights
    assert [make_strategy("feddpa", {"weighting": "samples"}).weight_of(u) for u in ups] == [10.0, 30.0]


def test_similarity_weights_are_max_weight_times_the_mean_cosine():
    from fedsim.eval.embeddings import similarity_weights

    test, ref = torch.randn(3, 8), torch.randn(6, 8)
    refs = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5])]
    got = similarity_weights(test, ref, refs, 0.5)
    for i, rows in enumerate(refs):
        cos = [float(test[i] @ ref[j] / (test[i].norm() * ref[j].norm())) for j in rows]
        assert float(got[i]) == pytest.approx(0.5 * np.mean(cos), abs=F32_ALGEBRA)
    assert float(similarity_weights(ref[:1], ref, [np.array([0])], 0.5)[0]) == pytest.approx(0.5)  # itself: cos 1


def test_feddpa_d_weights_each_test_instance(tiny_raw):
    """FedDPA-D at evaluation: w = max_weight · mean cosine similarity per instance, on the global adapter (the
    authors' script) or the local one. At max_weight 0 it must reduce to the local adapter alone (w on global) or to
    the global adapter alone (w on local) — the wiring, checked against the fixed-mixture paths."""
    sc = _tiny(tiny_raw, "feddpa")
    data = load_data(sc)
    spec = StrategySpec(target_shapes(sc.model), LORA, 0)
    client = ClientSpec(2, 30, LORA)
    worker = Worker(sc, data)
    server = Server("feddpa", {}, spec)
    res1, up1 = worker.run_client(ClientJob(client, np.arange(30), 1), server.configure(RoundContext(1, 3, 0),
                                                                                     [client])[0][2])
    server.aggregate(RoundContext(1, 3, 0), [up1])
    p2 = server.configure(RoundContext(2, 3, 0), [client])[0][2]
    res2, _ = worker.run_client(ClientJob(client, np.arange(30), 2, personal=res1.personal), p2)

    def evaluate(params, with_train=True):
        s = Server("feddpa", params, spec)
        s.set_state(server.state, {})
        item = (2, res2.personal, np.arange(30, 40), FULL) + ((np.arange(30),) if with_train else ())
        return worker.evaluate_clients(s.eval_payload(), [item])[2]

    alone, fixed = evaluate({})
    _, local_only = evaluate({"a": 1.0})  # mixture (0, 1): the local adapter alone
    _, d_global = evaluate({"inference": "dynamic", "max_weight": 0.0})
    _, d_local = evaluate({"inference": "dynamic", "max_weight": 0.0, "dynamic_weights": "local"})
    assert d_global["loss_sum"] == pytest.approx(local_only["loss_sum"], rel=F32_NETWORK)
    assert d_local["loss_sum"] == pytest.approx(alone["loss_sum"], rel=F32_NETWORK)
    assert d_global["correct"] == local_only["correct"] and d_local["correct"] == alone["correct"]
    _, dyn = evaluate({"inference": "dynamic"})
    assert 0.0 < dyn["dpa/weight_sum"] / dyn["count"] <= 0.5
    assert dyn["loss_sum"] != pytest.approx(fixed["loss_sum"], rel=F64)
    _, no_train = evaluate({"inference": "dynamic"}, with_train=False)  # no training indices: the fixed mixture
    assert no_train["loss_sum"] == pytest.approx(fixed["loss_sum"], rel=F64)


@pytest.mark.parametrize("bad,match", [({"personal_rank": 0}, "r~"), ({"personal_rank": -2}, "r~"),
                                       ({"inner_lr": 0}, "inner_lr"), ({"mode": "newton"}, "mode")])
def test_bad_two_level_params_are_scenario_errors(tiny_raw, bad, match):
    with pytest.raises(ScenarioError, match=match):
        _tiny(tiny_raw, "pf2lora", **bad)


@pytest.mark.parametrize("strategy", ["pf2lora", "feddpa", "local"])
def test_personalized_strategies_need_a_local_test_split(tiny_raw, strategy):
    tiny_raw["strategy"] = {"name": strategy}
    with pytest.raises(ScenarioError, match="local_test_fraction"):
        scenario_from_dict(tiny_raw)


def test_local_only_uploads_nothing_and_keeps_the_global_state():
    from fedsim.errors import AggregationError
    from fedsim.types import ClientUpdate, ModuleShape

    strategy = make_strategy("local")
    state = strategy.init_state(StrategySpec({"m.q_proj": ModuleShape(6, 5)}, LORA, 0))
    payload = strategy.configure(None, state, [ClientSpec(0, 10, LORA)])[0]
    assert payload.tensors == {} and strategy.download_cost(payload) == (0, 0)
    assert not any(strategy.is_shared(k) for k in state.tensors)
    new = strategy.aggregate(None, state, [ClientUpdate(0, 10, LORA, {})])
    assert all(torch.equal(new.tensors[k], v) for k, v in state.tensors.items())
    with pytest.raises(AggregationError, match="upload nothing"):
        strategy.aggregate(None, state, [ClientUpdate(0, 10, LORA, dict(state.tensors))])


def test_pf2lora_computes_its_bilevel_step_under_bf16_autocast(tiny_raw):
    """training.autocast reaches PF2LoRA's own loop (it once trained in float32 whatever the scenario said): the
    same step in bf16 differs from float32 by rounding only."""
    tiny_raw["training"]["local_steps"] = 2
    data = None
    out = {}
    for cast in (False, True):
        tiny_raw["training"]["autocast"] = cast
        sc = _tiny(tiny_raw, "pf2lora", inner_lr=0.5)
        data = data or load_data(sc)
        spec = StrategySpec(target_shapes(sc.model), LORA, 0)
        client = ClientSpec(5, 30, LORA)
        payload = Server("pf2lora", {"inner_lr": 0.5}, spec).configure(RoundContext(1, 3, 0), [client])[0][5]
        res, up = Worker(sc, data).run_client(ClientJob(client, np.arange(30), 1), payload)
        out[cast] = (res.metrics["train/loss"], up.tensors)
    assert out[True][0] == pytest.approx(out[False][0], rel=HALF_TRAINING) and out[True][0] != out[False][0]
    assert all(v.dtype == torch.float32 for v in out[True][1].values())
