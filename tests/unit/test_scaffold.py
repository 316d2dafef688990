"""SCAFFOLD (option II) against formulas of our own in float64: the corrected local steps, c_i⁺ and Δc_i, the
server's c and its global step size, and — on per-client quadratics with different curvatures — convergence to the
global optimum where FedAvg drifts."""

from __future__ import annotations

import pytest
import torch
from tolerances import F64, F64_CONVERGED

from fedsim.objectives import state_out, uploaded
from fedsim.objectives.scaffold import STATE_KEY, Scaffold, ScaffoldStage
from fedsim.types import ClientPayload, ClientUpdate, GlobalState, LoraSpec, RoundContext

A, B = "m.lora_A.weight", "m.lora_B.weight"
LORA = LoraSpec(2, 4.0)
CTX = RoundContext(server_round=1, num_rounds=1, seed=0)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_corrected_steps_and_option_ii_variates():
    x = {A: _rand(2, 3, seed=0), B: _rand(3, 2, seed=1)}
    c = {A: _rand(2, 3, seed=2), B: _rand(3, 2, seed=3)}
    c_i = {A: _rand(2, 3, seed=4), B: _rand(3, 2, seed=5)}
    target = {A: _rand(2, 3, seed=6), B: _rand(3, 2, seed=7)}
    lrs = [0.1, 0.05, 0.02, 0.08]  # a schedule: Σ η_t replaces K η_l

    # ours: plain SGD, the objective's hook after each step
    params = {k: torch.nn.Parameter(v.clone()) for k, v in x.items()}
    bound = Scaffold(c=c).bind(lambda: params, LORA, 1.0, {k: v.clone() for k, v in c_i.items()})
    opt = torch.optim.SGD(list(params.values()), lr=lrs[0])
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        loss = sum(((params[k] - target[k]) ** 4).sum() for k in params)  # a non-quadratic loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        bound.after_step(lr)
    metrics = bound.finish()

    # the paper's: y ← y − η (g(y) − c_i + c); c_i⁺ = c_i − c + (x − y) / Σ η
    y = {k: v.clone() for k, v in x.items()}
    for lr in lrs:
        y = {k: y[k] - lr * (4 * (y[k] - target[k]) ** 3 - c_i[k] + c[k]) for k in y}
    for k in x:
        assert torch.allclose(params[k].detach(), y[k], rtol=F64, atol=F64), k
        c_new = c_i[k] - c[k] + (x[k] - y[k]) / sum(lrs)
        assert torch.allclose(bound.state()[k], c_new, rtol=F64, atol=F64), k
        assert torch.allclose(bound.upload()[k], c_new - c_i[k], rtol=F64, atol=F64), k
    norm = sum(float(((c[k] - c_i[k]) ** 2).sum()) for k in c) ** 0.5
    assert metrics["scaffold/correction_norm"] == pytest.approx(norm, rel=F64)
    # the client keeps c_i⁺ under objective.scaffold.*, and uploads Δc_i under the same keys
    kept = state_out([Scaffold()], [bound])
    assert sorted(kept) == [f"objective.{STATE_KEY}.{A}", f"objective.{STATE_KEY}.{B}"]
    assert torch.equal(uploaded(STATE_KEY, state_out([Scaffold()], [bound], upload=True))[A], bound.upload()[A])


def test_a_first_visit_starts_from_zero_variates_and_untouched_keys_stay_untouched():
    params = {A: torch.nn.Parameter(_rand(2, 3, seed=0)), B: torch.nn.Parameter(_rand(3, 2, seed=1))}
    c = {B: _rand(3, 2, seed=2)}  # FFA: only the trained B has a variate
    before = {k: v.detach().clone() for k, v in params.items()}
    bound = Scaffold(c=c).bind(lambda: params, LORA, 1.0, None)
    bound.after_step(0.1)  # a step with no gradient: only the correction −η (c − c_i), c_i = 0
    bound.finish()
    assert torch.equal(params[A].detach(), before[A])
    assert torch.allclose(params[B].detach(), before[B] - 0.1 * c[B], atol=F64)
    assert sorted(bound.upload()) == [B]
    assert torch.allclose(bound.upload()[B], -c[B] + (0.1 * c[B]) / 0.1, atol=F64)  # Δc_i = −c + (x − y)/η
    assert torch.allclose(bound.state()[B], torch.zeros(3, 2, dtype=torch.float64), atol=F64)


def test_the_server_side():
    state = GlobalState(tensors={A: _rand(2, 3, seed=0), B: _rand(3, 2, seed=1)}, lora=LORA)
    stage = ScaffoldStage(server_lr=0.5, num_clients=10, is_shared=lambda k: True)
    # c goes to the clients, restricted to what the payload trains
    payload = ClientPayload(tensors=state.tensors, lora=LORA, trainable=("B",), objectives=(Scaffold(),))
    sent = stage.configure(CTX, state, payload)
    assert sorted(sent.objectives[0].c) == [B] and not sent.objectives[0].c[B].any()
    assert sent.objectives[0].carried() is sent.objectives[0].c
    deltas = [{A: _rand(2, 3, seed=10 + i), B: _rand(3, 2, seed=20 + i)} for i in range(3)]
    updates = [ClientUpdate(i, 5, LORA, {}, extra={f"objective.{STATE_KEY}.{k}": v for k, v in d.items()})
               for i, d in enumerate(deltas)]
    bad = ClientUpdate(9, 5, LORA, {}, extra={f"objective.{STATE_KEY}.{A}": torch.full((2, 3), float("nan"))})
    kept = stage.before(CTX, state, [*updates, bad])
    assert [u.client_id for u in kept.updates] == [0, 1, 2] and "NaN" in kept.rejected[9]
    aggregate = GlobalState(tensors={k: v + 1.0 for k, v in state.tensors.items()}, lora=LORA)
    new, metrics = stage.after(CTX, state, aggregate)
    for k in state.tensors:  # x ← x + η_g (x̄ − x); c ← c + (1/N) Σ Δc_i
        assert torch.allclose(new.tensors[k], state.tensors[k] + 0.5, atol=F64)
        assert torch.allclose(stage.c[k], sum(d[k] for d in deltas) / 10, atol=F64)
    assert metrics["scaffold/c_norm"] == pytest.approx(sum(float((v**2).sum()) for v in stage.c.values()) ** 0.5)
    again = ScaffoldStage(server_lr=0.5, num_clients=10, is_shared=lambda k: True)
    again.load_state_dict(stage.state_dict())
    assert all(torch.equal(again.c[k], stage.c[k]) for k in stage.c)
    assert torch.equal(again.configure(CTX, state, payload).objectives[0].c[B], stage.c[B])


def _federate(hessians, optima, rounds, steps, lr, scaffold):
    """Full participation on f_i(x) = ½ (x − b_i)ᵀ H_i (x − b_i), local SGD, equal-weight averaging."""
    n = len(hessians)
    x = {A: torch.zeros(1, 3, dtype=torch.float64)}
    stage = ScaffoldStage(server_lr=1.0, num_clients=n, is_shared=lambda k: True)
    kept = [None] * n
    for _ in range(rounds):
        state = GlobalState(tensors=x, lora=LORA)
        c = stage.configure(CTX, state, ClientPayload(tensors=x, lora=LORA, objectives=(Scaffold(),))).objectives[0].c
        trained, updates = [], []
        for i in range(n):
            p = {A: torch.nn.Parameter(x[A].clone())}
            bound = Scaffold(c=c).bind(lambda p=p: p, LORA, 1.0, kept[i]) if scaffold else None
            for _ in range(steps):
                with torch.no_grad():
                    p[A] -= lr * (p[A] - optima[i]) @ hessians[i]
                if bound:
                    bound.after_step(lr)
            trained.append(p[A].detach())
            if bound:
                bound.finish()
                kept[i] = bound.state()
                updates.append(ClientUpdate(i, 1, LORA, {}, extra={f"objective.{STATE_KEY}.{A}": bound.upload()[A]}))
        mean = GlobalState(tensors={A: sum(trained) / n}, lora=LORA)
        if scaffold:
            stage.before(CTX, state, updates)
            mean, _ = stage.after(CTX, state, mean)
        x = mean.tensors
    return x[A]


def test_scaffold_reaches_the_global_optimum_where_fedavg_drifts():
    hessians = [torch.diag(torch.tensor(h, dtype=torch.float64)) for h in ([1.0, 8.0, 0.5], [6.0, 0.5, 2.0],
                                                                           [0.3, 2.0, 7.0], [3.0, 1.0, 1.0])]
    optima = [_rand(1, 3, seed=s) * 3 for s in range(4)]
    best = torch.linalg.solve(sum(hessians), sum(h @ b.T for h, b in zip(hessians, optima))).T  # Σ H_i x = Σ H_i b_i
    fedavg = _federate(hessians, optima, rounds=300, steps=10, lr=0.05, scaffold=False)
    scaffold = _federate(hessians, optima, rounds=300, steps=10, lr=0.05, scaffold=True)
    assert float((scaffold - best).norm()) < F64_CONVERGED
    assert float((fedavg - best).norm()) > 0.05  # client drift: FedAvg's fixed point is not the optimum
