import numpy as np
import pytest
import torch
from tolerances import F32_ELEMENTWISE

from fedsim.config import scenario_from_dict
from fedsim.data.datasets import load_data
from fedsim.driver import split_local_test
from fedsim.errors import ScenarioError
from fedsim.lora import ops
from fedsim.models.base import target_shapes
from fedsim.runtime.worker import ClientJob, Worker
from fedsim.strategies import StrategySpec, make_strategy
from fedsim.types import ClientSpec, LoraSpec


def _fedsa(tiny_raw, **training):
    tiny_raw["strategy"] = {"name": "fedsa"}
    tiny_raw["eval"]["local_test_fraction"] = 0.2
    tiny_raw["training"].update(training)
    return scenario_from_dict(tiny_raw)


def test_personal_b_follows_the_client_across_workers_and_never_leaves_it(tiny_raw):
    sc = _fedsa(tiny_raw)
    data = load_data(sc)
    lora = LoraSpec(4, 8.0)
    state = make_strategy("fedsa").init_state(StrategySpec(target_shapes(sc.model), lora, 0))
    payload = make_strategy("fedsa").configure(None, state, [ClientSpec(5, 30, lora)])[5]
    assert all(ops.factor_of(k) == "A" for k in payload.tensors)  # B is never downloaded
    w1 = Worker(sc, data, "w1")
    res1, up1 = w1.run_client(ClientJob(ClientSpec(5, 30, lora), np.arange(30), 1), payload)
    assert all(ops.factor_of(k) == "A" for k in up1.tensors)  # nor uploaded
    assert res1.personal and all(ops.factor_of(k) == "B" for k in res1.personal)
    assert any(t.abs().sum() > 0 for t in res1.personal.values())  # B trained from its zero start
    # round 2 on another worker: with a negligible learning rate, B stays where round 1 left it
    frozen = Worker(_fedsa(tiny_raw, lr=1e-12), data, "w2")
    res2, _ = frozen.run_client(ClientJob(ClientSpec(5, 30, lora), np.arange(30), 2, personal=res1.personal), payload)
    for k, v in res1.personal.items():
        torch.testing.assert_close(res2.personal[k], v, atol=F32_ELEMENTWISE, rtol=0)
    fresh, _ = frozen.run_client(ClientJob(ClientSpec(5, 30, lora), np.arange(30), 2), payload)
    assert all(t.abs().max() < F32_ELEMENTWISE for t in fresh.personal.values())  # without its state: B = 0 again



def test_local_test_split_is_disjoint_seeded_and_refuses_empty_training():
    parts = [np.arange(0, 10), np.arange(10, 30)]
    train, test = split_local_test(parts, 0.2, seed=1)
    again, _ = split_local_test(parts, 0.2, seed=1)
    for p, tr, te in zip(parts, train, test):
        assert len(te) == max(1, round(0.2 * len(p))) and set(tr).isdisjoint(te) and set(tr) | set(te) == set(p)
    assert all(np.array_equal(a, b) for a, b in zip(train, again))
    with pytest.raises(ScenarioError, match="nothing would be left"):
        split_local_test([np.arange(1)], 0.5, seed=0)


def test_personalized_strategy_needs_a_local_test_split(tiny_raw):
    tiny_raw["strategy"] = {"name": "fedsa"}
    with pytest.raises(ScenarioError, match="local_test_fraction"):
        scenario_from_dict(tiny_raw)
