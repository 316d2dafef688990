"""A worker trains many virtual clients in turn with one cached base model.

The base model is built once per worker (and per base version and bit width: :mod:`fedsim.runtime.bases`); LoRA is
attached once with PEFT; per client only the adapter weights are copied in (:mod:`fedsim.runtime.starts`). Packed
clients (:mod:`fedsim.runtime.pack_runner`) and personalized evaluation (:mod:`fedsim.runtime.personal_eval`) work
over the same caches. ``stats()`` exposes counters that tests use to prove it.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedsim.client.procedures import LocalJob
from fedsim.client.schedule import round_lr
from fedsim.client.trainer import METRIC_KEYS, ROUND_METRICS, bind_objectives, objective_keys
from fedsim.components import Components, resolve
from fedsim.config import Scenario, scenario_from_dict
from fedsim.data.tokenized import TokenizedData
from fedsim.errors import AggregationError, BackendError
from fedsim.eval.scoring import evaluate_batch
from fedsim.lora import ops
from fedsim.lora.ops import personal_key
from fedsim.models.adapters import AdapterHost
from fedsim.models.base import configure_threads
from fedsim.models.tasks import task_for
from fedsim.objectives import state_out
from fedsim.pipeline import TransformContext, fault_draws
from fedsim.pipeline.transforms import Sent
from fedsim.runtime import pack_runner, personal_eval
from fedsim.runtime.bases import BaseCache
from fedsim.runtime.starts import AdapterStarts, head_of
from fedsim.server import Folder, FoldSpec
from fedsim.strategies.fold import Partial
from fedsim.types import (
    FULL,
    ClientFailure,
    ClientJob,
    ClientPayload,
    ClientResult,
    ClientUpdate,
    QuantSpec,
    Tensors,
)

# metrics the worker itself adds
WORKER_KEYS = ("client/time_s", "client/up_bytes", "train/clients_per_pass", "engine/clients_per_call")
PackOutcome = tuple[ClientResult, ClientUpdate] | ClientFailure


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB): Linux's VmHWM, which starts afresh with the program —
    ``getrusage``'s ``ru_maxrss`` is inherited across fork and exec, so a spawned process would report its parent's
    peak (measured: a child of a 1.5 GB parent reported 1,514 MB, its VmHWM 15 MB). Elsewhere ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def pick_device(num_gpus: float) -> torch.device:
    """CUDA when the worker was given GPU resources and CUDA is present, else CPU."""
    if num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def in_call(outcomes: list[PackOutcome]) -> list[PackOutcome]:
    """The outcomes of one call, each trained client's metrics saying how many clients the call had."""
    for o in outcomes:
        if not isinstance(o, ClientFailure):
            o[0].metrics["engine/clients_per_call"] = float(len(outcomes))
    return outcomes


class Worker:
    """Runs client jobs and evaluation batches on a cached model.

    Args:
        scenario: the resolved scenario (or its dict, validated here without the strategy checks: the driver ran
            them).
        data: tokenized data (shared read-only); None until :meth:`attach` gives it (the Ray backend starts its
            workers before the driver has tokenized the data).
        name: a label for metrics (e.g. ``worker-0``).
        num_gpus: this worker's GPU share (default: ``resources.num_gpus``; a worker pool's own otherwise).
        components: the run's resolved components (:mod:`fedsim.components`); resolved here from the scenario's
            names when not given (a worker used on its own), or given later by :meth:`attach`.
    """

    def __init__(self, scenario: Scenario | dict[str, Any], data: TokenizedData | None, name: str = "worker-0",
                 num_gpus: float | None = None, components: Components | None = None):
        from fedsim.quiet import silence_libraries

        silence_libraries()  # in a worker process of a command-line run (FEDSIM_QUIET=1): no library chatter
        if isinstance(scenario, dict):
            scenario = scenario_from_dict(scenario, check_strategy=False)
        # transformers/PEFT deprecation chatter would repeat in every actor's log
        warnings.filterwarnings("ignore", category=FutureWarning)
        self.scenario = scenario
        self.data = data
        self.name = name
        configure_threads(scenario.resources.threads_per_worker())
        self.device = pick_device(scenario.resources.num_gpus if num_gpus is None else num_gpus)
        self._components = components
        self.bases = BaseCache(scenario, components.task if components else task_for(scenario.model), self.device)
        self.starts = AdapterStarts(scenario.seed, self.bases)
        self.num_clients = 0
        self.num_calls = 0  # training calls: one per client, pack or run_clients
        self._tokenizer: Any = None
        self._folder: Folder | None = None

    # -- set-up ------------------------------------------------------------------------------------------------
    @property
    def components(self) -> Components:
        if self._components is None:
            self._components = resolve(self.scenario)
        return self._components

    @property
    def strategy(self) -> Any:
        return self.components.strategy

    def attach(self, data: TokenizedData, components: Components | None = None) -> None:
        """Give the worker its data and the run's components (once, before its first job)."""
        self.data = data
        if components is not None:
            self._components = components
            if type(components.task) is not type(self.bases.task):  # a base built for another task is of no use
                self.bases = BaseCache(self.scenario, components.task, self.device)
                self.starts = AdapterStarts(self.scenario.seed, self.bases)

    def host(self, base_version: int = 0, quant: QuantSpec = FULL) -> AdapterHost:
        """The cached PEFT model for ``base_version`` at ``quant`` (built or quantized on first use)."""
        return self.bases.host(base_version, quant)

    def apply_base_delta(self, version: int, delta: Tensors) -> int:
        """Merge base-model update ``version`` into the cached base (:meth:`BaseCache.apply_delta`)."""
        return self.bases.apply_delta(version, delta)

    @property
    def _master(self) -> torch.nn.Module | None:
        return self.bases.master

    @property
    def _base_version(self) -> int:
        return self.bases.version

    @property
    def num_builds(self) -> int:
        return self.bases.num_builds

    @property
    def quantizations(self) -> dict[str, int]:
        return self.bases.quantizations

    @property
    def base_bytes(self) -> dict[str, int]:
        return self.bases.base_bytes

    # -- training ------------------------------------------------------------------------------------------------
    def process_faults(self, job: ClientJob) -> tuple[bool, bool]:
        """(kill the worker, hang) for this attempt: the injected process faults (``faults``), drawn from
        (seed, round, client, attempt); a corrupt update is a client-side transform (:class:`~fedsim.pipeline.NanFault`)."""
        f = self.scenario.faults
        if not f.in_process():
            return False, False
        u = fault_draws(self.scenario.seed, job.server_round, job.spec.client_id, job.attempt)
        return bool(u[0] < f.kill_worker_prob), bool(u[2] < f.hang_prob)

    def run_client(self, job: ClientJob, payload: ClientPayload) -> tuple[ClientResult, ClientUpdate]:
        """Load the payload into the client's adapter, train locally, return its shared tensors."""
        self.num_calls += 1
        return self._client(job, payload)

    def _client(self, job: ClientJob, payload: ClientPayload) -> tuple[ClientResult, ClientUpdate]:
        """One client: its injected process faults (a hang before its training, a kill after it: the worker dies
        mid-job, its work lost), and its training."""
        t0 = time.perf_counter()
        kill, hang = self.process_faults(job)
        if hang:
            time.sleep(self.scenario.faults.hang_s)
        out = self.train_one(job, payload, t0)
        if kill:
            os._exit(17)  # injected fault: the worker process dies mid-job, as an out-of-memory kill would
        return out

    def train_one(self, job: ClientJob, payload: ClientPayload, t0: float) -> tuple[ClientResult, ClientUpdate]:
        """One client's local training (no injected process faults)."""
        host = self.host(payload.base_version, job.spec.quant)
        host.activate(payload.lora, payload.personal_lora, payload.mix)
        fresh = None
        if payload.fresh:
            fresh = self.starts.fresh(host.shapes(payload.lora), payload, job)
            host.load(payload.lora, fresh)
            host.load_head(head_of(payload, job.personal))
            self.starts.load_personal(host, payload, job.spec.client_id, job.personal, job.spec.quant)
        else:
            self.starts.load(host, payload, job.spec.client_id, job.personal, job.spec.quant)
        procedure = self.procedure(payload)
        objectives = bind_objectives(payload.objectives, host.params(payload.lora), payload.lora, job.personal)
        seed = (self.scenario.seed, job.server_round, job.spec.client_id)
        cfg = self.scenario.training
        if cfg.gradient_checkpointing:
            host.enable_checkpointing()
        metrics = procedure(LocalJob(host, payload, self.data.train, job.indices, cfg, self.data.pad_id, seed,
                                     self.device, self.components.task, objectives,
                                     round_lr(cfg, job.server_round, self.scenario.rounds)))
        metrics["train/clients_per_pass"] = 1.0
        trained = host.read(payload.lora)
        personal_adapter = host.read(payload.personal_lora, True) if payload.personal_lora is not None else None
        return self.finish(job, payload, trained, personal_adapter, metrics, time.perf_counter() - t0,
                           procedure=procedure, objective_state=state_out(list(payload.objectives), objectives),
                           extra=state_out(list(payload.objectives), objectives, upload=True), start=fresh,
                           head=host.read_head())

    def procedure(self, payload: ClientPayload) -> Any:
        """The payload's local training procedure: itself when it is one, else the one the driver resolved under its
        name (:attr:`Components.procedures`).

        Raises:
            BackendError: no procedure of that name was registered in the driver when the run started.
        """
        if callable(payload.procedure):
            return payload.procedure
        found = self.components.procedures.get(str(payload.procedure).lower())
        if found is None:
            raise BackendError(f"local training procedure {payload.procedure!r} was not registered when the run "
                               f"started (known: {', '.join(sorted(self.components.procedures))}); register it "
                               "before calling run, or put the callable in the payload")
        return found

    def finish(self, job: ClientJob, payload: ClientPayload, trained: Tensors, personal_adapter: Tensors | None,
               metrics: dict[str, float], time_s: float, note: str | None = None, procedure: Any = None,
               objective_state: Tensors | None = None, extra: Tensors | None = None, start: Tensors | None = None,
               head: Tensors | None = None) -> tuple[ClientResult, ClientUpdate]:
        """The client's result and update from its trained tensors: the shared ones through the client-side
        transforms, the private ones (the personal adapter, the objectives' state) into the result for the client
        state store. ``start``: the adapter the client began from when the payload did not carry it (a fresh one);
        ``head``: the trained head of a model task that has one (uploaded beside the adapter)."""
        tensors = {k: v for k, v in trained.items() if self.strategy.is_shared(k)}
        own_head = head if head and not self.strategy.aggregates else None  # kept by the client, never uploaded
        head = None if own_head else head
        began = payload.tensors if start is None else start
        start = {k: began[k] for k in tensors if k in began}
        if head and any(t.sees_head for t in self.components.transforms):  # the head it started from
            source = self.host(payload.base_version, job.spec.quant).head_source(head_of(payload, job.personal))
            start.update({k: source[k] for k in head})
        ctx = TransformContext(self.scenario.seed, job.server_round, job.spec.client_id, job.attempt, start)
        tensors, head, wire, kept = self._transform(tensors, head or {}, ctx, metrics, job.personal)
        self.num_clients += 1
        metrics["client/time_s"] = time_s
        metrics.setdefault("engine/clients_per_call", 1.0)  # a call of several clients says how many (in_call)
        metrics["client/up_bytes"] = float(ops.sent_bytes(tensors, wire) + ops.num_bytes(extra or {})
                                           + ops.sent_bytes(head, wire))
        logged = self._declared(metrics, payload, procedure)
        update = ClientUpdate(client_id=job.spec.client_id, num_examples=job.spec.num_examples, lora=payload.lora,
                              tensors=tensors, metrics=metrics, extra=extra or {}, head=head or {}, wire=wire)
        personal = kept or None
        if self.strategy.has_personal_state:  # private keys of the main adapter and the whole personal adapter
            personal = {**(personal or {}), **{k: v for k, v in trained.items() if not self.strategy.is_shared(k)}}
            if personal_adapter is not None:
                personal.update({personal_key(k): v for k, v in personal_adapter.items()})
        if own_head:
            personal = {**(personal or {}), **own_head}
        if objective_state:
            personal = {**(personal or {}), **objective_state}
        result = ClientResult(client_id=job.spec.client_id, num_examples=job.spec.num_examples, metrics=metrics,
                              worker=self.name, personal=personal, note=note, logged=logged)
        return result, update

    def _transform(self, tensors: Tensors, head: Tensors, ctx: TransformContext, metrics: dict[str, float],
                   personal: Tensors | None) -> tuple[Tensors, Tensors, dict[str, int] | None, Tensors]:
        """The client-side transforms in order (one that ``sees_head`` gets the uploaded head's tensors beside the
        adapter's): the adapter tensors and the head sent, their wire sizes where the last transform encoded them,
        and the transforms' new client state (keys ``transform.<state_key>.<key>``); their metrics join
        ``metrics``."""
        wire, kept = None, {}
        for transform in self.components.transforms:
            key = transform.state_key if transform.keeps_state else None
            prefix = f"{ops.TRANSFORM_PREFIX}{key}."
            own = {k[len(prefix):]: v for k, v in (personal or {}).items() if k.startswith(prefix)} if key else None
            both = transform.sees_head and head
            sent = Sent.of(transform({**tensors, **head} if both else tensors, replace(ctx, state=own)))
            tensors, wire = sent.tensors, sent.wire
            if both:
                head = {k: v for k, v in tensors.items() if k.startswith(ops.HEAD_PREFIX)}
                tensors = {k: v for k, v in tensors.items() if not k.startswith(ops.HEAD_PREFIX)}
            metrics.update(sent.metrics)
            if key is not None:  # a client with nothing new keeps what it had
                kept.update({prefix + k: v for k, v in (sent.state if sent.state is not None else own or {}).items()})
        return tensors, head, wire, kept

    def _declared(self, metrics: dict[str, float], payload: ClientPayload, procedure: Any) -> tuple[str, ...]:
        """The keys of ``metrics`` the round's row reports; every key must be declared by the component that emits
        it (the recipe, the procedure, an objective, a transform), so that none is dropped silently.

        Raises:
            BackendError: a metric no component declares.
        """
        obj_keys, obj_round = objective_keys(payload.objectives)
        parts = [procedure, *self.components.transforms] if procedure is not None else list(self.components.transforms)
        declared = set(METRIC_KEYS) | set(WORKER_KEYS) | set(obj_keys)
        logged = set(ROUND_METRICS) | set(obj_round)
        for part in parts:
            declared |= set(getattr(part, "metric_keys", ()))
            logged |= set(getattr(part, "round_metrics", ()))
        undeclared = sorted(set(metrics) - declared)
        if undeclared:
            raise BackendError(f"client metric(s) {undeclared} are not declared by the component that reports them; "
                               "list them in its metric_keys (and round_metrics to log them per round)")
        return tuple(sorted(logged & set(metrics)))

    # -- partials (resources.worker_partials) -------------------------------------------------------------------
    def fold(self, spec: FoldSpec, outcome: PackOutcome) -> ClientResult | ClientFailure:
        """Fold a trained client's update into this worker's partial of the round (validated here, its rejection
        reported in the result); the update is not sent. A failure passes through."""
        if isinstance(outcome, ClientFailure):
            return outcome
        result, update = outcome
        if self._folder is None:
            self._folder = Folder(self.strategy)
        try:
            cost, why = self._folder.fold(spec, update)
        except AggregationError as e:
            return ClientFailure.of(result.client_id, e)
        return replace(result, upload=cost, rejected=why)

    def take_partial(self, server_round: int) -> Partial | None:
        """The partial of the clients this worker folded in ``server_round`` (None if none); it starts anew after."""
        return self._folder.take(server_round) if self._folder is not None else None

    def run_pack(self, items: Sequence[tuple[ClientJob, ClientPayload]]) -> list[PackOutcome]:
        """Train several clients, packed into shared passes where they can be (:mod:`fedsim.runtime.pack_runner`)."""
        self.num_calls += 1
        return in_call(pack_runner.run_pack(self, items))

    def run_clients(self, items: Iterable[tuple[ClientJob, ClientPayload]]) -> list[PackOutcome]:
        """Train several clients one after another in one call (``resources.clients_per_call``), each exactly as
        :meth:`run_client` would — its own injected faults drawn in turn — and each failing alone: a client that
        raises is a :class:`ClientFailure` and the next one trains. ``items`` may be lazy (a payload is unpacked
        only when its client starts)."""
        self.num_calls += 1
        out: list[PackOutcome] = []
        for job, payload in items:
            try:
                out.append(self._client(job, payload))
            except Exception as e:
                out.append(ClientFailure.of(job.spec.client_id, e))
        return in_call(out)

    def unpackable(self, payload: ClientPayload) -> str:
        """Why this payload's client cannot share a pass ("" when it can)."""
        return pack_runner.unpackable(self, payload)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, payload: ClientPayload, batches: list[np.ndarray]) -> list[dict[str, float]]:
        """Evaluate the payload's adapter on batches of test indices; one dict of metric sums per batch."""
        host = self._global_model(payload)
        c = self.components
        return [evaluate_batch(host.model, self.data, b, self.device, task=c.task, metrics=c.metrics)
                for b in batches]

    def generate(self, payload: ClientPayload, batches: list[np.ndarray], server_round: int
                 ) -> list[tuple[dict[str, float], list[dict[str, Any]]]]:
        """Generate with the global model for batches of test indices (:mod:`fedsim.eval.generation`): per batch the
        generative metrics' sums and the samples."""
        host = self._global_model(payload)
        return [personal_eval.generation_sums(self, host, b, server_round) for b in batches]

    def harness(self, payload: ClientPayload, items: list[tuple], server_round: int) -> dict[str, dict[str, float]]:
        """lm-evaluation-harness (:mod:`fedsim.eval.harness`) on the global model (key ``""``) and on each item's
        client's own model (``(client_id, personal tensors or None, QuantSpec)``; key ``client_<id>``)."""
        from fedsim.eval.harness import run_harness

        cfg = self.scenario.eval.harness
        seed = self.scenario.seed + server_round
        out = {"": run_harness(self._global_model(payload).model, self.tokenizer(), cfg, seed)}
        for client_id, personal, quant in items:
            host = personal_eval.own_model(self, payload, client_id, personal, quant)
            out[f"client_{client_id}"] = run_harness(host.model, self.tokenizer(), cfg, seed)
        return out

    def _global_model(self, payload: ClientPayload) -> AdapterHost:
        from dataclasses import replace

        host = self.host(payload.base_version)
        payload = replace(payload, personal_lora=None)  # the global model: no client's personal adapter
        host.activate(payload.lora)
        self.starts.load(host, payload, None, None)
        return host

    @functools.cached_property
    def generation(self) -> Any:
        """The scenario's generation settings (:meth:`fedsim.config.Scenario.generation`), or None; resolved once."""
        return self.scenario.generation()

    def tokenizer(self) -> Any:
        """The model's tokenizer (decoding generations), loaded once."""
        if self._tokenizer is None:
            self._tokenizer = self.components.task.tokenizer(self.scenario.model)
        return self._tokenizer

    def evaluate_clients(self, payload: ClientPayload, items: list[tuple], server_round: int | None = None
                         ) -> dict[int, tuple[dict, dict]]:
        """Each client's own model on its local test split (:func:`~fedsim.runtime.personal_eval.evaluate_clients`);
        with ``server_round``, its generations too."""
        return personal_eval.evaluate_clients(self, payload, items, server_round)

    def quant_residuals(self, host: AdapterHost, quant: QuantSpec):
        return self.bases.residuals(host, quant)

    def _load(self, host: AdapterHost, payload: ClientPayload, client_id: int | None, personal: Tensors | None,
              quant: QuantSpec = FULL) -> None:
        self.starts.load(host, payload, client_id, personal, quant)

    def stats(self) -> dict[str, Any]:
        b = self.bases
        return {"name": self.name, "pid": os.getpid(), "num_builds": b.num_builds, "num_wraps": b.num_wraps(),
                "num_clients": self.num_clients, "num_calls": self.num_calls, "quantizations": dict(b.quantizations),
                "base_bytes": dict(b.base_bytes), "device": str(self.device), "max_rss_mb": peak_rss_mb()}


__all__ = ["ClientFailure", "ClientJob", "PackOutcome", "Worker", "pick_device"]
