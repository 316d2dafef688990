"""A worker trains many virtual clients in turn with one cached base model.

The base model is built once per worker (and per base version, later per bit width); LoRA is attached once with PEFT;
per client only the adapter weights are copied in. ``stats()`` exposes counters that tests use to prove it.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedsim.client.evaluate import evaluate_batch
from fedsim.client.procedures import PROCEDURES, LocalJob
from fedsim.client.trainer import tail_regularizer
from fedsim.config import Scenario
from fedsim.data.datasets import TokenizedData
from fedsim.errors import BackendError
from fedsim.lora.ops import init_adapter, personal_key, split_personal
from fedsim.models.adapters import AdapterHost
from fedsim.models.base import build_base_model, configure_threads
from fedsim.strategies import make_strategy
from fedsim.types import ClientPayload, ClientResult, ClientSpec, ClientUpdate


@dataclass(frozen=True)
class ClientJob:
    """One client's work in one round (``attempt`` counts retries from 1)."""

    spec: ClientSpec
    indices: np.ndarray
    server_round: int
    attempt: int = 1
    personal: dict[str, torch.Tensor] | None = None  # the client's private tensors from earlier rounds


def pick_device(num_gpus: float) -> torch.device:
    """CUDA when the worker was given GPU resources and CUDA is present, else CPU."""
    if num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class Worker:
    """Runs client jobs and evaluation batches on a cached model.

    Args:
        scenario: the resolved scenario.
        data: tokenized data (shared read-only).
        name: a label for metrics (e.g. ``worker-0``).
    """

    def __init__(self, scenario: Scenario | dict[str, Any], data: TokenizedData, name: str = "worker-0"):
        if isinstance(scenario, dict):
            from fedsim.config import scenario_from_dict

            scenario = scenario_from_dict(scenario)
        # transformers/PEFT deprecation chatter would repeat in every actor's log
        warnings.filterwarnings("ignore", category=FutureWarning)
        self.scenario = scenario
        self.data = data
        self.name = name
        configure_threads(scenario.resources.threads_per_worker())
        self.device = pick_device(scenario.resources.num_gpus)
        self.strategy = make_strategy(scenario.strategy.name, scenario.strategy.params)
        self._host: AdapterHost | None = None
        self._base_version = 0
        self.num_builds = 0
        self.num_clients = 0

    def host(self, base_version: int = 0) -> AdapterHost:
        """The cached PEFT model for ``base_version`` (built on first use)."""
        if self._host is None:
            base = build_base_model(self.scenario.model, self.device)
            self.num_builds += 1
            self._host = AdapterHost(base, self.scenario.model.target_modules, self.scenario.model.lora_dropout)
        if base_version != self._base_version:
            raise BackendError(
                f"payload asks for base version {base_version}, worker holds {self._base_version}: "
                "merging updates into the base model is not supported by this worker yet"
            )
        return self._host

    def apply_base_delta(self, version: int, delta: dict[str, torch.Tensor]) -> int:
        """Merge base-model update ``version`` into the cached base, in place (once per version per worker).

        ``delta`` holds per module ``<module>.delta_B`` (d_out, R) and ``<module>.delta_A`` (R, d_in), or a dense
        ``<module>.delta_W`` (d_out, d_in). Returns the worker's base version afterwards.
        """
        host = self.host(self._base_version)
        if version <= self._base_version:
            return self._base_version  # already applied (e.g. replayed to a replacement worker)
        if version != self._base_version + 1:
            raise BackendError(f"base update {version} arrived before {self._base_version + 1}")
        with torch.no_grad():
            for module in sorted({k.rsplit(".delta_", 1)[0] for k in delta}):
                weight = host.base_weight(module)
                if f"{module}.delta_W" in delta:
                    update = delta[f"{module}.delta_W"]
                else:
                    update = delta[f"{module}.delta_B"] @ delta[f"{module}.delta_A"]  # (d_out, d_in)
                weight.add_(update.to(device=weight.device, dtype=weight.dtype))
        self._base_version = version
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
        host = self.host(payload.base_version)
        host.activate(payload.lora, payload.personal_lora, payload.mix)
        if payload.fresh:  # a new adapter, initialised here as PEFT does, seeded by (seed, round, client)
            gen = torch.Generator().manual_seed(
                int(np.random.default_rng([self.scenario.seed, job.server_round, job.spec.client_id, 5]).integers(2**62)))
            host.load(payload.lora, init_adapter(host.shapes(payload.lora), payload.lora.rank, gen))
            self._load_personal(host, payload, job.spec.client_id, job.personal)
        else:
            self._load(host, payload, job.spec.client_id, job.personal)
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
        if tail is not None:
            start_norm, end_norm = metrics["reg/tail_norm_start"], metrics["reg/tail_norm_end"]
            metrics["hetlora/rank"] = float(tail["start"] if end_norm < start_norm else payload.lora.rank)
        trained = host.read(payload.lora)
        tensors = {k: v for k, v in trained.items() if self.strategy.is_shared(k)}
        if nan:  # injected fault: a corrupt update, which the server must reject
            tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
        self.num_clients += 1
        metrics["client/time_s"] = time.perf_counter() - t0
        update = ClientUpdate(client_id=job.spec.client_id, num_examples=job.spec.num_examples, lora=payload.lora,
                              tensors=tensors, metrics=metrics)
        personal = None
        if self.strategy.has_personal_state:  # private keys of the main adapter and the whole personal adapter
            personal = {k: v for k, v in trained.items() if not self.strategy.is_shared(k)}
            if payload.personal_lora is not None:
                personal.update({personal_key(k): v for k, v in host.read(payload.personal_lora, True).items()})
        result = ClientResult(client_id=job.spec.client_id, num_examples=job.spec.num_examples, metrics=metrics,
                              worker=self.name, personal=personal)
        return result, update

    def _seeded_init(self, shapes: dict, rank: int, *key: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.scenario.seed, *key]).integers(2**62)))
        return init_adapter(shapes, rank, gen)

    def _load(self, host: AdapterHost, payload: ClientPayload, client_id: int | None,
              personal: dict[str, torch.Tensor] | None) -> None:
        """Payload tensors, then the client's personal ones; keys neither gives (a client's first visit) start as
        PEFT does — B = 0, A random — seeded by (seed, client). The same for the personal adapter, if any."""
        own, _ = split_personal(personal or {})
        tensors = dict(payload.tensors)
        tensors.update(own)
        missing = set(host.params(payload.lora)) - set(tensors)
        if missing:
            init = self._seeded_init(host.shapes(payload.lora), payload.lora.rank,
                                     *([7] + ([client_id] if client_id is not None else [])))
            tensors.update({k: init[k] for k in missing})
        host.load(payload.lora, tensors)
        self._load_personal(host, payload, client_id, personal)

    def _load_personal(self, host: AdapterHost, payload: ClientPayload, client_id: int | None,
                       personal: dict[str, torch.Tensor] | None) -> None:
        if payload.personal_lora is None:
            return
        _, tensors = split_personal(personal or {})
        if not tensors:  # the client's first visit
            tensors = self._seeded_init(host.shapes(payload.lora), payload.personal_lora.rank, 9,
                                        -1 if client_id is None else client_id)
        host.load(payload.personal_lora, tensors, personal=True)

    def evaluate_clients(self, payload: ClientPayload, items: list[tuple[int, dict | None, np.ndarray]]
                         ) -> dict[int, tuple[dict[str, float], dict[str, float]]]:
        """Per client, sums on its local test indices (train split) with the global adapter alone and with its
        personal tensors on top: ``{client_id: (global_sums, personal_sums)}``."""
        host = self.host(payload.base_version)
        out = {}
        for client_id, personal, indices in items:
            host.activate(payload.lora)  # the global adapter alone
            self._load(host, replace(payload, personal_lora=None), client_id, None)
            alone = evaluate_batch(host.model, self.data, indices, self.device, split=self.data.train)
            host.activate(payload.lora, payload.personal_lora, payload.mix)
            self._load(host, payload, client_id, personal)
            mixed = evaluate_batch(host.model, self.data, indices, self.device, split=self.data.train)
            out[client_id] = (alone, mixed)
        return out

    def evaluate(self, payload: ClientPayload, batches: list[np.ndarray]) -> list[dict[str, float]]:
        """Evaluate the payload's adapter on batches of test indices; one dict of sums per batch."""
        host = self.host(payload.base_version)
        payload = replace(payload, personal_lora=None)  # the global model: no client's personal adapter
        host.activate(payload.lora)
        self._load(host, payload, None, None)
        return [evaluate_batch(host.model, self.data, b, self.device) for b in batches]

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "num_builds": self.num_builds,
                "num_wraps": self._host.num_wraps if self._host else 0, "num_clients": self.num_clients,
                "device": str(self.device)}
