"""One conformance suite for every registered strategy, plus property tests of each method's math."""

from __future__ import annotations

import copy

import pytest
import torch
from tolerances import F32_ALGEBRA, F32_SVD

from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.objectives.tail import TailRegularizer
from fedsim.strategies import StrategySpec, available_strategies, make_strategy
from fedsim.types import ClientSpec, ClientUpdate, LoraSpec, ModuleShape, RoundContext

SHAPES = {"m.q_proj": ModuleShape(d_in=6, d_out=5), "m.up_proj": ModuleShape(d_in=6, d_out=9)}
CTX = RoundContext(server_round=1, num_rounds=3, seed=0)
ALL = sorted(available_strategies())
MIXED = [n for n in ALL if available_strategies()[n].supports_mixed_ranks]
AGGREGATING = [n for n in ALL if available_strategies()[n].aggregates]  # all but the local-only baseline


def _random_adapter(lora: LoraSpec, seed: int, shapes=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, s in (shapes or SHAPES).items():
        out[ops.a_key(m)] = torch.randn(lora.rank, s.d_in, generator=g)
        out[ops.b_key(m)] = torch.randn(s.d_out, lora.rank, generator=g)
    return out


def _family_shapes(family: str) -> dict[str, ModuleShape]:
    """The adapted layers of a model family's tiny stand-in (GPT-2's Conv1D: c_attn 32 → 96, c_fc 32 → 128, ...;
    RoBERTa's query and value under a sequence-classification head)."""
    if family == "llama":
        return SHAPES
    from conftest import GPT2, ROBERTA

    from fedsim.config import ModelConfig
    from fedsim.models.base import target_shapes
    from fedsim.models.tasks import task_for

    cfg = ModelConfig(**(GPT2 if family == "gpt2" else ROBERTA))
    task = task_for(cfg)
    return target_shapes(cfg, task.classes[0], task.head_names)


def _round(name: str, specs: list[ClientSpec], params: dict | None = None, seed: int = 0, shapes=None):
    """configure → simulate local training (random adapters of each payload's shape) → updates."""
    strategy = make_strategy(name, params)
    top = max(specs, key=lambda c: (c.lora.rank, c.lora.alpha)).lora
    state = strategy.init_state(StrategySpec(shapes or SHAPES, top, seed=0))
    payloads = strategy.configure(CTX, state, specs)
    updates = []
    for c in specs:
        p = payloads[c.client_id]
        trained = _random_adapter(p.lora, seed * 1000 + c.client_id, shapes)
        if "A" not in p.trainable:  # frozen A keeps the payload's value
            trained.update({k: v.clone() for k, v in p.tensors.items() if ops.factor_of(k) == "A"})
        shared = {k: v for k, v in trained.items() if strategy.is_shared(k)}
        updates.append(ClientUpdate(c.client_id, c.num_examples, p.lora, shared))
    return strategy, state, payloads, updates


def _uniform(n: int = 3, rank: int = 2, alpha: float = 4.0) -> list[ClientSpec]:
    return [ClientSpec(i, 10 * (i + 1), LoraSpec(rank, alpha)) for i in range(n)]


def _mixed() -> list[ClientSpec]:
    return [ClientSpec(0, 10, LoraSpec(1, 2.0)), ClientSpec(1, 30, LoraSpec(3, 3.0)),
            ClientSpec(2, 25, LoraSpec(2, 8.0, rslora=True)), ClientSpec(3, 5, LoraSpec(4, 1.0))]


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ conformance


@pytest.mark.parametrize("family", ["llama", "gpt2", "roberta"])
@pytest.mark.parametrize("name", ALL)
def test_no_input_mutation_and_determinism(name, family):
    strategy, state, _, updates = _round(name, _uniform(), shapes=_family_shapes(family))
    before_state = copy.deepcopy(state.tensors), copy.deepcopy(state.extras), list(state.base_deltas)
    before_updates = copy.deepcopy([u.tensors for u in updates])
    a = strategy.aggregate(CTX, state, updates)
    b = make_strategy(name).aggregate(CTX, state, updates)
    assert _equal(state.tensors, before_state[0]) and state.extras == before_state[1]
    assert len(state.base_deltas) == len(before_state[2])
    assert all(_equal(u.tensors, t) for u, t in zip(updates, before_updates))
    assert _equal(a.tensors, b.tensors) and len(a.base_deltas) == len(b.base_deltas)
    assert all(_equal(x, y) for x, y in zip(a.base_deltas, b.base_deltas))


@pytest.mark.parametrize("name", ALL)
def test_partial_participation_and_single_client(name):
    clients = _uniform(5)
    strategy, state, payloads, updates = _round(name, clients[1:3])
    assert set(payloads) == {1, 2}
    new = strategy.aggregate(CTX, state, updates)
    assert all(torch.isfinite(t).all() for t in new.tensors.values())
    strategy, state, _, updates = _round(name, clients[4:])
    one = strategy.aggregate(CTX, state, updates)
    assert all(torch.isfinite(t).all() for t in one.tensors.values())


@pytest.mark.parametrize("name", AGGREGATING)
def test_weighting_changes_the_result(name):
    """num_examples matters (HETLoRA weighs by update norms, FedDPA equally, as their authors do): reweighting
    clients changes the aggregate."""
    strategy, state, _, updates = _round(name, _uniform())
    a = strategy.aggregate(CTX, state, updates)
    heavy = [ClientUpdate(u.client_id, 1000 if u.client_id == 0 else u.num_examples, u.lora, u.tensors)
             for u in updates]
    b = strategy.aggregate(CTX, state, heavy)
    moved = not _equal(a.tensors, b.tensors) or not all(
        _equal(x, y) for x, y in zip(a.base_deltas, b.base_deltas))
    assert moved == (name not in ("hetlora", "feddpa"))


@pytest.mark.parametrize("name", AGGREGATING)
def test_mismatched_update_raises(name):
    strategy, state, _, updates = _round(name, _uniform())
    broken = copy.deepcopy(updates)
    broken[1].tensors.pop(sorted(broken[1].tensors)[0])
    with pytest.raises(AggregationError):
        strategy.aggregate(CTX, state, broken)
    with pytest.raises(AggregationError):
        strategy.aggregate(CTX, state, [])


@pytest.mark.parametrize("family", ["llama", "gpt2", "roberta"])
@pytest.mark.parametrize("name", ALL)
def test_mixed_ranks_supported_or_refused(name, family):
    shapes = _family_shapes(family)
    if name in MIXED:
        strategy, state, payloads, updates = _round(name, _mixed(), shapes=shapes)
        for c in _mixed():
            p = payloads[c.client_id]
            assert all((t.shape[0] if ops.factor_of(k) == "A" else t.shape[1]) == c.lora.rank
                       for k, t in p.tensors.items())
        strategy.aggregate(CTX, state, updates)
    else:
        with pytest.raises(AggregationError):
            _round(name, _mixed(), shapes=shapes)


# ------------------------------------------------------------------------------------------------ streaming

STREAMING = [n for n in AGGREGATING if available_strategies()[n].streams]
WIDE = {"m.q_proj": ModuleShape(d_in=48, d_out=64), "m.up_proj": ModuleShape(d_in=6, d_out=8)}


def _products(tensors: dict, deltas: list) -> dict:
    """What a state means, free of a factorization's gauge: every module's B A, and every base delta's."""
    out = {m: tensors[ops.b_key(m)].double() @ tensors[ops.a_key(m)].double() for m in ops.modules(tensors)
           if ops.b_key(m) in tensors and ops.a_key(m) in tensors}
    for i, d in enumerate(deltas):
        for m in ops.delta_modules(d):
            out[f"{i}:{m}"] = (d[f"{m}.delta_W"] if f"{m}.delta_W" in d
                               else d[f"{m}.delta_B"].double() @ d[f"{m}.delta_A"].double()).double()
    return out


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖x − y‖ / ‖x‖ in float64."""
    x, y = x.double(), y.double()
    return float((x - y).norm() / x.norm().clamp_min(1e-30))


def _close(a, b, factors: bool = True) -> None:
    """Equal to ``F32_ALGEBRA`` relative (Frobenius): the products, and the factors themselves — unless they are a
    singular form: its gauge may turn with rounding, and its float32 factors alone reconstruct a dense ΔW to ~7e-7
    each (measured), so only the products are compared, to ``F32_SVD``."""
    for k in a.tensors if factors else ():
        assert a.tensors[k].dtype == b.tensors[k].dtype and _rel(a.tensors[k], b.tensors[k]) <= F32_ALGEBRA, k
    pa, pb = _products(a.tensors, a.base_deltas), _products(b.tensors, b.base_deltas)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert _rel(pa[k], pb[k]) <= (F32_ALGEBRA if factors else F32_SVD), k


@pytest.mark.parametrize("clients", [4, 40])
@pytest.mark.parametrize("name", STREAMING)
def test_streamed_aggregation_is_order_free_and_partials_merge_to_it(name, clients):
    """Folding the updates one at a time in any order, or folding disjoint groups into partials merged in any order
    (workers' partials), gives the aggregate of the updates in client-id order to F32_ALGEBRA (float32). 4 clients keep
    the stacking methods' factors stacked on the wide layer; 40 make them dense and flush product sums often."""
    import random

    rng = random.Random(clients)
    mixed = name in MIXED
    specs = [ClientSpec(i, rng.randint(1, 50), LoraSpec(rng.randint(1, 4) if mixed else 2, 4.0)) for i in range(clients)]
    strategy, state, _, updates = _round(name, specs, shapes=WIDE)
    reference = strategy.aggregate(CTX, state, updates)
    for _ in range(3):
        order = rng.sample(updates, len(updates))
        acc = strategy.begin(CTX, state)
        for u in order:
            strategy.fold(CTX, state, acc, u)
        _close(reference, strategy.finish(CTX, state, acc), factors=name != "flexlora")
        cuts = sorted(rng.sample(range(1, len(order)), 2))
        parts = []
        for group in (order[:cuts[0]], order[cuts[0]:cuts[1]], order[cuts[1]:]):
            parts.append(strategy.begin(CTX, state))
            for u in group:
                strategy.fold(CTX, state, parts[-1], u)
        rng.shuffle(parts)
        merged = parts[0].merge(parts[1]).merge(parts[2])
        assert sorted(merged.clients) == [u.client_id for u in updates]
        _close(reference, strategy.finish(CTX, state, merged), factors=name != "flexlora")


def test_a_partial_of_another_round_or_base_version_and_a_client_twice_are_refused():
    strategy, state, _, updates = _round("fedit", _uniform())
    acc = strategy.begin(CTX, state)
    strategy.fold(CTX, state, acc, updates[0])
    with pytest.raises(AggregationError, match="twice"):
        strategy.fold(CTX, state, acc, updates[0])
    late = strategy.begin(RoundContext(server_round=2, num_rounds=3, seed=0), state)
    with pytest.raises(AggregationError, match="round 2"):
        acc.merge(late)


def test_a_strategy_must_say_how_it_aggregates():
    from fedsim.strategies import Strategy

    with pytest.raises(TypeError, match="implement fold and finish"):
        type("Half", (Strategy,), {"streams": True, "init_state": None, "configure": None})
    lazy = type("Lazy", (Strategy,), {"init_state": lambda *a: None, "configure": lambda *a: None})()
    with pytest.raises(NotImplementedError, match="neither aggregate nor fold"):
        lazy.aggregate(CTX, None, [])


# ------------------------------------------------------------------------------------------------ the math


def _exact(updates, module):
    p = ops.normalized_weights(u.num_examples for u in updates)
    return sum(float(p[k]) * ops.delta_w(u.tensors, module, u.lora.scaling) for k, u in enumerate(updates))


def _merged(state, module):
    total = torch.zeros(SHAPES[module].d_out, SHAPES[module].d_in)
    for d in state.base_deltas:
        total += d[f"{module}.delta_W"] if f"{module}.delta_W" in d else d[f"{module}.delta_B"] @ d[f"{module}.delta_A"]
    return total


@pytest.mark.parametrize("seed", range(5))
def test_flora_stacking_is_exact_for_any_mix(seed):
    specs = _mixed()[: 2 + seed % 3]
    strategy, state, _, updates = _round("flora", specs, seed=seed)
    new = strategy.aggregate(CTX, state, updates)
    assert new.base_version == 1
    for m in SHAPES:
        torch.testing.assert_close(_merged(new, m), _exact(updates, m), atol=F32_ALGEBRA, rtol=F32_ALGEBRA)


@pytest.mark.parametrize("seed", range(3))
def test_fedex_global_model_is_exact(seed):
    strategy, state, _, updates = _round("fedex", _uniform(4, rank=3, alpha=5.0), seed=seed)
    new = strategy.aggregate(CTX, state, updates)
    for m in SHAPES:
        model = _merged(new, m) + ops.delta_w(new.tensors, m, new.lora.scaling)  # base update + global adapter
        torch.testing.assert_close(model, _exact(updates, m), atol=F32_ALGEBRA, rtol=F32_ALGEBRA)
        # nn.Linear orientation: the residual is (d_out, d_in), not transposed
        assert new.base_deltas[0][f"{m}.delta_W"].shape == (SHAPES[m].d_out, SHAPES[m].d_in)


def test_ffa_is_exact_and_sends_b_only():
    strategy, state, payloads, updates = _round("ffa", _uniform(3))
    assert all(ops.factor_of(k) == "B" for u in updates for k in u.tensors)
    assert payloads[0].trainable == ("B",)
    new = strategy.aggregate(CTX, state, updates)
    full = [ClientUpdate(u.client_id, u.num_examples, u.lora, {**u.tensors, **{k: v for k, v in state.tensors.items()
                                                                              if ops.factor_of(k) == "A"}})
            for u in updates]
    for m in SHAPES:
        torch.testing.assert_close(ops.delta_w(new.tensors, m, new.lora.scaling), _exact(full, m), atol=F32_ALGEBRA, rtol=F32_ALGEBRA)
    params, _ = strategy.download_cost(payloads[0])
    assert params == sum(s.d_out * 2 for s in SHAPES.values())


def test_flexlora_truncation_is_the_best_rank_r_approximation():
    specs = _mixed()
    strategy, state, _, updates = _round("flexlora", specs, seed=1)
    new = strategy.aggregate(CTX, state, updates)
    for m in SHAPES:  # the global state holds ΔW = Σ p_k s_k B_k A_k exactly
        torch.testing.assert_close(ops.delta_w(new.tensors, m, new.lora.scaling), _exact(updates, m), atol=F32_ALGEBRA, rtol=F32_ALGEBRA)
    payloads = strategy.configure(RoundContext(2, 3, 0), new, specs)
    for c in specs:
        p = payloads[c.client_id]
        for m in SHAPES:
            target = _exact(updates, m)
            got = ops.delta_w(p.tensors, m, c.lora.scaling)
            u, s, vh = torch.linalg.svd(target.double())
            r = c.lora.rank
            best = (u[:, :r] * s[:r]) @ vh[:r]
            torch.testing.assert_close(got.double(), best, atol=F32_SVD, rtol=F32_SVD)
            # Eckart–Young: the error equals the norm of the discarded singular values
            assert abs(float((target.double() - got.double()).norm()) - float(s[r:].norm())) < F32_SVD


def test_flexlora_a_larger_rank_than_the_update_still_trains_every_component():
    """A rank-1 round, then a rank-4 client: its extra components are orthonormal directions of A with zero columns
    of B (a full SVD's), so each gets a gradient — not zero rows and columns that never move."""
    strategy, state, _, updates = _round("flexlora", [ClientSpec(0, 10, LoraSpec(1, 2.0))], seed=4)
    new = strategy.aggregate(CTX, state, updates)
    big = ClientSpec(1, 10, LoraSpec(4, 8.0))
    p = strategy.configure(RoundContext(2, 3, 0), new, [big])[1]
    g = torch.Generator().manual_seed(0)
    for m, shape in SHAPES.items():
        a, b = p.tensors[ops.a_key(m)], p.tensors[ops.b_key(m)]
        torch.testing.assert_close(a @ a.T, torch.eye(4), atol=F32_SVD, rtol=0)  # orthonormal rows
        torch.testing.assert_close(ops.delta_w(p.tensors, m, big.lora.scaling), _exact(updates, m), atol=F32_SVD,
                                   rtol=F32_SVD)  # still the best rank-4 approximation (ΔW itself: rank 1)
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        x, gy = torch.randn(16, shape.d_in, generator=g), torch.randn(16, shape.d_out, generator=g)
        ((x @ a.T @ b.T) * big.lora.scaling * gy).sum().backward()
        per_component = b.grad.norm(dim=0) + a.grad.norm(dim=1)
        assert (per_component > 1e-6).all(), per_component


def test_hetlora_truncation_padding_and_norm_weights():
    specs = _mixed()
    strategy, state, payloads, updates = _round("hetlora", specs, seed=2)
    r_max = max(c.lora.rank for c in specs)
    assert state.lora.rank == r_max and state.lora.scaling == 1.0
    new = strategy.aggregate(CTX, state, updates)
    scaled = [ops.scale_b(u.tensors, u.lora.scaling) for u in updates]
    norms = torch.tensor([sum(float(ops.delta_w(t, m, 1.0).norm() ** 2) for m in SHAPES) ** 0.5 for t in scaled])
    w = norms / norms.sum()
    for k in new.tensors:
        expect = sum(float(w[i]) * ops.pad_rank(scaled[i], r_max)[k] for i in range(len(updates)))
        torch.testing.assert_close(new.tensors[k], expect, atol=F32_ALGEBRA, rtol=F32_ALGEBRA)
    # a client receives the first r_k components, rescaled so that s_k B A equals the global truncation
    nxt = strategy.configure(RoundContext(2, 3, 0), new, specs)
    for c in specs:
        for m in SHAPES:
            got = ops.delta_w(nxt[c.client_id].tensors, m, c.lora.scaling)
            want = ops.delta_w(ops.truncate_rank(new.tensors, c.lora.rank), m, 1.0)
            torch.testing.assert_close(got, want, atol=F32_SVD, rtol=F32_SVD)


def test_hetlora_pruning_lowers_the_rank_next_round():
    specs = [ClientSpec(0, 10, LoraSpec(4, 8.0)), ClientSpec(1, 10, LoraSpec(2, 4.0))]
    strategy, state, payloads, updates = _round("hetlora", specs, params={"prune_lambda": 0.1, "prune_gamma": 0.5})
    assert payloads[0].objectives == (TailRegularizer(lam=0.1, start=2),)
    updates[0].metrics["hetlora/rank"] = 2.0  # the client's tail norm shrank during training
    new = strategy.aggregate(CTX, state, updates)
    nxt = strategy.configure(RoundContext(2, 3, 0), new, specs)
    assert nxt[0].lora.rank == 2 and nxt[1].lora.rank == 2


def test_hetlora_default_gamma_prunes_every_rank_from_two():
    """The paper's tail starts at ⌊γ r⌋: with the default γ = 0.9 it holds a component for ranks 2, 3, 4 and 5
    (⌈γ r⌉ left it empty for every rank ≤ 9, so nothing could prune)."""
    specs = [ClientSpec(i, 10, LoraSpec(r, 2.0 * r)) for i, r in enumerate([1, 2, 3, 4, 5])]
    strategy, _, payloads, _ = _round("hetlora", specs, params={"prune_lambda": 0.1})
    assert payloads[0].objectives == ()  # rank 1 cannot shrink
    for c in specs[1:]:
        start = payloads[c.client_id].objectives[0].start
        assert 1 <= start < c.lora.rank and start == int(0.9 * c.lora.rank)


@pytest.mark.parametrize("keep", [False, True])
def test_hetlora_components_no_client_had_this_round(keep):
    """Zero-padding (the paper's aggregation) zeroes the components above the round's largest rank;
    keep_untrained keeps their previous global values."""
    specs = [ClientSpec(0, 10, LoraSpec(4, 8.0)), ClientSpec(1, 10, LoraSpec(2, 4.0))]
    strategy, state, _, updates = _round("hetlora", specs, params={"keep_untrained": keep})
    first = strategy.aggregate(CTX, state, updates)
    small = [specs[1]]
    payloads = strategy.configure(RoundContext(2, 3, 0), first, small)
    upd = [ClientUpdate(1, 10, payloads[1].lora, _random_adapter(payloads[1].lora, 77))]
    second = strategy.aggregate(RoundContext(2, 3, 0), first, upd)
    for m in SHAPES:
        a, b = second.tensors[ops.a_key(m)], second.tensors[ops.b_key(m)]
        if keep:
            torch.testing.assert_close(a[2:], first.tensors[ops.a_key(m)][2:], atol=0, rtol=0)
            torch.testing.assert_close(b[:, 2:], first.tensors[ops.b_key(m)][:, 2:], atol=0, rtol=0)
            assert float(first.tensors[ops.b_key(m)][:, 2:].norm()) > 0
        else:
            assert float(a[2:].norm()) == 0 and float(b[:, 2:].norm()) == 0


def test_fedit_error_is_what_flora_removes():
    """On the same updates, FedIT's product of averages misses Σ p_k s B_k A_k; FLoRA hits it."""
    specs = _uniform(4, rank=2, alpha=4.0)
    _, st_fedit, _, updates = _round("fedit", specs, seed=3)
    fedit = make_strategy("fedit").aggregate(CTX, st_fedit, updates)
    flora_s = make_strategy("flora")
    flora = flora_s.aggregate(CTX, flora_s.init_state(StrategySpec(SHAPES, specs[0].lora, 0)), updates)
    for m in SHAPES:
        exact = _exact(updates, m)
        assert float((ops.delta_w(fedit.tensors, m, 2.0) - exact).norm()) > 1e-2
        torch.testing.assert_close(_merged(flora, m), exact, atol=F32_ALGEBRA, rtol=F32_ALGEBRA)


def test_lowrank_svd_matches_dense():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(9, 3, generator=g), torch.randn(3, 7, generator=g)
    u, s, vh = ops.lowrank_svd(b, a)
    torch.testing.assert_close((u * s) @ vh, b @ a, atol=F32_SVD, rtol=F32_SVD)
    torch.testing.assert_close(s, torch.linalg.svdvals(b @ a)[:3], atol=F32_SVD, rtol=F32_SVD)


def test_per_module_gives_the_loops_results_in_order_and_raises_what_a_module_raises():
    """FlexLoRA decomposes its modules on torch's threads side by side, one thread each (#50 point 6): the factors of
    one module after another on one thread, in the modules' order; torch's thread count restored; a module that fails
    fails the call."""
    g = torch.Generator().manual_seed(0)
    dense = [torch.randn(24, 40 if i % 2 else 16, generator=g) for i in range(7)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        side_by_side = ops.per_module(ops.dense_singular_form, dense)
        with pytest.raises(AggregationError, match="module 3"):
            ops.per_module(lambda i: (_ for _ in ()).throw(AggregationError(f"module {i}")) if i == 3 else i, range(6))
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        for (u, sv), d in zip(side_by_side, dense):
            u0, sv0 = ops.dense_singular_form(d)
            assert torch.equal(u, u0) and torch.equal(sv, sv0)
    finally:
        torch.set_num_threads(threads)


def test_product_norms_sq_batches_the_modules_of_each_shape_to_the_sum_of_their_norms():
    """HETLoRA's weight ‖s B A‖_F over all modules (#50 point 6): the batched Gram products give Σ ‖B A‖_F² of the
    modules one at a time, and the dense products' norm, to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (d_out, d_in) in enumerate([(12, 8), (12, 8), (20, 8), (8, 20), (12, 8)]):
        tensors[ops.b_key(f"m{i}")] = torch.randn(d_out, 3, generator=g)
        tensors[ops.a_key(f"m{i}")] = torch.randn(3, d_in, generator=g)
    one_by_one = sum(float(((b.T @ b) * (a @ a.T)).sum()) for b, a in
                     ((tensors[ops.b_key(m)], tensors[ops.a_key(m)]) for m in ops.modules(tensors)))
    dense = sum(float((tensors[ops.b_key(m)].double() @ tensors[ops.a_key(m)].double()).norm() ** 2)
                for m in ops.modules(tensors))
    assert ops.product_norms_sq(tensors) == pytest.approx(one_by_one, rel=F32_ALGEBRA)
    assert ops.product_norms_sq(tensors) == pytest.approx(dense, rel=F32_ALGEBRA)


# ------------------------------------------------------------------------------------------------ compression

@pytest.mark.parametrize("name", ALL)
def test_every_strategy_takes_compressed_uploads_or_says_why(name):
    """A strategy that declares ``takes_compressed`` aggregates int8 uploads (changes from each client's payload,
    stochastically rounded) into what the raw uploads give, to the codec's error, and counts their wire bytes; one
    that does not names why (the local baseline: it uploads nothing)."""
    from dataclasses import replace

    from fedsim.pipeline.compression import Codec, CompressUpload
    from fedsim.pipeline.transforms import TransformContext

    mixed = name in MIXED
    specs = [ClientSpec(i, 10 + i, LoraSpec(1 + i % 3 if mixed else 2, 4.0)) for i in range(6)]
    strategy, state, payloads, updates = _round(name, specs, shapes=WIDE)
    refused = strategy.compression_refusal(False)
    if not strategy.takes_compressed:
        assert refused is not None and name in refused
        return
    assert refused is None
    codec = Codec("int8", block_size=64)
    t = CompressUpload(codec)
    sent = []
    for u in updates:
        start = {k: v for k, v in payloads[u.client_id].tensors.items() if k in u.tensors}
        out = t(u.tensors, TransformContext(0, 1, u.client_id, 1, start))
        sent.append(replace(u, tensors=out.tensors, wire=out.wire))
        assert strategy.upload_cost(sent[-1]) == (ops.num_params(u.tensors),
                                                  sum(codec.wire_bytes(v.numel()) for v in u.tensors.values()))
    exact, approx = strategy.aggregate(CTX, state, updates), strategy.aggregate(CTX, state, sent)
    pa, pb = _products(exact.tensors, exact.base_deltas), _products(approx.tensors, approx.base_deltas)
    if not pa:  # FedSA-LoRA's state: A alone
        pa, pb = exact.tensors, approx.tensors
    assert sorted(pa) == sorted(pb)
    rel = {k: _rel(pa[k], pb[k]) for k in pa}  # int8 of N(0, 1) changes: a step of ~range/255
    assert 0 < max(rel.values()) < 0.03, rel


@pytest.mark.parametrize("name", ALL)
def test_every_strategy_runs_asynchronously_or_says_why(name):
    """The averaging strategies declare ``runs_async``; the stacking, SVD, residual and norm-weighted ones, and the
    local baseline, each name what needs a synchronous round."""
    strategy = make_strategy(name)
    why = strategy.async_refusal()
    assert (why is None) == (name in ("fedit", "ffa", "fedsa", "feddpa", "fedqlora", "pf2lora")), why
    if why is not None:
        assert why.startswith(f"strategy {name!r} ") and "declare" not in why  # a reason, not the default's
