"""Differential privacy (#27 points 1–3, 6): clipping exact, the noise's standard deviation within a confidence
bound, adaptive clipping's update, ε against formulas written here, σ solved from a target ε, every averaging strategy
under central DP, refusals; Poisson sampling."""

import copy
import math

import numpy as np
import pytest
import torch
from tolerances import F32_ALGEBRA, F64, F64_LIBRARY

from fedsim.config import scenario_from_dict
from fedsim.errors import ScenarioError
from fedsim.lora import ops
from fedsim.pipeline.privacy import (
    RDP_ORDERS,
    CentralPrivacy,
    LocalAccounting,
    LocalPrivacy,
    PrivacyAccountant,
    effective_noise,
    epsilon,
    solve_noise,
)
from fedsim.pipeline.transforms import TransformContext
from fedsim.sampling import sample_clients
from fedsim.server import Server
from fedsim.strategies import StrategySpec, available_strategies, make_strategy
from fedsim.types import ClientSpec, ClientUpdate, GlobalState, LoraSpec, ModuleShape, RoundContext

LORA = LoraSpec(rank=2, alpha=4)
SHAPES = {"m.lora_A": (2, 3), "m.lora_B": (4, 2)}
ACC = PrivacyAccountant("central", 1.0, 0.5, 1e-3)


def ctx(r=1):
    return RoundContext(server_round=r, num_rounds=5, seed=0)


def state(value=0.1, shapes=SHAPES):
    return GlobalState(tensors={k: torch.full(s, value) for k, s in shapes.items()}, lora=LORA)


def updates(n, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(i, 10 * (i + 1), LORA, {k: 0.1 + scale * torch.randn(*s, generator=g)
                                                 for k, s in SHAPES.items()}) for i in range(n)]


def central(clip, sigma, denominator, **kw):
    return CentralPrivacy(clip, sigma, denominator, ACC, lambda k: True, **kw)


def apply(stage, ups, st=None, r=1):
    st = st or state()
    stage.before(ctx(r), st, ups)
    new, _ = stage.after(ctx(r), st, st) if ups else stage.idle(ctx(r), st, st)
    return new, stage.end_round(ctx(r), [u.client_id for u in ups])


def flat(tensors, minus=0.0):
    return np.concatenate([(tensors[k].double() - minus).numpy().ravel() for k in sorted(tensors)])


@pytest.mark.parametrize("clip", [1e6, 0.5])
def test_central_clipping_is_exact_against_a_float64_reference(clip):
    """x + Σ_k Δ_k·min(1, C/‖Δ_k‖) / D with the norm over every shared tensor together; uniform weights."""
    ups = updates(4)
    new, metrics = apply(central(clip, 0.0, 5.0), ups)
    deltas = [flat(u.tensors, 0.1) for u in ups]
    ref = 0.1 + sum(d * min(1.0, clip / np.linalg.norm(d)) for d in deltas) / 5.0
    np.testing.assert_allclose(flat(new.tensors), ref, rtol=F32_ALGEBRA)
    assert metrics["privacy/clipped"] == (0.0 if clip > 1e5 else 1.0)
    assert metrics["privacy/noise_std"] == 0.0 and metrics["privacy/clipping_norm"] == clip


def test_central_noise_has_standard_deviation_sigma_times_c_over_d():
    """Updates equal to the state: the change is the noise alone, N(0, (σC/D)²) per coordinate — its sample standard
    deviation within 6 standard errors (≈ σ_hat·/√(2n)), its mean within 6 standard errors; seeded per round."""
    shapes = {"w.lora_A": (200, 250), "w.lora_B": (100, 2)}
    st = state(0.0, shapes)
    same = [ClientUpdate(i, 1, LORA, {k: v.clone() for k, v in st.tensors.items()}) for i in range(3)]
    stage = CentralPrivacy(0.7, 1.5, 4.0, ACC, lambda k: True)
    new, metrics = apply(stage, same, st)
    z = flat(new.tensors)
    n, want = z.size, 1.5 * 0.7 / 4.0
    assert abs(z.std() - want) < 6 * want / math.sqrt(2 * n)
    assert abs(z.mean()) < 6 * want / math.sqrt(n)
    assert metrics["privacy/noise_std"] == pytest.approx(want)
    again, _ = apply(CentralPrivacy(0.7, 1.5, 4.0, ACC, lambda k: True), same, st)
    other, _ = apply(CentralPrivacy(0.7, 1.5, 4.0, ACC, lambda k: True), same, st, r=2)
    assert np.array_equal(flat(again.tensors), z) and not np.array_equal(flat(other.tensors), z)


def test_a_round_without_updates_still_adds_the_noise():
    new, metrics = apply(central(1.0, 2.0, 3.0), [])
    assert not torch.equal(new.tensors["m.lora_A"], state().tensors["m.lora_A"])
    assert metrics["privacy/epsilon"] == pytest.approx(ACC.epsilon(1))


def test_adaptive_clipping_follows_andrew_et_al():
    """C ← C·exp(−η(b̃ − γ)), b̃ = (#{‖Δ‖ ≤ C} + N(0, σ_b²))/D, the count's noise from (seed, round); the updates'
    multiplier (σ⁻² − (2σ_b)⁻²)^(−1/2); the clipping norm survives a resume."""
    ups = updates(4)
    norms = [np.linalg.norm(flat(u.tensors, 0.1)) for u in ups]
    stage = central(float(np.median(norms)), 1.0, 4.0, adaptive=(0.5, 0.2, 2.0))
    c = stage.clip
    for r in (1, 2, 3):
        within = sum(x <= c for x in norms)
        noise = np.random.default_rng([0, r, 53]).normal() * 2.0
        _, metrics = apply(stage, ups, r=r)
        assert metrics["privacy/clipping_norm"] == c
        c *= math.exp(-0.2 * ((within + noise) / 4.0 - 0.5))
        assert stage.clip == pytest.approx(c, rel=F64)
    assert stage.update_sigma == pytest.approx((1.0 - 1 / 16) ** -0.5)
    resumed = central(9.0, 1.0, 4.0, adaptive=(0.5, 0.2, 2.0))
    resumed.load_state_dict(stage.state_dict())
    assert resumed.clip == stage.clip
    with pytest.raises(ValueError, match="count_noise 0.4 must exceed"):
        effective_noise(1.0, 0.4)


def test_local_privacy_clips_and_noises_each_clients_change():
    start = {k: torch.full(s, 0.1) for k, s in SHAPES.items()}
    sent = {k: v + 3.0 for k, v in start.items()}
    c = TransformContext(seed=1, server_round=2, client_id=5, attempt=1, start=start)
    out, m = LocalPrivacy(0.5, 0.0)(sent, c)
    assert np.linalg.norm(flat(out, 0.1)) == pytest.approx(0.5) and m == {"privacy/clipped": 1.0}
    big = {"w": torch.zeros(400, 500)}
    noisy, m = LocalPrivacy(2.0, 0.8)(big, TransformContext(1, 2, 5, 1, {"w": torch.zeros(400, 500)}))
    z = noisy["w"].double().numpy()
    assert abs(z.std() - 1.6) < 6 * 1.6 / math.sqrt(2 * z.size) and m == {"privacy/clipped": 0.0}
    again, _ = LocalPrivacy(2.0, 0.8)(big, TransformContext(1, 2, 5, 1, {"w": torch.zeros(400, 500)}))
    retry, _ = LocalPrivacy(2.0, 0.8)(big, TransformContext(1, 2, 5, 2, {"w": torch.zeros(400, 500)}))
    assert torch.equal(again["w"], noisy["w"]) and not torch.equal(retry["w"], noisy["w"])


def rdp_subsampled_gaussian(q, sigma, alpha):
    """RDP of one step of the Poisson-subsampled Gaussian at an integer order (Mironov, Talwar & Zhang 2019, eq. 3):
    log(Σ_k C(α,k)(1−q)^(α−k) q^k exp((k²−k)/(2σ²)))/(α−1)."""
    logs = [math.log(math.comb(alpha, k)) + (alpha - k) * math.log(1 - q) + k * math.log(q)
            + (k * k - k) / (2 * sigma**2) for k in range(alpha + 1)]
    top = max(logs)
    return (top + math.log(sum(math.exp(x - top) for x in logs))) / (alpha - 1)


def eps_from_rdp(rdp, orders, delta):
    """RDP → (ε, δ) by Balle et al. 2020 (Opacus's conversion): min over α of
    RDP(α) + log((α−1)/α) − (log δ + log α)/(α−1)."""
    return min(r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1) for r, a in zip(rdp, orders))


@pytest.mark.parametrize("sigma, steps, delta", [(1.0, 10, 1e-5), (3.0, 200, 1e-3), (0.7, 1, 1e-2)])
def test_epsilon_equals_the_formulas_without_subsampling(sigma, steps, delta):
    """q = 1: the Gaussian mechanism's RDP is T·α/(2σ²) exactly (central at full participation, and local mode)."""
    want = eps_from_rdp([steps * a / (2 * sigma**2) for a in RDP_ORDERS], RDP_ORDERS, delta)
    assert epsilon(sigma, 1.0, steps, delta) == pytest.approx(want, rel=F64_LIBRARY)
    assert PrivacyAccountant("local", 2 * sigma, 1.0, delta).epsilon(steps) == pytest.approx(want, rel=F64_LIBRARY)


@pytest.mark.parametrize("q, sigma, steps", [(0.1, 1.0, 50), (0.375, 0.8, 3), (0.02, 1.5, 1000)])
def test_epsilon_with_subsampling_equals_the_integer_order_formula_and_opacus(q, sigma, steps):
    """At integer orders fedsim's ε is the closed-form subsampled-Gaussian RDP composed over the rounds; at all its
    orders it is what Opacus's RDP accountant says; PRV (a different, tighter analysis) is not above RDP."""
    from opacus.accountants import RDPAccountant

    ints = [a for a in RDP_ORDERS if float(a).is_integer() and a >= 2]
    mine = eps_from_rdp([steps * rdp_subsampled_gaussian(q, sigma, int(a)) for a in ints], ints, 1e-5)
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    assert acc.get_epsilon(1e-5, alphas=ints) == pytest.approx(mine, rel=F64_LIBRARY)
    full = RDPAccountant()
    full.history = [(sigma, q, steps)]
    assert epsilon(sigma, q, steps, 1e-5) == pytest.approx(full.get_epsilon(1e-5, alphas=RDP_ORDERS), rel=F64)
    assert epsilon(sigma, q, steps, 1e-5) <= mine + 1e-9
    assert epsilon(sigma, q, steps, 1e-5, "prv") <= epsilon(sigma, q, steps, 1e-5) * 1.01
    assert epsilon(0.0, q, steps, 1e-5) == math.inf and epsilon(sigma, q, 0, 1e-5) == 0.0


def test_the_noise_multiplier_is_solved_from_a_target_epsilon():
    sigma = solve_noise(2.0, 1e-5, 0.25, 20)
    assert epsilon(sigma, 0.25, 20, 1e-5) <= 2.0 < epsilon(sigma * 0.99, 0.25, 20, 1e-5)
    with pytest.raises(ValueError, match="cannot be reached in 100000 round"):
        solve_noise(1e-3, 1e-9, 1.0, 100_000)


def test_local_accounting_counts_every_release_per_client_and_resumes():
    acc = LocalAccounting(PrivacyAccountant("local", 1.0, 1.0, 1e-3))
    acc.end_round(ctx(1), [0, 1, 2])
    m = acc.end_round(ctx(2), [0, 1])
    assert m["privacy/epsilon"] == pytest.approx(epsilon(0.5, 1.0, 2, 1e-3))  # clients 0 and 1 sent twice
    again = LocalAccounting(acc.accountant)
    again.load_state_dict(acc.state_dict())
    assert again.sent == {"0": 2, "1": 2, "2": 1}


CONF = {"m.q_proj": ModuleShape(d_in=6, d_out=5), "m.up_proj": ModuleShape(d_in=6, d_out=9)}
AVERAGING = sorted(n for n, c in available_strategies().items() if c.averages_factors and c.clients_start_from_state)


@pytest.mark.parametrize("name", AVERAGING)
def test_every_averaging_strategy_under_central_dp_gets_the_clipped_mean_of_what_it_shares(name):
    """σ = 0, C large: the shared tensors become the uniform mean of the clients' shared tensors; what the strategy
    keeps besides them (FFA-LoRA's A, FedSA-LoRA's B...) is the strategy's own. Each client starts from the state's
    shared tensors (checked: the payload carries them as they are)."""
    strategy = make_strategy(name)
    specs = [ClientSpec(i, 10 * (i + 1), LoraSpec(2, 4.0)) for i in range(3)]
    server = Server(strategy, spec=StrategySpec(CONF, LoraSpec(2, 4.0), seed=0),
                    stages=[CentralPrivacy(1e9, 0.0, 3.0, ACC, strategy.is_shared)])
    st0 = server.state
    payloads = strategy.configure(ctx(), st0, specs)
    for p in payloads.values():
        assert all(torch.equal(p.tensors[k], st0.tensors[k]) for k in st0.tensors if strategy.is_shared(k))
    g = torch.Generator().manual_seed(4)
    ups = []
    for c in specs:
        trained = {k: v + torch.randn(v.shape, generator=g) for k, v in payloads[c.client_id].tensors.items()}
        ups.append(ClientUpdate(c.client_id, c.num_examples, c.lora,
                                {k: v for k, v in trained.items() if strategy.is_shared(k)}))
    plain = make_strategy(name)
    plain.init_state(StrategySpec(CONF, LoraSpec(2, 4.0), seed=0))
    own = plain.aggregate(ctx(), st0, ups)
    server.aggregate(ctx(), ups)
    shared = sorted(ups[0].tensors)
    assert shared and shared == sorted(k for k in st0.tensors if strategy.is_shared(k))
    for k in st0.tensors:
        want = torch.stack([u.tensors[k] for u in ups]).mean(0) if k in shared else own.tensors[k]
        torch.testing.assert_close(server.state.tensors[k], want, rtol=F32_ALGEBRA, atol=F32_ALGEBRA)
    assert any(ops.factor_of(k) for k in shared)


def scenario(tiny_raw, **privacy):
    raw = copy.deepcopy(tiny_raw)
    raw["privacy"] = {"clipping_norm": 1.0, "noise_multiplier": 1.0, **privacy}
    return raw


@pytest.mark.parametrize("privacy, other, match", [
    ({"clipping_norm": None}, {}, "noise needs a clipping norm"),
    ({"target_epsilon": 3.0}, {}, "not both"),
    ({"noise_multiplier": None}, {}, "give noise_multiplier"),
    ({"delta": 0.2}, {}, r"privacy.delta: δ = 0.2 is not below 1/N = 0.125"),
    ({}, {"clients": {"sampling": "size"}}, "size-weighted sampling"),
    ({}, {"strategy": {"name": "flora"}}, "strategy 'flora'.*stacks.*use privacy.mode: local"),
    ({}, {"strategy": {"name": "hetlora"}}, "strategy 'hetlora'.*rescaled, truncated copy.*privacy.mode: local"),
    ({}, {"strategy": {"name": "fedit", "robust": {"method": "median"}}}, "both replace the average"),
    ({}, {"strategy": {"name": "fedit", "client_objective": {"name": "scaffold"}}}, "control variates"),
    ({"mode": "local", "adaptive": {}}, {}, "adaptive clipping needs the server"),
    ({"adaptive": {}}, {}, r"count_noise: the clipped count's noise 0.15 must exceed noise_multiplier / 2 = 0.5"),
])
def test_bad_privacy_settings_are_one_line_errors(tiny_raw, privacy, other, match):
    raw = scenario(tiny_raw, **privacy)
    raw["privacy"] = {k: v for k, v in raw["privacy"].items() if v is not None}
    for section, value in other.items():
        raw[section] = {**raw.get(section, {}), **value}
    with pytest.raises(ScenarioError, match=match) as e:
        scenario_from_dict(raw)
    assert "\n" not in str(e.value)


def test_an_unreachable_target_epsilon_is_refused_before_round_one(tiny_raw):
    from fedsim.components import resolve

    raw = scenario(tiny_raw, target_epsilon=1e-4, delta=1e-9, noise_multiplier=None)
    del raw["privacy"]["noise_multiplier"]
    with pytest.raises(ScenarioError, match="privacy.target_epsilon: ε = 0.0001 .* cannot be reached"):
        resolve(scenario_from_dict(raw))


def test_poisson_sampling_draws_each_client_independently():
    counts = [len(sample_clients(100, 10, 7, r, poisson=True)) for r in range(1, 301)]
    assert len(set(counts)) > 5 and abs(np.mean(counts) - 10) < 6 * math.sqrt(9 / 300)
    assert sample_clients(100, 10, 7, 3, poisson=True) == sample_clients(100, 10, 7, 3, poisson=True)
