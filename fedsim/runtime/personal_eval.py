"""Personalized evaluation on a worker: each client's own model — its base at its bit width, the global adapter,
its personal tensors — on its local test split; FedDPA-D's instance-wise mixture; how well FedQLoRA's
quantization-aware adapters estimate their base's quantization error."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from fedsim.eval.embeddings import prompt_embeddings, similarity_weights
from fedsim.eval.scoring import evaluate_batch
from fedsim.lora import ops
from fedsim.models.adapters import AdapterHost
from fedsim.runtime.bases import BaseCache
from fedsim.types import FULL, ClientPayload, DynamicMix, LoraSpec, QuantSpec, Tensors

Worker = Any  # a fedsim.runtime.worker.Worker: its host(), starts, data, device, components and scenario


def own_payload(payload: ClientPayload, quant: QuantSpec) -> ClientPayload:
    """The eval payload for a client at ``quant``: without the personal adapter for the bit widths in
    ``payload.no_personal_for`` (FedQLoRA's full-precision clients have no quantization-aware adapter)."""
    if quant.label in payload.no_personal_for:
        return replace(payload, personal_lora=None)
    return payload


def evaluate_clients(worker: Worker, payload: ClientPayload, items: list[tuple], server_round: int | None = None
                     ) -> dict[int, tuple[dict, dict]]:
    """Per client (id, personal tensors or None, local test indices[, its QuantSpec[, its training indices]]),
    sums on its local test indices (train split), on its own base, with the global adapter alone and with its
    personal tensors on top: ``{client_id: (global_sums, personal_sums)}``. With ``server_round`` (generation due
    and ``eval.generate.personal``), the personal sums also hold the generative metrics' sums of the client's own
    model on (up to ``max_samples`` of) its local test split."""
    out = {}
    for client_id, personal, indices, *rest in items:
        quant = rest[0] if rest else FULL
        host = worker.host(payload.base_version, quant)
        own = own_payload(payload, quant)
        host.activate(payload.lora)  # the global adapter alone
        worker.starts.load(host, replace(payload, personal_lora=None), client_id, None, quant)
        alone = _evaluate(worker, host, indices)
        host = own_model(worker, payload, client_id, personal, quant)
        if own.dynamic_mix is not None and own.personal_lora is not None and len(rest) > 1 and len(rest[1]):
            mixed = dynamic_eval(worker, host, own, client_id, np.asarray(indices), np.asarray(rest[1]),
                                 own.dynamic_mix)
        else:
            mixed = _evaluate(worker, host, indices)
        if own.measure_qa and own.personal_lora is not None:
            mixed.update(qa_measurements(worker.bases, host, quant, own.personal_lora,
                                         host.read(own.personal_lora, personal=True)))
        gen = worker.generation
        if server_round is not None and gen is not None and gen.personal and len(indices):
            mixed.update(generation_sums(worker, host, np.asarray(indices)[: gen.max_samples or None], server_round,
                                         split=worker.data.train, client_id=client_id)[0])
        out[client_id] = (alone, mixed)
    return out


def own_model(worker: Worker, payload: ClientPayload, client_id: int, personal: Tensors | None, quant: QuantSpec
              ) -> AdapterHost:
    """The host with the client's own model active: its base at its bit width, the global adapter and its personal
    tensors on top."""
    host = worker.host(payload.base_version, quant)
    own = own_payload(payload, quant)
    host.activate(own.lora, own.personal_lora, own.mix)
    worker.starts.load(host, own, client_id, personal, quant)
    return host


def generation_sums(worker: Worker, host: AdapterHost, indices: np.ndarray, server_round: int, split: Any = None,
                    client_id: int = -1) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate with the host's active model for ``indices`` of ``split`` (default: the global test set), seeded by
    (run seed, round, client, first sample); the generative metrics' sums, and the samples."""
    from fedsim.eval.generation import generate_batch

    gen = worker.generation
    seed = int(np.random.SeedSequence([worker.scenario.seed, server_round, client_id + 1, int(indices[0])]
                                      ).generate_state(1)[0])
    outputs, samples = generate_batch(host.model, worker.data, indices, worker.tokenizer(), gen, worker.device, seed,
                                      split=split)
    sums: dict[str, float] = {}
    for m in worker.components.metrics:
        if getattr(m, "generative", False):
            sums.update(m.sums(outputs))
    return sums, samples


def _evaluate(worker: Worker, host: AdapterHost, indices) -> dict[str, float]:
    c = worker.components
    return evaluate_batch(host.model, worker.data, indices, worker.device, split=worker.data.train, task=c.task,
                          metrics=c.metrics)


def dynamic_eval(worker: Worker, host: AdapterHost, own: ClientPayload, client_id: int, indices: np.ndarray,
                 train: np.ndarray, dynamic: DynamicMix) -> dict[str, float]:
    """FedDPA-D, as the authors' inference script computes it: per test instance, ``instances`` of the client's
    training instances drawn at random (seeded by seed, client, instance), embedded like the test prompt by the
    base with the local adapter alone (last layer, last prompt token or mean); w = ``max_weight`` × their mean
    cosine similarity weights the global adapter and 1 − w the local one (``weights: local`` swaps them). Sums
    as :func:`~fedsim.eval.scoring.evaluate_batch`'s, over the instances one by one, plus ``dpa/weight_sum``."""
    split, n = worker.data.train, min(int(dynamic.instances), len(train))
    seed = worker.scenario.seed
    picks = [np.random.default_rng([seed, client_id, int(i), 29]).choice(len(train), n, replace=False)
             for i in indices]
    used = np.unique(np.concatenate(picks))
    row_of = {int(j): r for r, j in enumerate(used)}
    host.activate(own.lora, own.personal_lora, (0.0, 1.0))  # the local adapter alone
    kind = dynamic.embedding
    ref = prompt_embeddings(host.model, split, train[used], worker.data.pad_id, worker.device, kind)
    test = prompt_embeddings(host.model, split, indices, worker.data.pad_id, worker.device, kind)
    weights = similarity_weights(test, ref, [np.asarray([row_of[int(j)] for j in p]) for p in picks],
                                 float(dynamic.max_weight))
    sums: dict[str, float] = {"dpa/weight_sum": float(weights.sum())}
    for i, w in zip(indices, weights.tolist()):
        host.activate(own.lora, own.personal_lora, (w, 1.0 - w) if dynamic.weights == "global" else (1.0 - w, w))
        for k, v in _evaluate(worker, host, [int(i)]).items():
            sums[k] = sums.get(k, 0.0) + v
    host.activate(own.lora, own.personal_lora, own.mix)
    return sums


def qa_measurements(bases: BaseCache, host: AdapterHost, quant: QuantSpec, lora: LoraSpec, qa: Tensors
                    ) -> dict[str, float]:
    """How well a quantization-aware adapter's ΔW = s·B·A approximates the quantization error R = W − deq(q(W)),
    over all adapted modules: relative error ‖ΔW − R‖_F / ‖R‖_F and Pearson correlation of the entries."""
    err2 = ref2 = 0.0
    n = sx = sy = sxx = syy = sxy = 0.0
    for module, resid in bases.residuals(host, quant):
        dw = ops.delta_w(qa, module, lora.scaling).double()
        r = resid.double()
        err2 += float(((dw - r) ** 2).sum())
        ref2 += float((r**2).sum())
        n += r.numel()
        sx, sy = sx + float(dw.sum()), sy + float(r.sum())
        sxx, syy, sxy = sxx + float((dw**2).sum()), syy + float((r**2).sum()), sxy + float((dw * r).sum())
    cov = sxy / n - (sx / n) * (sy / n)
    var = max(sxx / n - (sx / n) ** 2, 0.0) * max(syy / n - (sy / n) ** 2, 0.0)
    return {"qa_rel_error": (err2 / ref2) ** 0.5 if ref2 > 0 else float("nan"),
            "qa_corr": cov / var**0.5 if var > 0 else float("nan")}
