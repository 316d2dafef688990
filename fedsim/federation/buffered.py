"""Buffered asynchronous federations on the simulated clock (``asynchronous``; FedBuff, Nguyen et al., AISTATS 2022).

``concurrency`` clients are in flight at once. A client starts from the global version of its start, and arrives
at start + its simulated time (:func:`fedsim.federation.clock.client_time`: its local steps at its speed, its
download and upload at the clock's bandwidths, two latencies). Arrivals are taken in time order (ties by start
order); every ``buffer`` (K) arrivals the server steps (:class:`fedsim.pipeline.asynchronous.BufferedAsync`) — a
failed or rejected arrival counts among the K and adds nothing — and each arrival's slot goes at once to a new
client, drawn uniformly (seeded) from those neither in flight nor in the step's buffer; the slot freed by the K-th
arrival is filled from the new version. One server step is one row (``round``).

The schedule depends on each client's planned time, which needs its upload size: known per LoRA rank once a client
of that rank has trained. So clients are trained lazily, together: when the next arrival is a client not trained yet
(or of a rank whose upload size is unknown), every started, untrained client trains in one backend call. Which
clients train together never changes a number (each client's training is a function of its job), so both backends
give the same metrics. A checkpoint after a step keeps the schedule (JSON); clients in flight are configured again
from the version they started from (kept by the server stage) and retrained on resume, exactly as before.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from fedsim.federation.callbacks import CallbackList
from fedsim.federation.clock import client_time
from fedsim.federation.rounds import Federation, RoundResult, aggregate, train
from fedsim.runtime.interfaces import Backend, Handle, ServerHandle
from fedsim.types import AsyncStep, ClientFailure, ClientJob, ClientResult

ASYNC_KEY = "__async__"  # the schedule's place in a checkpoint's server state


@dataclass
class Flight:
    """A client in flight: its start (the run's ``task``-th, from global ``version`` at ``start_s`` simulated
    seconds), its download (params, bytes), and its arrival once planned."""

    client: int
    task: int
    version: int
    start_s: float
    down: tuple[int, int]
    arrive_s: float | None = None


class Buffered:
    """The schedule of a buffered asynchronous run, one server step at a time (:meth:`step`)."""

    def __init__(self, fed: Federation, server: ServerHandle, backend: Backend, events: CallbackList):
        self.fed, self.server, self.backend, self.events = fed, server, backend, events
        self.cfg = fed.scenario.asynchronous
        self.now, self.last_step_s, self.task = 0.0, 0.0, 0
        self.due = self.cfg.concurrency  # slots to fill when the next step begins
        self.flights: list[Flight] = []
        self.up_bytes: dict[int, float] = {}  # a client's upload by LoRA rank, learned from the first to train
        self.jobs: dict[int, tuple[ClientJob, Handle]] = {}  # by task: started, not trained yet
        self.outcomes: dict[int, tuple[ClientResult | ClientFailure, Handle | None]] = {}  # by task: trained

    def step(self, server_round: int) -> RoundResult:
        """Server step ``server_round``: fill the free slots, take arrivals until K, aggregate them."""
        t0, replaced = time.perf_counter(), self.backend.num_replaced
        self.events.on_round_start(server_round, self.cfg.buffer)
        started: list[Flight] = []
        arrived: list[tuple[Flight, ClientResult | ClientFailure, Handle | None]] = []
        for _ in range(self.due):
            started.append(self._start(server_round, arrived))
        while len(arrived) < self.cfg.buffer:
            flight = self._next()
            self.flights.remove(flight)
            self.now = flight.arrive_s
            arrived.append((flight, *self.outcomes.pop(flight.task)))
            if len(arrived) < self.cfg.buffer:
                started.append(self._start(server_round, arrived))
        self.due = 1  # the K-th arrival's slot: filled from the new version
        ok = [(res, h) for _, res, h in arrived if not isinstance(res, ClientFailure)]
        failed = [res for _, res, _ in arrived if isinstance(res, ClientFailure)]
        versions = {f.client: f.version for f, _, _ in arrived}
        ctx = replace(self.fed.context(server_round), asynchronous=AsyncStep(
            starts=tuple((res.client_id, versions[res.client_id]) for res, _ in sorted(ok, key=lambda x: x[0].client_id)),
            live=tuple(sorted({f.version for f in self.flights}))))
        t_agg = time.perf_counter()
        up, ok, failed = aggregate(self.server, ctx, ok, failed)
        ok = [(res, None) for res, _ in ok]
        self.fed.keep_personal(ok)
        sim_s, self.last_step_s = self.now - self.last_step_s, self.now
        return RoundResult(server_round, [f.client for f in started], ok, failed, set(), 0, len(arrived), up,
                           {f.client: f.down for f in started}, sim_s, self.backend.num_replaced - replaced,
                           {"train_s": t_agg - t0, "t_agg": t_agg})

    def _start(self, server_round: int, arrived: list) -> Flight:
        """A new client in a free slot, now, from the current version (``server_round`` − 1)."""
        busy = {f.client for f in self.flights} | {f.client for f, _, _ in arrived}
        idle = [c for c in range(self.fed.scenario.clients.num_clients) if c not in busy]
        self.task += 1
        pick = idle[int(np.random.default_rng([self.fed.scenario.seed, self.task, 71]).integers(len(idle)))]
        flight = Flight(pick, self.task, server_round - 1, self.now, (0, 0))
        flight.down = self._configure(flight)
        self.flights.append(flight)
        return flight

    def _configure(self, flight: Flight) -> tuple[int, int]:
        """The flight's job, with its payload of the version it started from; its download (params, bytes)."""
        spec = self.fed.prep.clients[flight.client]
        ctx = replace(self.fed.context(flight.version + 1), asynchronous=AsyncStep(task=flight.task))
        handles, down = self.server.configure(ctx, [spec])
        store = self.fed.store
        job = ClientJob(spec, self.fed.prep.parts[flight.client], flight.task,
                        personal=store.get(flight.client) if store else None)
        self.jobs[flight.task] = (job, handles[flight.client])
        return tuple(down[flight.client])

    def _next(self) -> Flight:
        """The next arrival (earliest; the earlier start on a tie), trained."""
        if any(f.arrive_s is None and self._rank(f) not in self.up_bytes for f in self.flights):
            self._train_pending()
        for f in self.flights:
            if f.arrive_s is None:
                f.arrive_s = self._arrival(f)
        flight = min(self.flights, key=lambda f: (f.arrive_s, f.task))
        if flight.task not in self.outcomes:
            self._train_pending()
        return flight

    def _rank(self, flight: Flight) -> int:
        return self.fed.prep.clients[flight.client].lora.rank

    def _arrival(self, flight: Flight) -> float:
        """Start + the client's simulated time: its planned steps, its download, its rank's upload (none known: a
        client of that rank failed before any trained)."""
        sc, spec = self.fed.scenario, self.fed.prep.clients[flight.client]
        steps = sc.training.steps_for(len(self.fed.prep.parts[flight.client]))
        return flight.start_s + client_time(sc.clock, steps, spec.speed, flight.down[1],
                                            self.up_bytes.get(self._rank(flight), 0.0), spec.links)

    def _train_pending(self) -> None:
        """Every started client not trained yet, in one backend call."""
        tasks = sorted(self.jobs)
        by_client = {self.jobs[t][0].spec.client_id: t for t in tasks}
        ok, failed, _ = train(self.backend, [self.jobs.pop(t) for t in tasks], self.events)
        for res, h in ok:
            self.outcomes[by_client[res.client_id]] = (res, h)
            self.up_bytes.setdefault(self.fed.prep.clients[res.client_id].lora.rank, res.metrics["client/up_bytes"])
        for f in failed:
            self.outcomes[by_client[f.client_id]] = (f, None)

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The schedule after a step (JSON): the clock, the counters, the upload sizes, the clients in flight."""
        return {"now": self.now, "last_step_s": self.last_step_s, "task": self.task, "due": self.due,
                "up_bytes": {str(r): b for r, b in self.up_bytes.items()},
                "flights": [{**asdict(f), "down": list(f.down)} for f in self.flights]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; each client in flight is configured again from the version it started from
        (its training, a function of its job, is redone when needed)."""
        self.now, self.last_step_s = float(state["now"]), float(state["last_step_s"])
        self.task, self.due = int(state["task"]), int(state["due"])
        self.up_bytes = {int(r): float(b) for r, b in state["up_bytes"].items()}
        self.flights = [Flight(**{**f, "down": tuple(f["down"])}) for f in state["flights"]]
        self.jobs, self.outcomes = {}, {}
        for f in self.flights:
            self._configure(f)
