"""Quantized bases (HQQ, bitsandbytes, 16-bit), the worker's per-(version, bits) cache, and FedQLoRA's
quantization-aware adapters."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from tolerances import F32_SVD

from fedsim.config import scenario_from_dict
from fedsim.data.datasets import load_data
from fedsim.driver import personal_metrics, prepare
from fedsim.errors import ScenarioError
from fedsim.eval.scoring import evaluate_batch
from fedsim.lora import ops
from fedsim.models.base import build_base_model, target_shapes
from fedsim.models.quant import (
    dequantized_weight,
    packed_bytes,
    quantizable_layers,
    quantize_model,
    quantize_weight,
)
from fedsim.runtime.worker import ClientJob, Worker
from fedsim.server import Server
from fedsim.strategies import StrategySpec
from fedsim.types import ClientSpec, LoraSpec, QuantSpec, RoundContext

LORA = LoraSpec(4, 8.0)
HQQ = {b: QuantSpec(b, "hqq", group_size=32) for b in (1, 2, 3, 4, 8)}


def _scenario(tiny_raw, quant: dict, strategy: str = "fedit", **params):
    tiny_raw["clients"]["quant"] = quant
    tiny_raw["strategy"] = {"name": strategy, "params": params}
    if strategy == "fedqlora":
        tiny_raw["eval"]["local_test_fraction"] = 0.2
    return scenario_from_dict(tiny_raw)


def _rel_errors(base, spec):
    q = quantize_model(base, spec, torch.device("cpu"), torch.float32)
    errs = []
    for name, lin in quantizable_layers(base).items():
        w = lin.weight.float()
        errs.append(float((dequantized_weight(q.get_submodule(name)) - w).norm() / w.norm()))
    return float(np.mean(errs)), q


def test_reconstruction_error_falls_with_bits_and_packed_size_grows(tiny_scenario):
    base = build_base_model(tiny_scenario.model)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    errors, sizes = {}, {}
    for bits, spec in HQQ.items():
        errors[bits], q = _rel_errors(base, spec)
        sizes[bits] = packed_bytes(q, spec)
    assert errors[1] > errors[2] > errors[3] > errors[4] > errors[8]
    assert errors[8] < 0.01 and errors[2] > 0.1
    assert sizes[2] < sizes[3] < sizes[4] < sizes[8] < packed_bytes(base)
    nf4, _ = _rel_errors(base, QuantSpec(4, "bnb"))
    int8, _ = _rel_errors(base, QuantSpec(8, "bnb"))
    half, q16 = _rel_errors(base, QuantSpec(16))
    assert nf4 > int8 > half > 0 and half < 0.01
    assert packed_bytes(q16, QuantSpec(16)) < packed_bytes(base)
    for k, v in base.state_dict().items():  # the full-precision master is never modified
        assert torch.equal(v, before[k]), k
    w = base.model.layers[0].mlp.up_proj.weight
    torch.testing.assert_close(quantize_weight(w, HQQ[2]),
                               dequantized_weight(quantize_model(base, HQQ[2], torch.device("cpu"), torch.float32)
                                                  .model.layers[0].mlp.up_proj))


@pytest.mark.parametrize("spec", [HQQ[2], QuantSpec(4, "bnb"), QuantSpec(8, "bnb"), HQQ[8]],
                         ids=lambda s: s.label)
def test_lora_trains_on_a_quantized_base(tiny_raw, spec):
    tiny_raw["training"].update(local_steps=12, lr=0.02)
    sc = _scenario(tiny_raw, {"bits": spec.bits, "backend": spec.backend, "group_size": 32})
    data = load_data(sc)
    worker = Worker(sc, data)
    client = ClientSpec(0, 40, LORA, quant=sc.clients.quant.assign(1, 0)[0])
    payload = Server("fedit", {}, StrategySpec(target_shapes(sc.model), LORA, 0)).configure(
        RoundContext(1, 1, 0), [client])[0][0]
    idx = np.arange(40)
    host = worker.host(0, client.quant)
    host.activate(LORA)
    worker._load(host, payload, 0, None)
    before = evaluate_batch(host.model, data, idx, worker.device, split=data.train)
    _, update = worker.run_client(ClientJob(client, idx, 1), payload)
    host.load(LORA, update.tensors)
    after = evaluate_batch(host.model, data, idx, worker.device, split=data.train)
    assert after["loss_sum"] < 0.9 * before["loss_sum"]
    layer = host.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").base_layer
    assert type(layer).__name__ == {"hqq": "HQQLinear", "bnb": f"Linear{'4bit' if spec.bits == 4 else '8bitLt'}"}[
        spec.backend]


def test_a_base_is_quantized_once_per_worker_version_and_bits_not_per_client(tiny_raw):
    sc = _scenario(tiny_raw, {"tiers": [{"fraction": 0.5, "bits": 2}, {"fraction": 0.5, "bits": 8,
                                                                        "backend": "hqq"}], "group_size": 32})
    prep = prepare(sc)
    worker = Worker(sc, prep.data)
    server = Server("fedit", {}, prep.spec)
    payloads, _ = server.configure(RoundContext(1, 2, 0), prep.clients)
    for c in prep.clients:
        worker.run_client(ClientJob(c, prep.parts[c.client_id], 1), payloads[c.client_id])
    assert sorted(worker.quantizations) == ["v0/2bit-hqq", "v0/8bit-hqq"]
    assert set(worker.quantizations.values()) == {1} and worker.num_builds == 1
    # a merged base update: each bit width is re-quantized once, from the updated full-precision master
    module = "model.layers.0.self_attn.q_proj"
    master_before = worker._master.get_submodule(module).weight.clone()
    delta = {f"{module}.delta_W": torch.full(master_before.shape, 0.01)}
    worker.apply_base_delta(1, delta)
    torch.testing.assert_close(worker._master.get_submodule(module).weight, master_before + 0.01)
    payloads = {c: p.__class__(**{**p.__dict__, "base_version": 1}) for c, p in payloads.items()}
    for c in prep.clients:
        worker.run_client(ClientJob(c, prep.parts[c.client_id], 2), payloads[c.client_id])
    assert worker.quantizations["v1/2bit-hqq"] == worker.quantizations["v1/8bit-hqq"] == 1
    host8 = worker.host(1, next(c.quant for c in prep.clients if c.quant.bits == 8))
    w8 = dequantized_weight(host8.model.get_submodule("base_model.model." + module))
    assert float((w8 - (master_before + 0.01)).abs().max()) < 0.01  # quantized from the merged master


def _fedqlora(tiny_raw, **params):
    return _scenario(tiny_raw, {"tiers": [{"fraction": 0.5, "bits": 2}, {"fraction": 0.5, "bits": 16}],
                                "group_size": 32}, "fedqlora", **params)


@pytest.mark.parametrize("iterative", [False, True])
def test_quantization_aware_adapter_stays_on_its_client(tiny_raw, iterative):
    sc = _fedqlora(tiny_raw, iterative=iterative, qa_rank=3)
    prep = prepare(sc)
    worker = Worker(sc, prep.data)
    server = Server("fedqlora", sc.strategy.params, prep.spec)
    q2 = next(c for c in prep.clients if c.quant.bits == 2)
    q16 = next(c for c in prep.clients if c.quant.bits == 16)
    payloads, _ = server.configure(RoundContext(1, 2, 0), [q2, q16])
    assert payloads[q2.client_id].personal_lora.rank == 3 and payloads[q16.client_id].personal_lora is None
    assert not any(k.startswith(ops.PERSONAL_PREFIX) for p in payloads.values() for k in p.tensors)
    res, up = worker.run_client(ClientJob(q2, prep.parts[q2.client_id], 1), payloads[q2.client_id])
    assert sorted(up.tensors) == sorted(server.state.tensors) and server.invalid_reason(up) is None
    qa = {k: v for k, v in res.personal.items() if k.startswith(ops.PERSONAL_PREFIX)}
    assert qa and len(qa) == len(res.personal)
    assert any(v.abs().max() > 0 for k, v in qa.items() if ops.factor_of(k) == "B")  # it trained
    assert ("personal/loss" in res.metrics) == iterative  # the iterative variant fits it in a phase of its own
    leaked = up.__class__(up.client_id, up.num_examples, up.lora, {**up.tensors, **qa})
    assert "unexpected" in server.invalid_reason(leaked)
    res16, _ = worker.run_client(ClientJob(q16, prep.parts[q16.client_id], 1), payloads[q16.client_id])
    assert res16.personal == {}  # full-precision clients hold no quantization-aware adapter


def test_loftq_init_is_the_truncated_svd_of_the_quantization_error(tiny_raw):
    sc = _fedqlora(tiny_raw, qa_init="loftq", qa_rank=3)
    prep = prepare(sc)
    worker = Worker(sc, prep.data)
    server = Server("fedqlora", sc.strategy.params, prep.spec)
    items = [(c.client_id, None, prep.local_test[c.client_id], c.quant) for c in prep.clients]
    measured = worker.evaluate_clients(server.eval_payload(), items)
    q2 = next(c for c in prep.clients if c.quant.bits == 2)
    host = worker.host(0, q2.quant)
    host.activate(LORA)
    num = den = 0.0
    for _, resid in worker.quant_residuals(host, q2.quant):
        sv = torch.linalg.svdvals(resid.double())
        num += float((sv[3:] ** 2).sum())
        den += float((sv**2).sum())
    _, mixed = measured[q2.client_id]
    assert mixed["qa_rel_error"] == pytest.approx((num / den) ** 0.5, rel=F32_SVD)  # Eckart–Young optimum
    assert 0.5 < mixed["qa_corr"] <= 1.0
    metrics, table = personal_metrics(measured, {c.client_id: c.quant.label for c in prep.clients})
    assert {"eval/qa/rel_error", "eval/qa/corr", "eval/qa/rel_error/2bit-hqq"} <= set(metrics)
    assert not any(k.endswith("/16bit") for k in metrics)  # 16-bit clients have no adapter to measure
    assert {r["base"] for r in table} == {"2bit-hqq", "16bit"}


@pytest.mark.parametrize("quant,match", [
    ({"bits": 2, "backend": "bnb"}, "use backend: hqq"),
    ({"bits": 5}, "bits must be one of"),
    ({"bits": 16, "backend": "hqq"}, "cannot do 16-bit"),
    ({"tiers": [{"fraction": 0.5, "bits": 4}, {"fraction": 0.4, "bits": 8}]}, "sum to"),
    ({"bits": 4, "backend": "bnb", "blocksize": 48}, "blocksize must be one of"),
    ({"bits": 4, "backend": "hqq", "group_size": 12}, "multiple of 8"),
    ({"bits": 4, "quant_type": "int4"}, "quant_type"),
])
def test_bad_bits_are_scenario_errors(tiny_raw, quant, match):
    with pytest.raises(ScenarioError, match=match):
        _scenario(tiny_raw, quant)


def test_group_size_must_divide_every_layer_and_backends_must_be_installed(tiny_raw, monkeypatch):
    sc = _scenario(tiny_raw, {"bits": 4, "backend": "hqq", "group_size": 48})  # d_in is 32 and 64
    with pytest.raises(ScenarioError, match="group_size 48 does not divide layer"):
        prepare(sc)
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)  # as if the extra were not installed
    with pytest.raises(ScenarioError, match=r"pip install 'fedsim\[hqq\]'"):
        prepare(_scenario(tiny_raw, {"bits": 2, "group_size": 32}))


def test_transformers_is_imported_without_scipy_which_the_process_can_still_import():
    """#50 point 4: transformers imports scipy (~34 MB, ~0.35 s) for losses and processors fedsim never runs; a worker
    imports transformers with scipy marked absent, trains without it, and its own code can still import scipy."""
    import subprocess
    import sys

    code = """
import sys
from fedsim.boot import import_transformers_lean
assert import_transformers_lean() == ["scipy"] and import_transformers_lean() == []
import peft, torch
from fedsim.config import ModelConfig
from fedsim.models.base import build_base_model
model = peft.get_peft_model(build_base_model(ModelConfig()), peft.LoraConfig(r=4, target_modules=["q_proj"]))
model(input_ids=torch.ones(1, 4, dtype=torch.long)).logits.sum().backward()
print("scipy" in sys.modules)
import scipy.stats
print(scipy.stats.pearsonr([1, 2, 3], [1, 2, 4]).statistic > 0.9)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


def test_unused_quantization_libraries_stay_out_of_a_process():
    """A run without HQQ / bitsandbytes clients keeps both out of its processes (transformers and PEFT would import
    them: seconds and ~45 MB each), LoRA still works, quiet mode imports no `datasets`; a run that uses one keeps
    it; and once transformers is imported nothing is hidden any more."""
    import subprocess
    import sys

    code = """
import sys
from fedsim.models.quant import skip_unused_backends
from fedsim.quiet import silence_libraries
assert skip_unused_backends({"none", "bnb"}) == ["hqq"]
silence_libraries(mark=True)
import peft, torch
from fedsim.config import ModelConfig
from fedsim.models.base import build_base_model
model = peft.get_peft_model(build_base_model(ModelConfig()), peft.LoraConfig(r=4, target_modules=["q_proj"]))
model(input_ids=torch.ones(1, 4, dtype=torch.long)).logits.sum().backward()
loaded = {m for m in ("hqq", "bitsandbytes", "datasets") if sys.modules.get(m) is not None}
print(sorted(loaded), skip_unused_backends(set()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "['bitsandbytes'] []"
