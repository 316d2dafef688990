"""Server optimizers (Reddi et al. 2021) against the paper's formulas written out here in float64, over several
rounds; FedAvgM at η = 1, μ = 0 is the plain aggregate; what composes and what is refused."""

import math

import pytest
import torch
from tolerances import F32_ALGEBRA, F32_ELEMENTWISE

from fedsim.errors import ScenarioError
from fedsim.pipeline import ServerOptimizer
from fedsim.types import GlobalState, LoraSpec, RoundContext

LORA = LoraSpec(2, 4.0)
CTX = RoundContext(1, 5, 0)


def _reference(name, xs0, aggregates, lr, b1, b2, tau, mu):
    """The paper's Algorithm 2 (and FedAvgM), one scalar at a time, float64: the states x_1 … x_T."""
    out = []
    for i in range(len(xs0)):
        x, m, v, xs = xs0[i], 0.0, tau**2, []
        for agg in aggregates:
            d = agg[i] - x
            if name == "fedavgm":
                m = mu * m + d
                x = x + lr * m
            else:
                m = b1 * m + (1 - b1) * d
                if name == "fedadagrad":
                    v = v + d * d
                elif name == "fedadam":
                    v = b2 * v + (1 - b2) * d * d
                else:
                    v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
                x = x + lr * m / (math.sqrt(v) + tau)
            xs.append(x)
        out.append(xs)
    return out  # [element][round]


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_each_server_optimizer_follows_the_paper_over_rounds(name):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, generator=g)
    opt = ServerOptimizer(name, lr=0.3, beta1=0.8, beta2=0.95, tau=0.05, momentum=0.7)
    state = GlobalState(tensors={"m.lora_A.weight": x0.clone()}, lora=LORA)
    aggregates, xs = [], []
    for _ in range(5):  # the strategy's aggregate each round: the current state plus some client drift
        agg = state.tensors["m.lora_A.weight"] + torch.randn(3, 4, generator=g) * 0.5
        aggregates.append(agg.flatten().double().tolist())
        new = GlobalState(tensors={"m.lora_A.weight": agg}, lora=LORA)
        state, metrics = opt.after(CTX, state, new)
        xs.append(state.tensors["m.lora_A.weight"].flatten().double())
        assert metrics["server_opt/step_norm"] >= 0
    want = _reference(name, x0.flatten().double().tolist(), aggregates, 0.3, 0.8, 0.95, 0.05, 0.7)
    for r in range(5):
        got = xs[r]
        exp = torch.tensor([want[i][r] for i in range(12)], dtype=torch.float64)
        torch.testing.assert_close(got, exp, atol=F32_ALGEBRA, rtol=F32_ALGEBRA)
    assert opt.t == 5 and set(opt.state_dict()) == {"t", "m", "v"}


def test_fedavgm_without_momentum_at_lr_1_is_the_aggregate():
    g = torch.Generator().manual_seed(1)
    old = GlobalState(tensors={"k": torch.randn(4, 2, generator=g)}, lora=LORA)
    new = GlobalState(tensors={"k": torch.randn(4, 2, generator=g)}, lora=LORA)
    out, _ = ServerOptimizer("fedavgm", lr=1.0, momentum=0.0).after(CTX, old, new)
    torch.testing.assert_close(out.tensors["k"], new.tensors["k"], atol=F32_ELEMENTWISE, rtol=F32_ELEMENTWISE)


def test_the_state_round_trips():
    opt = ServerOptimizer("fedadam", lr=0.1)
    g = torch.Generator().manual_seed(2)
    s = GlobalState(tensors={"k": torch.randn(2, 2, generator=g)}, lora=LORA)
    for _ in range(2):
        s, _ = opt.after(CTX, s, GlobalState(tensors={"k": torch.randn(2, 2, generator=g)}, lora=LORA))
    other = ServerOptimizer("fedadam", lr=0.1)
    other.load_state_dict(opt.state_dict())
    nxt = GlobalState(tensors={"k": torch.randn(2, 2, generator=g)}, lora=LORA)
    a, _ = opt.after(CTX, s, nxt)
    b, _ = other.after(CTX, s, nxt)
    assert torch.equal(a.tensors["k"], b.tensors["k"]) and other.t == opt.t


@pytest.mark.parametrize("strategy", ["flora", "fedex", "flexlora", "local"])
def test_strategies_without_averaged_factors_are_refused(tiny_raw, strategy):
    from fedsim.config import scenario_from_dict

    tiny_raw["strategy"] = {"name": strategy, "server_optimizer": {"name": "fedadam", "lr": 0.01}}
    tiny_raw["eval"]["local_test_fraction"] = 0.2
    with pytest.raises(ScenarioError, match="strategy.server_optimizer: .*use it with one of .*fedit"):
        scenario_from_dict(tiny_raw)


@pytest.mark.parametrize("bad", ["beta1=1.0", "beta2=-0.1", "tau=0", "lr=0", "name=sgd"])
def test_bad_server_optimizer_settings_are_one_line(tiny_raw, bad):
    from fedsim.config import scenario_from_dict

    tiny_raw["strategy"] = {"name": "fedit", "server_optimizer": {"name": "fedadam"}}
    with pytest.raises(ScenarioError, match="strategy.server_optimizer"):
        scenario_from_dict(tiny_raw, [f"strategy.server_optimizer.{bad}"])


def test_the_proximal_term_and_its_gradient_are_fedprox():
    """μ (θ − θ0) joins the loss's gradient (trained one by one: on ``.grad``; packed, as views of a packed tensor:
    through the penalty μ/2 ‖θ − θ0‖²), against float64."""
    from fedsim.objectives.proximal import Proximal

    g = torch.Generator().manual_seed(3)
    params = {"a": torch.randn(3, 4, generator=g, requires_grad=True),
              "b": torch.randn(5, 3, generator=g, requires_grad=True),
              "frozen": torch.randn(2, 2, generator=g)}  # not trainable: not in the term
    bound = Proximal(mu=0.7).bind(lambda: params, LORA, 2.0)
    start = {k: v.detach().double().clone() for k, v in params.items()}
    with torch.no_grad():
        params["a"].add_(0.3)
        params["b"].mul_(1.5)
        params["frozen"].add_(10.0)
    assert bound.penalty() is None  # leaves: the term goes on the gradient
    loss_grad = {k: torch.randn(params[k].shape, generator=g) for k in ("a", "b")}
    for k, v in loss_grad.items():
        params[k].grad = v.clone()
    bound.after_backward()
    want = 0.35 * sum(((params[k].detach().double() - start[k]) ** 2).sum() for k in ("a", "b"))
    for k in ("a", "b"):
        torch.testing.assert_close(params[k].grad.double(), loss_grad[k].double() + 0.7 * (
            params[k].detach().double() - start[k]), atol=F32_ALGEBRA, rtol=F32_ALGEBRA)
    assert bound.finish()["fedprox/distance"] == pytest.approx(float((want / 0.35) ** 0.5), rel=F32_ALGEBRA)

    packed = torch.cat([params["a"].detach().reshape(-1), params["b"].detach().reshape(-1)]).requires_grad_()
    views = {"a": packed[:12].view(3, 4), "b": packed[12:].view(5, 3)}
    bound = Proximal(mu=0.7).bind(lambda: views, LORA, 2.0)
    bound.start = {k: start[k].float() for k in ("a", "b")}  # θ0 as above
    bound.after_backward()  # views have no .grad of their own: nothing to do here
    value = bound.penalty()
    value.backward()
    assert float(value) == pytest.approx(float(want), rel=F32_ALGEBRA)
    torch.testing.assert_close(packed.grad.double(), 0.7 * torch.cat(
        [(views[k].detach().double() - start[k]).reshape(-1) for k in ("a", "b")]), atol=F32_ALGEBRA, rtol=F32_ALGEBRA)
    with pytest.raises(ValueError, match="mu must be ≥ 0"):
        Proximal(mu=-1.0)
