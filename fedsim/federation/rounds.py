"""One round as its named stages::

    sample → configure → jobs (dropout; personal state in) → train → simulated clock → aggregate (validate,
    stages, strategy) → keep personal state → sync base

Each stage is a function of a few lines over a :class:`Federation` (the run's fixed parts) and the backend's
interfaces; the driver (:mod:`fedsim.driver`) runs them round after round, then evaluates, logs and checkpoints
through callbacks. The driver never holds a tensor: payloads and updates are the backend's handles.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedsim.client.store import ClientStateStore
from fedsim.config import Scenario
from fedsim.errors import BackendError
from fedsim.federation.callbacks import CallbackList
from fedsim.federation.clock import admit
from fedsim.federation.prepare import Prepared
from fedsim.runtime.interfaces import Backend, Handle, JobOutcome, ServerHandle, Sink
from fedsim.sampling import dropped_out, sample_clients
from fedsim.types import ClientFailure, ClientJob, ClientResult, RoundContext, RoundReport

DROPPED = "dropped out during the round (clients.dropout)"


@dataclass
class Federation:
    """What the round stages read: the scenario, the prepared clients and data, the client state store, and the
    base version the workers hold."""

    scenario: Scenario
    prep: Prepared
    store: ClientStateStore | None
    base_version: int = 0
    folds: bool = False  # workers fold their clients' updates into partials (components.aggregation_path)
    feeds: bool = False  # else the server folds them while the clients train (components.aggregation_path)

    def context(self, server_round: int) -> RoundContext:
        sc = self.scenario
        return RoundContext(server_round=server_round, num_rounds=sc.rounds, seed=sc.seed)

    def sample(self, server_round: int) -> list[int]:
        """The round's clients: ``clients.per_round`` of the available ones (uniformly or by size), or each with
        probability per_round / num_clients (``poisson``), seeded."""
        sc = self.scenario
        sizes = [c.num_examples for c in self.prep.clients] if sc.clients.sampling == "size" else None
        return sample_clients(sc.clients.num_clients, sc.clients.num_per_round(), sc.seed, server_round, sizes=sizes,
                              availability=sc.clients.availability, poisson=sc.clients.sampling == "poisson")

    def jobs(self, server_round: int, sampled: list[int], handles: dict[int, Handle]
             ) -> tuple[list[tuple[ClientJob, Handle]], set[int]]:
        """The jobs of the clients that stay for the round (with their personal state), and those that drop out
        after downloading their payload (``clients.dropout``)."""
        gone = dropped_out(sampled, self.scenario.clients.dropout, self.scenario.seed, server_round)
        store, prep = self.store, self.prep
        jobs = [(ClientJob(prep.clients[c], prep.parts[c], server_round, personal=store.get(c) if store else None),
                 handles[c]) for c in sampled if c not in gone]
        return jobs, gone

    def keep_personal(self, ok: list[tuple[ClientResult, Handle]]) -> None:
        """Personal tensors stay with their client, in the client state store (never given to the server).

        Raises:
            BackendError: a client returned state to keep, but the strategy declared none (no store is open).
        """
        for res, _ in ok:
            if res.personal is None:
                continue
            if self.store is None:
                raise BackendError(f"client {res.client_id} returned state to keep between rounds "
                                   f"({sorted(res.personal)[:2]}...), but the strategy declares none: set "
                                   "keeps_client_state = True on a strategy whose client objectives keep state")
            self.store.put(res.client_id, res.personal)


@dataclass
class RoundResult:
    """What one round did (before evaluation): who trained and who failed, with why, and what moved."""

    server_round: int
    sampled: list[int]
    ok: list[tuple[ClientResult, Handle]]
    failed: list[ClientFailure]
    gone: set[int]
    late: int
    attempted: int
    up: RoundReport
    down: dict[int, tuple[int, int]]
    sim_round_s: float
    replaced: int
    times: dict[str, float] = field(default_factory=dict)


class ServerSink(Sink):
    """The server folds the round's updates while the clients train (in client-id order: the jobs' order)."""

    def __init__(self, server: ServerHandle, ctx: RoundContext):
        self.server, self.ctx = server, ctx

    def take(self, outcomes: Sequence[JobOutcome]) -> None:
        handles = [h for res, h in outcomes if not isinstance(res, ClientFailure) and h is not None]
        if handles:
            self.server.feed(self.ctx, handles)


def train(backend: Backend, jobs: list[tuple[ClientJob, Handle]], events: CallbackList, fold: Handle | None = None,
          sink: Sink | None = None
          ) -> tuple[list[tuple[ClientResult, Handle]], list[ClientFailure], list[Handle] | None]:
    """The backend trains every job; (results with their update handles — None where ``sink`` took them —,
    failures, the workers' partials when they fold the updates — ``fold`` — else None)."""
    on_done = lambda res: events.on_client_done(isinstance(res, ClientFailure))  # noqa: E731
    extra = {k: v for k, v in (("fold", fold), ("sink", sink)) if v is not None}
    outcomes = backend.train(jobs, on_done=on_done, **extra)
    ok = [(res, h) for res, h in outcomes if not isinstance(res, ClientFailure)]
    failed = [res for res, _ in outcomes if isinstance(res, ClientFailure)]
    if fold is None:
        return ok, failed, None
    partials, lost = backend.collect_partials(jobs[0][0].server_round) if jobs else ([], [])
    gone = {f.client_id for f in lost}
    return [(res, h) for res, h in ok if res.client_id not in gone], failed + lost, partials


def aggregate(server: ServerHandle, ctx: RoundContext, ok: list[tuple[ClientResult, Handle]],
              failed: list[ClientFailure], partials: list[Handle] | None = None, fed: bool = False
              ) -> tuple[RoundReport, list, list[ClientFailure]]:
    """The server validates and aggregates the updates — or merges the workers' ``partials``, the updates having
    been validated and folded where they were made; or closes the round it was ``fed`` while the clients trained
    —; a rejected update counts as a failed client, with its reason. Returns (upload accounting, the clients
    aggregated, every failure). The updates go in client-id order (a streaming server folds them in the order
    given)."""
    if fed:
        up = server.close_round(ctx)
    elif partials is None:
        up = server.aggregate(ctx, [h for _, h in sorted(ok, key=lambda x: x[0].client_id)])
    else:
        up = server.aggregate_partials(ctx, partials, {res.client_id: (res.upload, res.rejected) for res, _ in ok})
    if up.rejected:
        failed = failed + [ClientFailure(cid, why) for cid, why in sorted(up.rejected.items())]
        ok = [(res, h) for res, h in ok if res.client_id not in up.rejected]
    return up, ok, failed


def sync_base(server: ServerHandle, backend: Backend, since: int) -> int:
    """Strategies that merge into the base (FLoRA, FedEx-LoRA): every worker applies each new base update once.
    Returns the base version the workers hold now."""
    deltas = server.base_deltas(since=since)
    if deltas:
        backend.sync_base(deltas)
        return deltas[-1][0]
    return since


def run_round(server_round: int, fed: Federation, server: ServerHandle, backend: Backend,
              events: CallbackList) -> RoundResult:
    """One round's stages, from sampling to the base sync (evaluation and logging are the driver's)."""
    ctx, sampled = fed.context(server_round), fed.sample(server_round)  # sample
    handles, down = server.configure(ctx, [fed.prep.clients[c] for c in sampled])  # configure
    jobs, gone = fed.jobs(server_round, sampled, handles)  # they downloaded, then some vanished
    events.on_round_start(server_round, len(jobs))
    t_train, replaced = time.perf_counter(), backend.num_replaced
    fold = server.fold_spec(ctx) if fed.folds else None  # workers fold their clients' updates into partials
    if fed.feeds:  # or the server folds them while the clients train
        server.open_round(ctx)
    sink = ServerSink(server, ctx) if fed.feeds else None
    ok, failed, partials = train(backend, jobs, events, fold, sink)  # train
    failed += [ClientFailure(c, DROPPED) for c in sorted(gone)]
    clock = admit(fed.scenario.clock, ok, fed.prep.clients, down)  # the simulated clock: stragglers out
    t_agg = time.perf_counter()
    up, ok, failed = aggregate(server, ctx, clock.ok, failed + clock.late, partials,  # validate → stages → aggregate
                               fed.feeds)
    ok = [(res, None) for res, _ in ok]  # the updates are aggregated: their object-store copies can go now
    fed.keep_personal(ok)
    fed.base_version = sync_base(server, backend, fed.base_version)
    return RoundResult(server_round, sampled, ok, failed, gone, len(clock.late), len(jobs), up, down, clock.round_s,
                       backend.num_replaced - replaced, {"train_s": t_agg - t_train, "t_agg": t_agg})


def eval_batches(num_test: int, batch_size: int) -> list[np.ndarray]:
    """The global test set in batches of ``eval.batch_size`` (the same batches every time, for exact sums)."""
    return [np.arange(s, min(s + batch_size, num_test)) for s in range(0, num_test, batch_size)]
