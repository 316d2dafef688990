"""The evaluation stage: the global model on the global test set, and — where clients hold out a local test split —
each client's own model (its base, the global adapter, its personal tensors) on it."""

from __future__ import annotations

from typing import Any

from fedsim.eval.metrics import Metric, reduce_eval
from fedsim.eval.personal import personal_metrics
from fedsim.federation.prepare import local_eval_clients
from fedsim.federation.rounds import Federation
from fedsim.runtime.interfaces import Backend, ServerHandle


class Evaluation:
    """When and what a run evaluates (``eval.every``, the last round; ``eval.local_clients``).

    Args:
        fed: the federation (its prepared data and clients, its client state store).
        batches: the global test set's batches.
        metrics: the run's metrics (reduced in the driver).
    """

    def __init__(self, fed: Federation, batches: list, metrics: tuple[Metric, ...]):
        sc = fed.scenario
        self.fed, self.batches, self.metrics = fed, batches, metrics
        self.clients = local_eval_clients(len(fed.prep.clients), sc.eval.local_clients, sc.seed)
        self.table: list[dict[str, Any]] = []  # the last personalized evaluation, one row per client

    def due(self, server_round: int) -> bool:
        sc = self.fed.scenario
        return server_round % sc.eval.every == 0 or server_round == sc.rounds

    def global_model(self, server: ServerHandle, backend: Backend, handle: Any = None) -> dict[str, float]:
        """``eval/*`` of the global model on the global test set."""
        handle = server.eval_handle() if handle is None else handle
        return reduce_eval(backend.evaluate(handle, self.batches), self.metrics)

    def __call__(self, server: ServerHandle, backend: Backend) -> dict[str, float]:
        """The global model's metrics, and the personalized ones (``eval/personal/*``, ``eval/local_global/*``,
        ``eval/qa/*``) when clients hold out local test splits."""
        handle = server.eval_handle()
        out = self.global_model(server, backend, handle)
        prep, store = self.fed.prep, self.fed.store
        if any(len(t) for t in prep.local_test):
            items = [(c, store.get(c) if store else None, prep.local_test[c], prep.clients[c].quant, prep.parts[c])
                     for c in self.clients]
            metrics, self.table = personal_metrics(backend.evaluate_clients(handle, items),
                                                   {c.client_id: c.quant.label for c in prep.clients})
            out.update(metrics)
        return out
