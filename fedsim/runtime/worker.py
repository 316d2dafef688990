"""A worker trains many virtual clients in turn with one cached base model.

The base model is built once per worker (and per base version, later per bit width); LoRA is attached once with PEFT;
per client only the adapter weights are copied in. ``stats()`` exposes counters that tests use to prove it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedsim.client.evaluate import evaluate_batch
from fedsim.client.packed import PackMember, check_member, train_packed
from fedsim.client.procedures import PROCEDURES, LocalJob
from fedsim.client.trainer import tail_regularizer
from fedsim.config import Scenario
from fedsim.data.datasets import TokenizedData
from fedsim.errors import BackendError
from fedsim.lora import ops
from fedsim.lora.ops import init_adapter, personal_key, split_personal
from fedsim.models.adapters import AdapterHost
from fedsim.models.base import build_base_model, configure_threads, resolve_dtype
from fedsim.models.quant import FULL, dequantized_weight, packed_bytes, quantize_model
from fedsim.strategies import make_strategy
from fedsim.types import (
    ClientFailure,
    ClientPayload,
    ClientResult,
    ClientSpec,
    ClientUpdate,
    LoraSpec,
    QuantSpec,
)


@dataclass(frozen=True)
class ClientJob:
    """One client's work in one round (``attempt`` counts retries from 1)."""

    spec: ClientSpec
    indices: np.ndarray
    server_round: int
    attempt: int = 1
    personal: dict[str, torch.Tensor] | None = None  # the client's private tensors from earlier rounds


MAX_BASES = 6  # base variants (bit widths) a worker keeps at once
PackOutcome = tuple[ClientResult, ClientUpdate] | ClientFailure


def _max_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def pick_device(num_gpus: float) -> torch.device:
    """CUDA when the worker was given GPU resources and CUDA is present, else CPU."""
    if num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class Worker:
    """Runs client jobs and evaluation batches on a cached model.

    Args:
        scenario: the resolved scenario.
        data: tokenized data (shared read-only); None until :meth:`attach` gives it (the Ray backend starts its
            workers before the driver has tokenized the data).
        name: a label for metrics (e.g. ``worker-0``).
        num_gpus: this worker's GPU share (default: ``resources.num_gpus``; a worker pool's own otherwise).
    """

    def __init__(self, scenario: Scenario | dict[str, Any], data: TokenizedData | None, name: str = "worker-0",
                 num_gpus: float | None = None):
        from fedsim.quiet import silence_libraries

        silence_libraries()  # in a worker process of a command-line run (FEDSIM_QUIET=1): no library chatter
        if isinstance(scenario, dict):
            from fedsim.config import scenario_from_dict

            scenario = scenario_from_dict(scenario)
        # transformers/PEFT deprecation chatter would repeat in every actor's log
        warnings.filterwarnings("ignore", category=FutureWarning)
        self.scenario = scenario
        self.data = data
        self.name = name
        configure_threads(scenario.resources.threads_per_worker())
        self.device = pick_device(scenario.resources.num_gpus if num_gpus is None else num_gpus)
        self.strategy = make_strategy(scenario.strategy.name, scenario.strategy.params)
        # One base per (base version, bit width): with full precision only, the PEFT model wraps the base itself and
        # merges are added to it in place; with quantized clients, a full-precision master (CPU, never wrapped)
        # takes the merges and each variant is quantized from it once per base version.
        self._quantized_run = scenario.clients.quant.is_quantized()
        self._master: torch.nn.Module | None = None
        self._hosts: OrderedDict[QuantSpec, tuple[int, AdapterHost]] = OrderedDict()
        self._base_version = 0
        self.num_builds = 0
        self.num_clients = 0
        self.quantizations: Counter[str] = Counter()  # "v<version>/<label>" -> times quantized (must stay 1)
        self.base_bytes: dict[str, int] = {}  # label -> packed bytes of that base variant
        self._loftq: dict[tuple, dict[str, torch.Tensor]] = {}

    def _compute_dtype(self) -> torch.dtype:
        name = self.scenario.clients.quant.compute_dtype
        if name != "auto":
            return getattr(torch, name)
        return resolve_dtype(self.scenario.model, self.device)

    def host(self, base_version: int = 0, quant: QuantSpec = FULL) -> AdapterHost:
        """The cached PEFT model for ``base_version`` at ``quant`` (built or quantized on first use)."""
        if not self._quantized_run:
            quant = FULL  # one full-precision base, whatever the (unquantized) spec says
        if base_version != self._base_version:
            raise BackendError(f"payload asks for base version {base_version}, worker holds {self._base_version}; "
                               "base updates must be synced to every worker first")
        cached = self._hosts.get(quant)
        if cached is not None and cached[0] == self._base_version:
            self._hosts.move_to_end(quant)
            return cached[1]
        if not self._quantized_run:
            base = build_base_model(self.scenario.model, self.device)
            self.num_builds += 1
            self.base_bytes[quant.label] = packed_bytes(base, quant)
        else:
            if self._master is None:
                self._master = build_base_model(self.scenario.model, "cpu")
                self.num_builds += 1
            self._hosts.pop(quant, None)
            while len(self._hosts) >= MAX_BASES:  # least recently used variant out
                self._hosts.popitem(last=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = quantize_model(self._master, quant, self.device, self._compute_dtype())
            self.quantizations[f"v{self._base_version}/{quant.label}"] += 1
            self.base_bytes[quant.label] = packed_bytes(base, quant)
        host = AdapterHost(base, self.scenario.model.target_modules, self.scenario.model.lora_dropout)
        self._hosts[quant] = (self._base_version, host)
        return host

    def attach(self, data: TokenizedData) -> None:
        """Give the worker its data (once, before its first job)."""
        self.data = data

    def apply_base_delta(self, version: int, delta: dict[str, torch.Tensor]) -> int:
        """Merge base-model update ``version`` into the cached base, in place (once per version per worker); with
        quantized clients into the full-precision master, from which each bit width is re-quantized once on its
        next use.

        ``delta`` holds per module ``<module>.delta_B`` (d_out, R) and ``<module>.delta_A`` (R, d_in), or a dense
        ``<module>.delta_W`` (d_out, d_in). Returns the worker's base version afterwards.
        """
        if version <= self._base_version:
            return self._base_version  # already applied (e.g. replayed to a replacement worker)
        if version != self._base_version + 1:
            raise BackendError(f"base update {version} arrived before {self._base_version + 1}")
        if self._quantized_run:
            if self._master is None:
                self._master = build_base_model(self.scenario.model, "cpu")
                self.num_builds += 1
            weights = {m: self._master.get_submodule(m).weight for m in ops.delta_modules(delta)}
        else:
            host = self.host(self._base_version)
            weights = {m: host.base_weight(m) for m in ops.delta_modules(delta)}
        with torch.no_grad():
            for module, weight in weights.items():
                if f"{module}.delta_W" in delta:
                    update = delta[f"{module}.delta_W"]
                else:
                    update = delta[f"{module}.delta_B"] @ delta[f"{module}.delta_A"]  # (d_out, d_in)
                weight.add_(update.to(device=weight.device, dtype=weight.dtype))
        self._base_version = version
        if self._quantized_run:
            self._hosts.clear()  # every variant is stale: each is re-quantized from the master on its next use
        else:
            self._hosts[FULL] = (version, self._hosts[FULL][1])
        return version

    def _faults(self, job: ClientJob) -> tuple[bool, bool, bool]:
        """(kill, nan, hang) for this attempt, drawn from (seed, round, client, attempt)."""
        f = self.scenario.faults
        if not f.any():
            return False, False, False
        u = np.random.default_rng([self.scenario.seed, job.server_round, job.spec.client_id, job.attempt, 13]).random(3)
        return bool(u[0] < f.kill_worker_prob), bool(u[1] < f.nan_update_prob), bool(u[2] < f.hang_prob)

    def run_client(self, job: ClientJob, payload: ClientPayload) -> tuple[ClientResult, ClientUpdate]:
        """Load the payload into the client's adapter, train locally, return its shared tensors."""
        t0 = time.perf_counter()
        kill, nan, hang = self._faults(job)
        if kill:
            os._exit(17)  # injected fault: the worker process dies mid-job
        if hang:
            time.sleep(self.scenario.faults.hang_s)
        return self._run_one(job, payload, nan, t0)

    def _run_one(self, job: ClientJob, payload: ClientPayload, nan: bool, t0: float
                 ) -> tuple[ClientResult, ClientUpdate]:
        host = self.host(payload.base_version, job.spec.quant)
        host.activate(payload.lora, payload.personal_lora, payload.mix)
        if payload.fresh:
            host.load(payload.lora, self._fresh_tensors(host.shapes(payload.lora), payload, job))
            self._load_personal(host, payload, job.spec.client_id, job.personal, job.spec.quant)
        else:
            self._load(host, payload, job.spec.client_id, job.personal, job.spec.quant)
        regularizer = None
        tail = payload.extras.get("tail_regularizer")
        if tail is not None:
            regularizer = tail_regularizer(host.params(payload.lora), payload.lora.scaling, tail["start"],
                                           tail["lambda"])
        procedure = PROCEDURES.get(payload.procedure)
        if procedure is None:
            raise BackendError(f"unknown local training procedure {payload.procedure!r}; known: {sorted(PROCEDURES)}")
        metrics = procedure(LocalJob(host, payload, self.data.train, job.indices, self.scenario.training,
                                     self.data.pad_id, (self.scenario.seed, job.server_round, job.spec.client_id),
                                     self.device, regularizer))
        metrics["train/clients_per_pass"] = 1.0
        trained = host.read(payload.lora)
        personal_adapter = host.read(payload.personal_lora, True) if payload.personal_lora is not None else None
        return self._finish(job, payload, trained, personal_adapter, metrics, nan, time.perf_counter() - t0)

    def _finish(self, job: ClientJob, payload: ClientPayload, trained: dict[str, torch.Tensor],
                personal_adapter: dict[str, torch.Tensor] | None, metrics: dict[str, float], nan: bool,
                time_s: float, note: str | None = None) -> tuple[ClientResult, ClientUpdate]:
        """The client's result and update from its trained tensors."""
        tail = payload.extras.get("tail_regularizer")
        if tail is not None:
            start_norm, end_norm = metrics["reg/tail_norm_start"], metrics["reg/tail_norm_end"]
            metrics["hetlora/rank"] = float(tail["start"] if end_norm < start_norm else payload.lora.rank)
        tensors = {k: v for k, v in trained.items() if self.strategy.is_shared(k)}
        if nan:  # injected fault: a corrupt update, which the server must reject
            tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
        self.num_clients += 1
        metrics["client/time_s"] = time_s
        metrics["client/up_bytes"] = float(ops.num_bytes(tensors))
        update = ClientUpdate(client_id=job.spec.client_id, num_examples=job.spec.num_examples, lora=payload.lora,
                              tensors=tensors, metrics=metrics)
        personal = None
        if self.strategy.has_personal_state:  # private keys of the main adapter and the whole personal adapter
            personal = {k: v for k, v in trained.items() if not self.strategy.is_shared(k)}
            if personal_adapter is not None:
                personal.update({personal_key(k): v for k, v in personal_adapter.items()})
        result = ClientResult(client_id=job.spec.client_id, num_examples=job.spec.num_examples, metrics=metrics,
                              worker=self.name, personal=personal, note=note)
        return result, update

    def run_pack(self, items: Sequence[tuple[ClientJob, ClientPayload]]) -> list[PackOutcome]:
        """Train several clients, packed into shared passes over one base wherever their local procedure allows
        (:mod:`fedsim.client.packed`), one by one otherwise. One outcome per item, in order: (result, update), or a
        :class:`ClientFailure` for a client that raised (the others go on)."""
        draws = [self._faults(job) for job, _ in items]
        if any(kill for kill, _, _ in draws):
            os._exit(17)  # injected fault: the worker dies, and with it every client of the pack
        if any(hang for _, _, hang in draws):
            time.sleep(self.scenario.faults.hang_s)  # the pack runs together: one hang holds all of it
        out: list[PackOutcome | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        alone: list[tuple[int, str]] = []
        for pos, (job, payload) in enumerate(items):
            why = self.unpackable(payload)
            if why:
                alone.append((pos, why))
            else:
                key = (payload.base_version, job.spec.quant if self._quantized_run else FULL, payload.trainable)
                groups.setdefault(key, []).append(pos)
        for positions in groups.values():
            if len(positions) == 1:
                alone.append((positions[0], ""))
                continue
            for pos, outcome in zip(positions, self._train_group([items[p] for p in positions],
                                                                 [draws[p][1] for p in positions])):
                out[pos] = outcome
        for pos, why in sorted(alone):
            job, payload = items[pos]
            try:
                result, update = self._run_one(job, payload, draws[pos][1], time.perf_counter())
                if why:
                    result = replace(result, note=why)
                out[pos] = (result, update)
            except Exception as e:  # one failing client must not end the pack
                out[pos] = ClientFailure.of(job.spec.client_id, e)
        return out  # type: ignore[return-value]

    def unpackable(self, payload: ClientPayload) -> str:
        """Why this payload's client cannot share a pass ("" when it can)."""
        if payload.procedure != "joint":
            return (f"resources.clients_per_pass: the {payload.procedure!r} local procedure (two-level training, "
                    f"e.g. FedDPA, PF2LoRA, iterative FedQLoRA) trains its clients one by one")
        if payload.personal_lora is not None:
            return ("resources.clients_per_pass: clients with a second, personal adapter (e.g. FedQLoRA's "
                    "quantization-aware adapter) train one by one")
        if self.scenario.model.lora_dropout > 0:
            return "resources.clients_per_pass: model.lora_dropout > 0 trains clients one by one"
        if set(payload.extras) - {"tail_regularizer"}:
            return (f"resources.clients_per_pass: payload extras {sorted(set(payload.extras))} are not supported "
                    "in a packed pass; clients train one by one")
        return ""

    def _train_group(self, items: Sequence[tuple[ClientJob, ClientPayload]], nans: Sequence[bool]
                     ) -> list[PackOutcome]:
        t0 = time.perf_counter()
        first_job, first = items[0]
        host = self.host(first.base_version, first_job.spec.quant)
        host.activate(first.lora)  # wraps the base with PEFT (once per worker); its own adapter stays unused
        shapes = host.shapes(first.lora)
        members: list[PackMember | None] = []
        out: list[PackOutcome | None] = [None] * len(items)
        for i, (job, payload) in enumerate(items):
            try:
                tensors = self._fresh_tensors(shapes, payload, job) if payload.fresh else \
                    self._initial_tensors(shapes, payload, job.spec.client_id, job.personal)
                member = PackMember(payload.lora, tensors, job.indices,
                                    (self.scenario.seed, job.server_round, job.spec.client_id),
                                    payload.extras.get("tail_regularizer"))
                check_member(member, shapes)
                members.append(member)
            except Exception as e:
                members.append(None)
                out[i] = ClientFailure.of(job.spec.client_id, e)
        live = [i for i, m in enumerate(members) if m is not None]
        if live:
            trained = train_packed(host.model, shapes, [members[i] for i in live], first.trainable,
                                   self.data.train, self.scenario.training, self.data.pad_id, self.device)
            elapsed = (time.perf_counter() - t0) / len(live)  # the pass's time, shared by its clients
            for i, res in zip(live, trained):
                job, payload = items[i]
                if isinstance(res, Exception):
                    out[i] = ClientFailure.of(job.spec.client_id, res)
                    continue
                tensors, metrics = res
                out[i] = self._finish(job, payload, tensors, None, metrics, nans[i], elapsed)
        return out  # type: ignore[return-value]

    def _seeded_init(self, shapes: dict, rank: int, *key: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.scenario.seed, *key]).integers(2**62)))
        return init_adapter(shapes, rank, gen)

    def _load(self, host: AdapterHost, payload: ClientPayload, client_id: int | None,
              personal: dict[str, torch.Tensor] | None, quant: QuantSpec = FULL) -> None:
        """Payload tensors, then the client's personal ones (:meth:`_initial_tensors`); the same for the personal
        adapter, if any."""
        host.load(payload.lora, self._initial_tensors(host.shapes(payload.lora), payload, client_id, personal))
        self._load_personal(host, payload, client_id, personal, quant)

    def _initial_tensors(self, shapes: dict, payload: ClientPayload, client_id: int | None,
                         personal: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The main adapter a client starts from: payload tensors, then its own private ones; keys neither gives (a
        client's first visit) start as PEFT does — B = 0, A random — seeded by (seed, client)."""
        own, _ = split_personal(personal or {})
        tensors = dict(payload.tensors)
        tensors.update(own)
        missing = {k for m in shapes for k in (ops.a_key(m), ops.b_key(m))} - set(tensors)
        if missing:
            init = self._seeded_init(shapes, payload.lora.rank, *([7] + ([client_id] if client_id is not None else [])))
            tensors.update({k: init[k] for k in missing})
        return tensors

    def _fresh_tensors(self, shapes: dict, payload: ClientPayload, job: ClientJob) -> dict[str, torch.Tensor]:
        """A new adapter, initialised here as PEFT does, seeded by (seed, round, client)."""
        return self._seeded_init(shapes, payload.lora.rank, job.server_round, job.spec.client_id, 5)

    def _load_personal(self, host: AdapterHost, payload: ClientPayload, client_id: int | None,
                       personal: dict[str, torch.Tensor] | None, quant: QuantSpec = FULL) -> None:
        if payload.personal_lora is None:
            return
        _, tensors = split_personal(personal or {})
        if not tensors:  # the client's first visit
            if payload.extras.get("procedure", {}).get("personal_init") == "loftq":
                tensors = self._loftq_init(host, quant, payload.personal_lora)
            else:
                tensors = self._seeded_init(host.shapes(payload.lora), payload.personal_lora.rank, 9,
                                            -1 if client_id is None else client_id)
        host.load(payload.personal_lora, tensors, personal=True)

    def quant_residuals(self, host: AdapterHost, quant: QuantSpec) -> Iterator[tuple[str, torch.Tensor]]:
        """(module, W − deq(q(W))) in float32 on CPU for every adapted module of ``host`` (a ``quant`` variant),
        one module at a time (they are d_out × d_in each: never all held at once)."""
        for module in sorted(host.target_paths()):
            layer = host.model.get_submodule("base_model.model." + module)
            if self._master is not None:
                full = self._master.get_submodule(module).weight.detach().float().cpu()
            else:
                full = dequantized_weight(layer).cpu()
            yield module, full - dequantized_weight(layer).cpu()

    def _loftq_init(self, host: AdapterHost, quant: QuantSpec, lora: LoraSpec) -> dict[str, torch.Tensor]:
        """LoftQ-style start of a quantization-aware adapter: s·B·A = the rank-r truncated SVD of W − deq(q(W)),
        split evenly (B = U √S / √s, A = √S Vᵀ / √s); once per (base version, bit width, rank) per worker."""
        key = (self._base_version, quant, lora)
        if key not in self._loftq:
            out = {}
            for module, resid in self.quant_residuals(host, quant):
                u, sv, vh = torch.linalg.svd(resid.double(), full_matrices=False)
                root = (sv[: lora.rank] / lora.scaling).sqrt()
                out[ops.b_key(module)] = (u[:, : lora.rank] * root).float()
                out[ops.a_key(module)] = (root[:, None] * vh[: lora.rank]).float()
            if len(self._loftq) >= 4 * MAX_BASES:
                self._loftq.pop(next(iter(self._loftq)))
            self._loftq[key] = out
        return {k: v.clone() for k, v in self._loftq[key].items()}

    def qa_measurements(self, host: AdapterHost, quant: QuantSpec, lora: LoraSpec,
                        qa: dict[str, torch.Tensor]) -> dict[str, float]:
        """How well a quantization-aware adapter's ΔW = s·B·A approximates the quantization error R = W − deq(q(W)),
        over all adapted modules: relative error ‖ΔW − R‖_F / ‖R‖_F and Pearson correlation of the entries."""
        err2 = ref2 = 0.0
        n = sx = sy = sxx = syy = sxy = 0.0
        for module, resid in self.quant_residuals(host, quant):
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

    def evaluate_clients(self, payload: ClientPayload, items: list[tuple]) -> dict[int, tuple[dict, dict]]:
        """Per client (id, personal tensors or None, local test indices[, its QuantSpec]), sums on its local test
        indices (train split), on its own base, with the global adapter alone and with its personal tensors on top:
        ``{client_id: (global_sums, personal_sums)}``."""
        out = {}
        for client_id, personal, indices, *rest in items:
            quant = rest[0] if rest else FULL
            host = self.host(payload.base_version, quant)
            own = self._personal_payload(payload, quant)
            host.activate(payload.lora)  # the global adapter alone
            self._load(host, replace(payload, personal_lora=None), client_id, None, quant)
            alone = evaluate_batch(host.model, self.data, indices, self.device, split=self.data.train)
            host.activate(own.lora, own.personal_lora, own.mix)
            self._load(host, own, client_id, personal, quant)
            dynamic = own.extras.get("dynamic")
            if dynamic and own.personal_lora is not None and len(rest) > 1 and len(rest[1]):
                mixed = self._dynamic_eval(host, own, client_id, np.asarray(indices), np.asarray(rest[1]), dynamic)
            else:
                mixed = evaluate_batch(host.model, self.data, indices, self.device, split=self.data.train)
            if own.extras.get("measure_qa") and own.personal_lora is not None:
                mixed.update(self.qa_measurements(host, quant, own.personal_lora,
                                                  host.read(own.personal_lora, personal=True)))
            out[client_id] = (alone, mixed)
        return out

    def _dynamic_eval(self, host: AdapterHost, own: ClientPayload, client_id: int, indices: np.ndarray,
                      train: np.ndarray, dynamic: dict) -> dict[str, float]:
        """FedDPA-D, as the authors' inference script computes it: per test instance, ``instances`` of the client's
        training instances drawn at random (seeded by seed, client, instance), embedded like the test prompt by the
        base with the local adapter alone (last layer, last prompt token or mean); w = ``max_weight`` × their mean
        cosine similarity weights the global adapter and 1 − w the local one (``weights: local`` swaps them). Sums
        as :func:`evaluate_batch`'s, over the instances one by one, plus ``dpa/weight_sum``."""
        from fedsim.client.evaluate import prompt_embeddings, similarity_weights

        split, n = self.data.train, min(int(dynamic["instances"]), len(train))
        picks = [np.random.default_rng([self.scenario.seed, client_id, int(i), 29]).choice(len(train), n,
                                                                                          replace=False)
                 for i in indices]
        used = np.unique(np.concatenate(picks))
        row_of = {int(j): r for r, j in enumerate(used)}
        host.activate(own.lora, own.personal_lora, (0.0, 1.0))  # the local adapter alone
        kind = dynamic.get("embedding", "last")
        ref = prompt_embeddings(host.model, split, train[used], self.data.pad_id, self.device, kind)
        test = prompt_embeddings(host.model, split, indices, self.data.pad_id, self.device, kind)
        weights = similarity_weights(test, ref, [np.asarray([row_of[int(j)] for j in p]) for p in picks],
                                     float(dynamic["max_weight"]))
        sums: dict[str, float] = {"dpa/weight_sum": float(weights.sum())}
        for i, w in zip(indices, weights.tolist()):
            host.activate(own.lora, own.personal_lora, (w, 1.0 - w) if dynamic.get("weights", "global") == "global"
                          else (1.0 - w, w))
            for k, v in evaluate_batch(host.model, self.data, [int(i)], self.device, split=split).items():
                sums[k] = sums.get(k, 0.0) + v
        host.activate(own.lora, own.personal_lora, own.mix)
        return sums

    @staticmethod
    def _personal_payload(payload: ClientPayload, quant: QuantSpec) -> ClientPayload:
        """The eval payload for a client at ``quant``: none of the personal adapter for the bit widths in
        ``extras["no_personal_for"]`` (FedQLoRA's full-precision clients have no quantization-aware adapter)."""
        if quant.label in payload.extras.get("no_personal_for", ()):
            return replace(payload, personal_lora=None)
        return payload

    def evaluate(self, payload: ClientPayload, batches: list[np.ndarray]) -> list[dict[str, float]]:
        """Evaluate the payload's adapter on batches of test indices; one dict of sums per batch."""
        host = self.host(payload.base_version)
        payload = replace(payload, personal_lora=None)  # the global model: no client's personal adapter
        host.activate(payload.lora)
        self._load(host, payload, None, None)
        return [evaluate_batch(host.model, self.data, b, self.device) for b in batches]

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "num_builds": self.num_builds,
                "num_wraps": sum(h.num_wraps for _, h in self._hosts.values()), "num_clients": self.num_clients,
                "quantizations": dict(self.quantizations), "base_bytes": dict(self.base_bytes),
                "device": str(self.device), "max_rss_mb": _max_rss_mb()}
