"""The evaluation stage: the global model on the global test set, and — where clients hold out a local test split —
each client's own model (its base, the global adapter, its personal tensors) on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import GenerateConfig
from fedsim.eval.metrics import Metric, reduce_eval, scored
from fedsim.eval.personal import personal_metrics
from fedsim.federation.prepare import local_eval_clients
from fedsim.federation.rounds import Federation
from fedsim.federation.rundir import write_text
from fedsim.runtime.interfaces import Backend, ServerHandle

GENERATIONS = "generations.jsonl"  # in the run directory: the kept generations of every generation round


def keep_rounds_until(path: Path, last_round: int) -> None:
    """On resume: a JSON-lines file keeps the lines of rounds up to ``last_round`` (and drops unreadable ones)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if int(json.loads(line)["round"]) <= last_round:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_text(path, "".join(kept))  # atomically, never through a link (a planted generations.tmp was followed)


class Evaluation:
    """When and what a run evaluates (``eval.every``, the last round; ``eval.local_clients``).

    Args:
        fed: the federation (its prepared data and clients, its client state store).
        batches: the global test set's batches.
        metrics: the run's metrics (reduced in the driver).
    """

    def __init__(self, fed: Federation, batches: list, metrics: tuple[Metric, ...]):
        sc = fed.scenario
        self.fed, self.batches = fed, batches
        self.metrics = scored(metrics)  # the teacher-forced pass's
        self.generative = tuple(m for m in metrics if getattr(m, "generative", False))
        self.gen = sc.generation() if self.generative else None
        test = fed.prep.data.test
        self.gen_batches = generation_batches(len(test), self.gen, sc.seed, test.prompt_len) if self.gen else []
        if sc.eval.harness is not None:  # an unknown task is a one-line error before round 1, not a worker's crash
            from fedsim.eval.harness import check_tasks

            check_tasks(sc.eval.harness)
        self.clients = local_eval_clients(len(fed.prep.clients), sc.eval.local_clients, sc.seed)
        self.table: list[dict[str, Any]] = []  # the last personalized evaluation, one row per client
        self.samples: list[dict[str, Any]] = []  # the last generation's kept samples (eval.generate.log_samples)

    def due(self, server_round: int) -> bool:
        sc = self.fed.scenario
        return (server_round % sc.eval.every == 0 or server_round == sc.rounds or self.generates(server_round)
                or self.benchmarks(server_round))

    def generates(self, server_round: int) -> bool:
        """Generation runs every ``eval.generate.every`` rounds and at the last (never before training)."""
        return self.gen is not None and self._periodic(self.gen.every, server_round)

    def benchmarks(self, server_round: int) -> bool:
        """lm-evaluation-harness runs every ``eval.harness.every`` rounds and at the last (never before training)."""
        h = self.fed.scenario.eval.harness
        return h is not None and self._periodic(h.every, server_round)

    def _periodic(self, every: int | None, server_round: int) -> bool:
        return server_round >= 1 and (server_round == self.fed.scenario.rounds
                                      or (every is not None and server_round % every == 0))

    def harness(self, backend: Backend, handle: Any, server_round: int) -> dict[str, float]:
        """``harness/<task>/<metric>`` of the global model, ``harness/client_<id>/<task>/<metric>`` of each named
        client's own model."""
        prep, store = self.fed.prep, self.fed.store
        items = [(c, store.get(c) if store else None, prep.clients[c].quant)
                 for c in self.fed.scenario.eval.harness.clients]
        out = {}
        for who, results in backend.harness(handle, items, server_round).items():
            prefix = f"harness/{who}/" if who else "harness/"
            out.update({prefix + k: v for k, v in results.items()})
        return out

    def global_model(self, server: ServerHandle, backend: Backend, handle: Any = None) -> dict[str, float]:
        """``eval/*`` of the global model on the global test set."""
        handle = server.eval_handle() if handle is None else handle
        return reduce_eval(backend.evaluate(handle, self.batches), self.metrics)

    def __call__(self, server: ServerHandle, backend: Backend, server_round: int = 0) -> dict[str, float]:
        """The global model's metrics, and the personalized ones (``eval/personal/*``, ``eval/local_global/*``,
        ``eval/qa/*``) when clients hold out local test splits; at generation rounds the generative metrics too
        (``eval/gen/*``, ``eval/personal/gen/*``) and :attr:`samples`."""
        handle = server.eval_handle()
        out = self.global_model(server, backend, handle)
        generating = self.generates(server_round)
        self.samples = []
        if generating:
            parts = backend.generate(handle, self.gen_batches, server_round)
            out.update(reduce_eval([sums for sums, _ in parts], self.generative))
            kept = [s for _, samples in parts for s in samples][: self.gen.log_samples]
            self.samples = [{"round": server_round, **s} for s in kept]
        if self.benchmarks(server_round):
            out.update(self.harness(backend, handle, server_round))
        prep, store = self.fed.prep, self.fed.store
        if any(len(t) for t in prep.local_test):
            items = [(c, store.get(c) if store else None, prep.local_test[c], prep.clients[c].quant, prep.parts[c])
                     for c in self.clients]
            personal_gen = generating and self.gen.personal
            per_client = (backend.evaluate_clients(handle, items, server_round) if personal_gen
                          else backend.evaluate_clients(handle, items))
            metrics, self.table = personal_metrics(per_client, {c.client_id: c.quant.label for c in prep.clients})
            out.update(metrics)
            if personal_gen:
                pooled = reduce_eval([{k: v for k, v in p.items() if k.startswith("gen/")}
                                      for _, p in per_client.values()], self.generative)
                out.update({"eval/personal/" + k[len("eval/"):]: v for k, v in pooled.items()})
        return out


def generation_batches(n_test: int, gen: GenerateConfig, seed: int, prompt_len: np.ndarray | None = None
                       ) -> list[np.ndarray]:
    """The test samples generated for: a fixed seeded subset of ``max_samples`` (all when None or more), ordered
    by prompt length when the lengths are given (less left padding in each batch; ties in index order), cut into
    batches of ``batch_size``."""
    idx = np.arange(n_test)
    if gen.max_samples is not None and gen.max_samples < n_test:
        idx = np.sort(np.random.default_rng([seed, 31]).choice(n_test, size=gen.max_samples, replace=False))
    if prompt_len is not None:
        idx = idx[np.argsort(np.asarray(prompt_len)[idx], kind="stable")]
    return [idx[i : i + gen.batch_size] for i in range(0, len(idx), gen.batch_size)]
