"""In-process, sequential backend for tests and debugging (no Ray)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedsim.components import Components
from fedsim.config import Scenario
from fedsim.data.tokenized import TokenizedData
from fedsim.runtime.interfaces import Backend, Handle, JobOutcome, ServerHandle, Sink, drain
from fedsim.runtime.packs import make_packs
from fedsim.runtime.worker import Worker
from fedsim.server import Server
from fedsim.strategies import StrategySpec
from fedsim.types import ClientFailure, ClientJob, ClientResult, ClientSpec, RoundContext, RoundReport


class LocalServerHandle(ServerHandle):
    """The server in this process (the Ray backend's :class:`DriverServerHandle` too, over object references)."""

    def __init__(self, server: Server):
        self.server = server

    def configure(self, ctx: RoundContext, clients: Sequence[ClientSpec]):
        return self.server.configure(ctx, clients)

    def aggregate(self, ctx: RoundContext, updates: Sequence[Handle]) -> RoundReport:
        return self.server.aggregate(ctx, list(updates))

    def open_round(self, ctx: RoundContext) -> None:
        self.server.open_round(ctx)

    def feed(self, ctx: RoundContext, updates: Sequence[Handle]) -> None:
        self.server.feed(ctx, updates)

    def close_round(self, ctx: RoundContext) -> RoundReport:
        return self.server.close_round(ctx)

    def fold_spec(self, ctx: RoundContext) -> Handle:
        return self.server.fold_spec(ctx)

    def aggregate_partials(self, ctx: RoundContext, partials: Sequence[Handle], results: dict) -> RoundReport:
        return self.server.aggregate_partials(ctx, partials, results)

    def base_deltas(self, since: int) -> list[tuple[int, Handle]]:
        return self.server.base_deltas(since)

    def get_state(self) -> tuple[Any, dict]:
        return self.server.get_state()

    def set_state(self, state: Any, strategy_state: dict) -> None:
        self.server.set_state(state, strategy_state)

    def eval_handle(self) -> Handle:
        return self.server.eval_payload()

    def global_adapter(self) -> Any:
        return self.server.global_adapter()


class LocalBackend(Backend):
    """One in-process worker that runs every client in turn."""

    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.pack_size = 1
        self.resources = None

    def start(self, scenario: Scenario, data: TokenizedData, spec: StrategySpec, components: Components
              ) -> ServerHandle:
        self.worker = Worker(scenario, data, name="local", components=components)
        self.pack_size = scenario.pack_size(data.max_len)
        self.resources = scenario.resources  # packs as the Ray backend cuts them: same packs, same numbers
        return LocalServerHandle(Server(components.strategy, spec=spec, stages=components.stages,
                                          objectives=components.objectives))

    def train(self, jobs: Sequence[tuple[ClientJob, Handle]],
              on_done: Callable[[ClientResult | ClientFailure], None] | None = None,
              fold: Handle | None = None, sink: Sink | None = None) -> list[JobOutcome]:
        """Run the jobs in order; with ``resources.clients_per_pass`` > 1 in the packs of :func:`make_packs` (the
        worker packs what it can). With ``fold``, the worker folds each update into its partial as it is made;
        with ``sink``, the outcomes go to it after each pack (one pack's updates held at a time)."""
        outcomes: list[JobOutcome | None] = [None] * len(jobs)
        taken = 0
        for pack in make_packs(jobs, self.pack_size, self.resources):
            if len(pack) == 1:
                pos = pack[0]
                job, payload = jobs[pos]
                try:
                    result, update = self.worker.run_client(job, payload)
                    results: list = [(result, update)]
                except Exception as e:  # one failing client must not end the run
                    results = [ClientFailure.of(job.spec.client_id, e)]
            else:
                results = self.worker.run_pack([jobs[p] for p in pack])
            for pos, res in zip(pack, results):
                if fold is not None:
                    res = self.worker.fold(fold, res)
                    outcomes[pos] = (res, None)
                else:
                    outcomes[pos] = (res, None) if isinstance(res, ClientFailure) else res
                if on_done is not None:
                    on_done(outcomes[pos][0])
            if sink is not None:
                taken = drain(sink, outcomes, taken)
        return outcomes  # type: ignore[return-value]

    def collect_partials(self, server_round: int) -> tuple[list[Handle], list[ClientFailure]]:
        part = self.worker.take_partial(server_round)
        return ([part] if part is not None else []), []

    def sync_base(self, deltas: Sequence[tuple[int, Handle]]) -> None:
        for version, delta in deltas:
            self.worker.apply_base_delta(version, delta)

    def evaluate(self, payload: Handle, batches: Sequence[np.ndarray]) -> list[dict[str, float]]:
        return self.worker.evaluate(payload, list(batches))

    def evaluate_clients(self, payload: Handle, items: Sequence[tuple[int, Any, np.ndarray]],
                         server_round: int | None = None):
        return self.worker.evaluate_clients(payload, list(items), server_round)

    def generate(self, payload: Handle, batches: Sequence[np.ndarray], server_round: int):
        return self.worker.generate(payload, list(batches), server_round)

    def harness(self, payload: Handle, items: Sequence[tuple[int, Any, Any]], server_round: int):
        return self.worker.harness(payload, list(items), server_round)

    def worker_stats(self) -> list[dict[str, Any]]:
        return [self.worker.stats()] if self.worker else []

    def shutdown(self) -> None:
        self.worker = None
