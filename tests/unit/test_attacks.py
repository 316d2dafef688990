"""Malicious clients (#27 point 5, model poisoning): who attacks (a fixed seeded set), and each attack's formula on
the change of the shared tensors; bad fractions refused."""

import pytest
import torch

from fedsim.config import scenario_from_dict
from fedsim.errors import ScenarioError
from fedsim.pipeline.transforms import Attack, TransformContext

START = {"m.lora_A": torch.full((2, 3), 0.5), "m.lora_B": torch.zeros(4, 2)}
SENT = {"m.lora_A": torch.full((2, 3), 0.7), "m.lora_B": torch.full((4, 2), 0.1)}


def ctx(client, attempt=1):
    return TransformContext(seed=1, server_round=2, client_id=client, attempt=attempt, start=START)


@pytest.mark.parametrize("attack, kw, want", [
    ("sign_flip", {"multiplier": -1.0}, lambda s, v: s - (v - s)),
    ("scale", {"multiplier": 10.0}, lambda s, v: s + 10 * (v - s)),
    ("fixed", {"value": 0.25}, lambda s, v: s + 0.25),
])
def test_each_attack_changes_the_update_as_its_formula_says(attack, kw, want):
    a = Attack(frozenset({3}), attack, **kw)
    honest, m = a(SENT, ctx(1))
    assert honest is SENT and m == {"malicious/attacked": 0.0}
    out, m = a(SENT, ctx(3))
    assert m == {"malicious/attacked": 1.0}
    for k in SENT:
        torch.testing.assert_close(out[k], want(START[k], SENT[k]))


def test_gaussian_and_nan_attacks():
    a = Attack(frozenset({3}), "gaussian", std=2.0)
    one, _ = a(SENT, ctx(3))
    again, _ = a(SENT, ctx(3))
    other, _ = a(SENT, ctx(3, attempt=2))
    assert all(torch.equal(one[k], again[k]) for k in SENT)  # deterministic per (seed, round, client, attempt)
    assert not torch.equal(one["m.lora_A"], other["m.lora_A"])
    big = Attack(frozenset({3}), "gaussian", std=2.0)({"w": torch.zeros(200_000)}, ctx(3))[0]["w"]
    assert abs(float(big.std()) - 2.0) < 0.02 and abs(float(big.mean())) < 0.02
    nan, _ = Attack(frozenset({3}), "nan")(SENT, ctx(3))
    assert all(torch.isnan(v).all() for v in nan.values())


def test_the_malicious_clients_are_a_fixed_seeded_set_and_the_fraction_must_leave_both_kinds(tiny_raw):
    tiny_raw["clients"]["malicious"] = {"fraction": 0.25}
    sc = scenario_from_dict(tiny_raw)
    chosen = sc.clients.malicious.clients(8, 3)
    assert len(chosen) == 2 and chosen == sc.clients.malicious.clients(8, 3) != sc.clients.malicious.clients(8, 4)
    assert sc.clients.malicious.multiplier() == -1.0
    for fraction in (0.01, 0.99):
        tiny_raw["clients"]["malicious"] = {"fraction": fraction}
        with pytest.raises(ScenarioError, match="must leave at least one of each"):
            scenario_from_dict(tiny_raw)
