"""FedEx-LoRA's client weights: by sample counts (default), or 1/K as the authors' fed_agg.py averages."""

import pytest
import torch
from tolerances import F32_ALGEBRA

from fedsim.errors import ScenarioError
from fedsim.strategies import StrategySpec, make_strategy
from fedsim.types import ClientUpdate, LoraSpec, ModuleShape, RoundContext

LORA = LoraSpec(2, 4.0)
SPEC = StrategySpec({"m": ModuleShape(d_in=5, d_out=3)}, LORA, 0)


def _updates():
    g = torch.Generator().manual_seed(0)
    return [ClientUpdate(k, n, LORA, {"m.lora_A.weight": torch.randn(2, 5, generator=g),
                                      "m.lora_B.weight": torch.randn(3, 2, generator=g)})
            for k, n in enumerate([1, 3, 6])]


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_fedex_weights_and_its_residual_make_the_aggregate_exact(weighting):
    strategy = make_strategy("fedex", {"weighting": weighting})
    ups = _updates()
    new = strategy.aggregate(RoundContext(1, 1, 0), strategy.init_state(SPEC), ups)
    n = torch.tensor([1.0, 3.0, 6.0], dtype=torch.float64)
    p = n / n.sum() if weighting == "samples" else torch.full((3,), 1 / 3, dtype=torch.float64)
    a = sum(pk * u.tensors["m.lora_A.weight"].double() for pk, u in zip(p, ups))
    b = sum(pk * u.tensors["m.lora_B.weight"].double() for pk, u in zip(p, ups))
    torch.testing.assert_close(new.tensors["m.lora_A.weight"].double(), a, atol=F32_ALGEBRA, rtol=F32_ALGEBRA)
    exact = sum(pk * LORA.scaling * u.tensors["m.lora_B.weight"].double() @ u.tensors["m.lora_A.weight"].double()
                for pk, u in zip(p, ups))
    merged = new.base_deltas[-1]["m.delta_W"].double() + LORA.scaling * b @ a
    torch.testing.assert_close(merged, exact, atol=F32_ALGEBRA, rtol=F32_ALGEBRA)


def test_fedex_refuses_an_unknown_weighting(tiny_raw):
    from fedsim.config import scenario_from_dict

    tiny_raw.update(strategy={"name": "fedex", "params": {"weighting": "equal"}})
    with pytest.raises(ScenarioError, match="strategy.params.weighting"):
        scenario_from_dict(tiny_raw)
