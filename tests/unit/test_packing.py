"""Packed clients (resources.clients_per_pass): K clients trained in one pass over one base give the same updates as
the same clients trained one by one (fp32, CPU, ≤ 1e-5 relative), for every strategy whose local procedure packs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import GPT2
from tolerances import F32_NETWORK

from fedsim.config import scenario_from_dict
from fedsim.driver import prepare
from fedsim.errors import ScenarioError
from fedsim.runtime.packs import make_packs
from fedsim.runtime.worker import ClientJob, Worker
from fedsim.strategies import make_strategy
from fedsim.types import ClientFailure, LoraSpec, RoundContext

MIXED = [(4, 8.0), (2, 3.0), (8, 1.0), (1, 2.0)]  # (rank, alpha): mixed ranks and scalings in one pack
TOL = F32_NETWORK


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def _setup(tiny_raw, strategy: str = "fedit", params: dict | None = None, ranks=None, **training):
    tiny_raw["strategy"] = {"name": strategy, "params": params or {}}
    tiny_raw["training"].update(training)
    if strategy in ("fedsa",):
        tiny_raw["eval"]["local_test_fraction"] = 0.2
    sc = scenario_from_dict(tiny_raw)
    prep = prepare(sc)
    clients = prep.clients[:4]
    if ranks is not None:
        clients = [replace(c, lora=LoraSpec(r, a)) for c, (r, a) in zip(clients, ranks)]
    spec = replace(prep.spec, lora=max((c.lora for c in clients), key=lambda lo: lo.rank))
    return sc, prep, clients, spec


def _round(worker, strategy, state, prep, clients, r, personal=None):
    ctx = RoundContext(r, 3, prep.scenario.seed)
    payloads = strategy.configure(ctx, state, clients)
    return [(ClientJob(c, prep.parts[c.client_id], r, personal=(personal or {}).get(c.client_id)),
             payloads[c.client_id]) for c in clients], ctx


def _assert_same(sequential, packed, pack_size):
    assert len(sequential) == len(packed)
    for (r1, u1), out in zip(sequential, packed):
        assert not isinstance(out, ClientFailure), out
        r2, u2 = out
        assert r2.client_id == r1.client_id and r2.metrics["train/clients_per_pass"] == pack_size
        assert sorted(u1.tensors) == sorted(u2.tensors)
        for k in u1.tensors:
            assert _rel(u2.tensors[k], u1.tensors[k]) <= TOL, (r1.client_id, k, _rel(u2.tensors[k], u1.tensors[k]))
        assert (r1.personal is None) == (r2.personal is None)
        for k in r1.personal or {}:
            assert _rel(r2.personal[k], r1.personal[k]) <= TOL, k
        assert sorted(u1.head) == sorted(u2.head)  # a classifier's head: trained per client in the pass
        for k in u1.head:
            assert _rel(u2.head[k], u1.head[k]) <= TOL, (r1.client_id, k, _rel(u2.head[k], u1.head[k]))
        assert ("train/lr" in r1.metrics) == ("train/lr" in r2.metrics)
        for m in ("train/loss", "train/steps", "train/tokens", "train/lr", "reg/tail_norm_end", "hetlora/rank"):
            if m in r1.metrics:
                assert r2.metrics[m] == pytest.approx(r1.metrics[m], rel=TOL), m


def _check(sc, prep, clients, spec, rounds: int = 1):
    """Run ``rounds`` rounds one by one (aggregating each) and compare the last round's pack with sequential."""
    strategy = make_strategy(sc.strategy.name, sc.strategy.params)
    state = strategy.init_state(spec)
    worker = Worker(sc, prep.data)
    personal: dict = {}
    for r in range(1, rounds + 1):
        items, ctx = _round(worker, strategy, state, prep, clients, r, personal)
        sequential = [worker.run_client(j, p) for j, p in items]
        if r == rounds:
            packed = worker.run_pack(items)
            _assert_same(sequential, packed, len(items))
            # trained for real: the update moved away from what was sent
            moved = [k for k in sequential[0][1].tensors if k in items[0][1].tensors
                     and _rel(sequential[0][1].tensors[k], items[0][1].tensors[k]) > 1e-3]
            assert moved or items[0][1].fresh or not items[0][1].tensors
            return sequential
        state = strategy.aggregate(ctx, state, [u for _, u in sequential])
        for v, delta in enumerate(state.base_deltas, start=1):  # FLoRA, FedEx-LoRA merge into the base
            worker.apply_base_delta(v, delta)
        personal = {res.client_id: res.personal for res, _ in sequential if res.personal is not None}
    return None


def test_fedit_pack_equals_one_by_one_with_clipping_and_weight_decay(tiny_raw):
    sc, prep, clients, spec = _setup(tiny_raw, "fedit", max_grad_norm=0.05, weight_decay=0.1, local_steps=4)
    _check(sc, prep, clients, spec, rounds=2)


def test_sgd_with_momentum_packs_exactly(tiny_raw):
    sc, prep, clients, spec = _setup(tiny_raw, "fedit", optimizer="sgd", momentum=0.9, lr=0.05, weight_decay=0.01)
    _check(sc, prep, clients, spec, rounds=2)


@pytest.mark.parametrize("strategy,family", [("flora", None), ("flexlora", None), ("hetlora", None),
                                             ("flora", GPT2), ("flexlora", GPT2)])
def test_mixed_ranks_and_alphas_pad_exactly(tiny_raw, strategy, family):
    """Also on GPT-2 (Conv1D layers; FLoRA merges into them between the rounds)."""
    if family:
        tiny_raw["model"] = family
    params = {"prune_lambda": 0.5, "prune_gamma": 0.5} if strategy == "hetlora" else {}
    sc, prep, clients, spec = _setup(tiny_raw, strategy, params, ranks=MIXED)
    _check(sc, prep, clients, spec, rounds=2)


def test_ffa_trains_b_only_and_packs_exactly(tiny_raw):
    sc, prep, clients, spec = _setup(tiny_raw, "ffa")
    seq = _check(sc, prep, clients, spec)
    assert all(k.endswith("lora_B.weight") for k in seq[0][1].tensors)


def test_fedsa_personal_b_from_the_store_packs_exactly(tiny_raw):
    sc, prep, clients, spec = _setup(tiny_raw, "fedsa")
    seq = _check(sc, prep, clients, spec, rounds=2)
    assert all(res.personal for res, _ in seq)


def test_clients_with_different_step_counts_leave_the_pack_without_a_zero_step(tiny_raw):
    sc, prep, clients, spec = _setup(tiny_raw, "fedit", local_steps=None, local_epochs=1.0, weight_decay=0.5)
    steps = [sc.training.steps_for(len(prep.parts[c.client_id])) for c in clients]
    sizes = [len(prep.parts[c.client_id]) for c in clients]
    assert len(set(steps)) > 1 and any(s % sc.training.batch_size for s in sizes)  # also short last batches
    _check(sc, prep, clients, spec)


@pytest.mark.parametrize("quant,family", [({"bits": 2, "backend": "hqq", "group_size": 32}, None),
                                          ({"bits": 4, "backend": "bnb", "quant_type": "nf4"}, None),
                                          ({"bits": 4, "backend": "hqq", "group_size": 32}, GPT2)])
def test_quantized_base_packs_exactly(tiny_raw, quant, family):
    tiny_raw["clients"]["quant"] = quant
    if family:
        tiny_raw["model"] = family
    sc, prep, clients, spec = _setup(tiny_raw, "fedit")
    assert clients[0].quant.quantized
    _check(sc, prep, clients, spec)


def test_a_failing_client_fails_alone(tiny_raw):
    sc, prep, clients, spec = _setup(tiny_raw, "fedit")
    strategy = make_strategy("fedit")
    state = strategy.init_state(spec)
    worker = Worker(sc, prep.data)
    items, _ = _round(worker, strategy, state, prep, clients, 1)
    bad = {k: (torch.full_like(v, float("nan")) if k.endswith("lora_A.weight") else v)
           for k, v in items[1][1].tensors.items()}
    items[1] = (items[1][0], replace(items[1][1], tensors=bad))
    wrong = {k: v[:, :1] if k.endswith("lora_B.weight") else v for k, v in items[2][1].tensors.items()}
    items[2] = (items[2][0], replace(items[2][1], tensors=wrong))
    out = worker.run_pack(items)
    assert isinstance(out[1], ClientFailure) and "non-finite training loss" in out[1].reason
    assert isinstance(out[2], ClientFailure) and "shape" in out[2].reason
    _assert_same([worker.run_client(*items[i]) for i in (0, 3)], [out[0], out[3]], 3)  # 3 started together


def test_two_level_procedures_fall_back_one_by_one_with_a_note(tiny_raw):
    tiny_raw["eval"]["local_test_fraction"] = 0.2
    sc, prep, clients, spec = _setup(tiny_raw, "pf2lora")
    strategy = make_strategy("pf2lora")
    worker = Worker(sc, prep.data)
    items, _ = _round(worker, strategy, strategy.init_state(spec), prep, clients, 1)
    sequential = [worker.run_client(j, p) for j, p in items]
    packed = worker.run_pack(items)
    for (_, u1), (r2, u2) in zip(sequential, packed):
        assert r2.metrics["train/clients_per_pass"] == 1.0 and "bilevel" in r2.note
        for k in u1.tensors:
            torch.testing.assert_close(u2.tensors[k], u1.tensors[k])


def test_packs_share_a_base_and_keep_job_order(tiny_scenario):
    from fedsim.types import ClientSpec, QuantSpec

    q2, q4 = QuantSpec(2, "hqq"), QuantSpec(4, "bnb")
    jobs = [(ClientJob(ClientSpec(i, 10, LoraSpec(4, 8.0), quant=q), np.arange(3), 1), None)
            for i, q in enumerate([q2, q4, q2, q2, q4])]
    assert make_packs(jobs, 2) == [[0, 2], [1, 4], [3]]
    assert make_packs(jobs, 1) == [[0], [1], [2], [3], [4]]
    res = scenario_from_dict(tiny_scenario.to_dict() | {"resources": {"backend": "local", "num_workers": 2}}).resources
    many = [(ClientJob(ClientSpec(i, 10, LoraSpec(4, 8.0)), np.arange(3), 1), None) for i in range(100)]
    assert [len(p) for p in make_packs(many[:20], 16, res)] == [10, 10]  # one pack per worker, not 16 + 4
    sizes = [len(p) for p in make_packs(many, 16, res)]
    assert len(sizes) == 8 and set(sizes) <= {12, 13} and sum(sizes) == 100  # a multiple of the 2 workers
    assert sorted(p for pack in make_packs(many, 16, res) for p in pack) == list(range(100))


def test_clients_per_pass_config(tiny_raw):
    tiny_raw["resources"]["clients_per_pass"] = "auto"
    sc = scenario_from_dict(tiny_raw)
    assert sc.pack_size(24) == 4096 // (8 * 24)
    tiny_raw["resources"]["pack_tokens"] = 100
    assert scenario_from_dict(tiny_raw).pack_size(24) == 1
    tiny_raw["resources"]["clients_per_pass"] = 0
    with pytest.raises(ScenarioError, match="clients_per_pass"):
        scenario_from_dict(tiny_raw)


def test_fedprox_packs_exactly(tiny_raw):
    """FedProx's proximal term over the packed clients' views equals each client's own (≤ 1e-5), in round 2 where
    θ_global is a trained adapter."""
    from fedsim.objectives.proximal import Proximal

    sc, prep, clients, spec = _setup(tiny_raw, "fedit", local_steps=4)
    strategy = make_strategy("fedit")
    state = strategy.init_state(spec)
    worker = Worker(sc, prep.data)
    for r in (1, 2):
        items, ctx = _round(worker, strategy, state, prep, clients, r)
        items = [(j, replace(p, objectives=(Proximal(mu=5.0),))) for j, p in items]
        sequential = [worker.run_client(j, p) for j, p in items]
        if r == 2:
            packed = worker.run_pack(items)
            _assert_same(sequential, packed, len(items))
            for (r1, _), (r2, _) in zip(sequential, packed):
                assert r2.metrics["fedprox/distance"] == pytest.approx(r1.metrics["fedprox/distance"], rel=TOL)
        state = strategy.aggregate(ctx, state, [u for _, u in sequential])


def test_schedules_pack_exactly_with_clients_of_different_lengths(tiny_raw):
    """Each packed client follows its own schedule over its own number of steps (local_epochs), warmup included,
    at the round's learning rate (a cosine decay across rounds)."""
    tiny_raw["rounds"] = 3
    sc, prep, clients, spec = _setup(tiny_raw, "fedit", local_steps=None, local_epochs=0.5, lr_schedule="cosine",
                                     warmup_ratio=0.2, round_lr_schedule="cosine", min_lr=0.001)
    assert len({sc.training.steps_for(c.num_examples) for c in clients}) > 1
    _check(sc, prep, clients, spec, rounds=2)


def test_recipe_options_that_do_not_pack_say_so(tiny_raw):
    for training in ({"grad_accum_steps": 2}, {"gradient_checkpointing": True}, {"autocast": True}):
        raw = {**tiny_raw, "training": {**tiny_raw["training"], **training}}
        sc, prep, clients, spec = _setup(raw, "fedit")
        strategy = make_strategy("fedit")
        state = strategy.init_state(spec)
        worker = Worker(sc, prep.data)
        items, _ = _round(worker, strategy, state, prep, clients[:2], 1)
        key = next(iter(training))
        assert key in worker.unpackable(items[0][1])
        outs = worker.run_pack(items)
        assert all(not isinstance(o, ClientFailure) and key in o[0].note for o in outs)


def test_scaffold_does_not_pack_and_says_so(tiny_raw):
    from fedsim.objectives.scaffold import Scaffold

    sc, prep, clients, spec = _setup(tiny_raw, "fedit")
    strategy = make_strategy("fedit")
    items, _ = _round(Worker(sc, prep.data), strategy, strategy.init_state(spec), prep, clients[:2], 1)
    worker = Worker(sc, prep.data)
    assert "['Scaffold'] do not work in a packed pass" in worker.unpackable(replace(items[0][1],
                                                                                  objectives=(Scaffold(),)))


@pytest.mark.parametrize("family", ["roberta", "distilbert", "llama"])
def test_classifiers_pack_exactly_with_their_heads(tiny_raw, tmp_path, family):
    """Sequence classifiers pack: prompts of different lengths (padding under an encoder's attention mask), filler
    rows, each client's head (RoBERTa's dense + out_proj, DistilBERT's pre_classifier + classifier, Llama's
    bias-free score on each row's last token) trained and clipped with its adapter; in round 2 from the averaged
    head the payload carries."""
    from conftest import DISTILBERT, ROBERTA, classifier_raw

    model = {"roberta": ROBERTA, "distilbert": DISTILBERT,
             "llama": {"name": "tiny", "task": "seq_cls", "num_labels": 2, "tiny": tiny_raw["model"]["tiny"]}}
    classifier_raw(tiny_raw, tmp_path, model[family])
    sc, prep, clients, spec = _setup(tiny_raw, "fedit", max_grad_norm=0.05, weight_decay=0.1, local_steps=3)
    sequential = _check(sc, prep, clients, spec, rounds=2)
    assert all(u.head for _, u in sequential)


def test_a_head_with_other_than_linear_layers_trains_one_by_one(tiny_raw, tmp_path, monkeypatch):
    """A head the packed pass cannot compute (a layer other than nn.Linear) falls back with the reason, same
    updates."""
    from conftest import ROBERTA, classifier_raw

    from fedsim.models.adapters import AdapterHost

    classifier_raw(tiny_raw, tmp_path, ROBERTA)
    sc, prep, clients, spec = _setup(tiny_raw, "fedit")
    strategy = make_strategy("fedit")
    items, _ = _round(Worker(sc, prep.data), strategy, strategy.init_state(spec), prep, clients[:2], 1)
    alone = [Worker(sc, prep.data).run_client(j, p) for j, p in items]
    monkeypatch.setattr(AdapterHost, "head_layers", lambda self: None)
    outs = Worker(sc, prep.data).run_pack(items)
    for (r, u), (_, u1) in zip(outs, alone):
        assert "other than linear" in r.note and r.metrics["train/clients_per_pass"] == 1.0
        assert sorted(u.head) == sorted(u1.head) and u.head
        assert all(torch.equal(u.tensors[k], u1.tensors[k]) for k in u1.tensors)
