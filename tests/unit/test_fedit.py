import copy

import pytest
import torch
from tolerances import F32_ALGEBRA

from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.strategies import StrategySpec, available_strategies, make_strategy
from fedsim.types import ClientSpec, ClientUpdate, LoraSpec, ModuleShape, RoundContext

SHAPES = {"m.q_proj": ModuleShape(d_in=3, d_out=2), "m.v_proj": ModuleShape(d_in=3, d_out=4)}
LORA = LoraSpec(rank=2, alpha=4.0)
CTX = RoundContext(server_round=1, num_rounds=3, seed=0)


def _update(cid, n, seed):
    g = torch.Generator().manual_seed(seed)
    t = {}
    for m, s in SHAPES.items():
        t[ops.a_key(m)] = torch.randn(2, s.d_in, generator=g)
        t[ops.b_key(m)] = torch.randn(s.d_out, 2, generator=g)
    return ClientUpdate(client_id=cid, num_examples=n, lora=LORA, tensors=t)


def _state():
    return make_strategy("fedit").init_state(StrategySpec(SHAPES, LORA, seed=0))


def test_registered():
    assert "fedit" in available_strategies()


def test_init_is_peft_like_and_seeded():
    s1, s2 = _state(), _state()
    for k in s1.tensors:
        assert torch.equal(s1.tensors[k], s2.tensors[k])
        if k.endswith("lora_B.weight"):
            assert not s1.tensors[k].any()
        else:
            assert s1.tensors[k].abs().max() <= 1 / 3**0.5


def test_weighted_average_of_each_factor():
    st = _state()
    ups = [_update(0, 10, 1), _update(1, 30, 2), _update(2, 60, 3)]
    out = make_strategy("fedit").aggregate(CTX, st, ups)
    for k in st.tensors:
        expect = 0.1 * ups[0].tensors[k] + 0.3 * ups[1].tensors[k] + 0.6 * ups[2].tensors[k]
        torch.testing.assert_close(out.tensors[k], expect)


def test_fedit_error_identity():
    """Σ p_k B_k A_k − (Σ p_k B_k)(Σ p_k A_k) = ½ Σ_{k,j} p_k p_j (B_k − B_j)(A_k − A_j)."""
    ups = [_update(i, n, 10 + i) for i, n in enumerate([5, 17, 3, 40])]
    p = ops.normalized_weights(u.num_examples for u in ups).float()
    agg = make_strategy("fedit").aggregate(CTX, _state(), ups)
    for m in SHAPES:
        exact = sum(p[k] * ops.delta_w(u.tensors, m, 1.0) for k, u in enumerate(ups))
        err = exact - ops.delta_w(agg.tensors, m, 1.0)
        formula = 0.5 * sum(
            p[k] * p[j] * (ups[k].tensors[ops.b_key(m)] - ups[j].tensors[ops.b_key(m)])
            @ (ups[k].tensors[ops.a_key(m)] - ups[j].tensors[ops.a_key(m)])
            for k in range(len(ups)) for j in range(len(ups)))
        torch.testing.assert_close(err, formula, atol=F32_ALGEBRA, rtol=F32_ALGEBRA)
        assert err.abs().max() > 1e-3  # the error is real, not zero


def test_no_mutation_and_determinism():
    st = _state()
    ups = [_update(0, 10, 1), _update(1, 20, 2)]
    before = copy.deepcopy((st.tensors, [u.tensors for u in ups]))
    s = make_strategy("fedit")
    a, b = s.aggregate(CTX, st, ups), s.aggregate(CTX, st, ups)
    for k in st.tensors:
        assert torch.equal(st.tensors[k], before[0][k])
        assert torch.equal(a.tensors[k], b.tensors[k])
    for u, t in zip(ups, before[1]):
        assert all(torch.equal(u.tensors[k], t[k]) for k in t)


def test_single_client_is_identity():
    up = _update(4, 7, 9)
    out = make_strategy("fedit").aggregate(CTX, _state(), [up])
    assert all(torch.equal(out.tensors[k], up.tensors[k]) for k in up.tensors)


def test_configure_sends_one_shared_payload():
    st = _state()
    clients = [ClientSpec(i, 10, LORA) for i in range(4)]
    pay = make_strategy("fedit").configure(CTX, st, clients)
    assert set(pay) == {0, 1, 2, 3}
    assert len({id(p) for p in pay.values()}) == 1


def test_mismatches_raise_aggregation_error():
    st = _state()
    bad = _update(1, 10, 2)
    bad.tensors.pop(ops.a_key("m.q_proj"))
    with pytest.raises(AggregationError, match="different keys"):
        make_strategy("fedit").aggregate(CTX, st, [_update(0, 10, 1), bad])
    wrong = _update(1, 10, 2)
    wrong.tensors[ops.a_key("m.q_proj")] = torch.zeros(3, 3)
    with pytest.raises(AggregationError, match="shape"):
        make_strategy("fedit").aggregate(CTX, st, [_update(0, 10, 1), wrong])
    with pytest.raises(AggregationError, match="no client updates"):
        make_strategy("fedit").aggregate(CTX, st, [])
    with pytest.raises(AggregationError, match="zero"):
        make_strategy("fedit").aggregate(CTX, st, [_update(0, 0, 1)])
    with pytest.raises(AggregationError, match="rank"):
        make_strategy("fedit").configure(CTX, st, [ClientSpec(0, 10, LoraSpec(4, 8.0))])
