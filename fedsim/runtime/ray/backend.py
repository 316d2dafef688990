"""Ray backend: a pool of long-lived worker actors multiplexing virtual clients, and the server (in the driver, or a
Ray actor of its own when ``resources.server`` asks for resources: :mod:`fedsim.runtime.ray.server_host`).

- Workers are created once per run with fractional ``num_cpus``/``num_gpus``; each caches its base model and trains
  many clients in turn (:mod:`fedsim.runtime.ray.actors`).
- The tokenized data and the run's resolved components go into the object store once (numpy arrays are read
  zero-copy by every worker; a strategy defined in the user's notebook travels by value).
- Ray and the workers start before the driver prepares the data (:meth:`RayBackend.launch`; the ``fedsim`` command
  starts them even before it imports torch, and the backend adopts them: :mod:`fedsim.runtime.ray.pool`), so that
  their imports and model builds overlap the driver's.
- A round's jobs are dispatched, and lost workers replaced and their clients retried, by
  :mod:`fedsim.runtime.ray.dispatch` (Ray's own ActorPool would shrink silently).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedsim.components import Components
from fedsim.config import Scenario
from fedsim.data.tokenized import TokenizedData
from fedsim.errors import BackendError
from fedsim.models.base import configure_threads
from fedsim.runtime.interfaces import Backend, Handle, JobOutcome, ServerHandle, Sink
from fedsim.runtime.ray.dispatch import Dispatch, RetryPolicy, auto_call_cap
from fedsim.runtime.ray.pool import Pool, launch_pool, placement, take_early
from fedsim.runtime.ray.server_host import DriverServerHandle, ObjectStoreServer, RayServerHandle
from fedsim.strategies import StrategySpec
from fedsim.types import ClientFailure, ClientJob, ClientResult

log = logging.getLogger(__name__)


class RayBackend(Backend):
    """A pool of ``resources.num_workers`` worker actors (plus those of ``resources.pools``) and the server."""

    def __init__(self) -> None:
        self.started_ray = False
        self.actors: list[Any] = []
        self.server_actor: Any = None
        self._pool: Pool | None = None
        self._data_ref: Any = None
        self._components_ref: Any = None
        self.num_replaced = 0
        self.starting: dict[int, Any] = {}  # slot → the ping of a replacement still starting (replace_worker)
        self._base_history: list[tuple[int, Any]] = []
        self.pack_size = 1
        self.faulty = False  # faults inject kills or hangs: one client per call
        self.last_client: tuple[float, float] | None = None  # the last round's median client time (s), update bytes
        self.slots: list[tuple[int, float, float]] = []
        self.resources: Any = None

    def launch(self, scenario: Scenario) -> None:
        """Start Ray and the worker actors — or adopt those the ``fedsim`` command started for this scenario before
        it imported torch (:func:`~fedsim.runtime.ray.pool.launch_early`); return at once. Each actor imports torch,
        transformers and PEFT and builds its base model while the driver loads and tokenizes the data."""
        if self._pool is not None:
            return
        self._pool = take_early(scenario.to_dict()) or launch_pool(scenario)
        self.started_ray, self.actors, self.slots = self._pool.started_ray, self._pool.actors, self._pool.slots
        self.launched_at = self._pool.started_at
        self.resources = scenario.resources

    def launch_note(self) -> str | None:
        cpus = sorted({c for _, c, _ in self.slots})
        gpus = sorted({g for _, _, g in self.slots if g})
        each = f"{'/'.join(f'{c:g}' for c in cpus)} CPU" + (f", {'/'.join(f'{g:g}' for g in gpus)} GPU" if gpus else "")
        return (f"{len(self.actors)} Ray worker(s) ({each} each) starting up: each imports torch and builds the model "
                "while the data is prepared")

    def start_note(self, scenario: Scenario) -> str:
        server = " and the server actor" if scenario.resources.server.num_cpus or scenario.resources.server.num_gpus \
            else ""
        return f"waiting for the {len(self.actors)} worker(s){server} to be ready"

    def start(self, scenario: Scenario, data: TokenizedData, spec: StrategySpec, components: Components
              ) -> ServerHandle:
        import ray

        self.launch(scenario)
        self.pack_size = scenario.pack_size(data.max_len)
        self.faulty = scenario.faults.in_process()
        self._data_ref = ray.put(data)  # replacements get the data and the components when they are created
        self._components_ref = ray.put(components)
        ready = self._pool.ready + [a.attach.remote(self._data_ref, self._components_ref) for a in self.actors]
        res = scenario.resources
        if res.server.num_cpus > 0 or res.server.num_gpus > 0:
            self.server_actor = ray.remote(ObjectStoreServer).options(
                num_cpus=res.server.num_cpus, num_gpus=res.server.num_gpus, scheduling_strategy=placement()
            ).remote(self._components_ref, spec)
            ready.append(self.server_actor.__ray_ready__.remote())
            handle: ServerHandle = RayServerHandle(self.server_actor)
        else:  # torch threads as a worker's (and as the local backend's server): the same numbers on any machine
            configure_threads(res.threads_per_worker())
            handle = DriverServerHandle(ObjectStoreServer(components, spec))
        try:
            ray.get(ready, timeout=600)
        except ray.exceptions.GetTimeoutError:
            raise BackendError(
                f"Ray could not place {len(self.slots)} workers (num_cpus/num_gpus per worker: "
                f"{sorted({(c, g) for _, c, g in self.slots})}; cluster has {ray.cluster_resources()}); lower "
                "resources.num_workers, resources.pools or the per-worker resources"
            ) from None
        return handle

    def _new_actor(self, i: int) -> Any:
        actor = self._pool.new_actor(i, self._data_ref)
        actor.attach.remote(self._data_ref, self._components_ref)
        for version, delta in self._base_history:  # a replacement catches up with the merged base
            actor.apply_base_delta.remote(version, delta)
        return actor

    def replace_worker(self, slot: int, wait: bool = True) -> None:
        """Kill the worker in ``slot`` (dead or hung) and start a new one there. With ``wait``, it is ready (started,
        base caught up) before this returns; without, calls may queue behind its start while the other workers go on,
        and :meth:`ready` says when it has started — a dispatch starts the clock of a client's time limit only then,
        so that no client's clock pays for a replacement."""
        import ray

        self.kill_worker(slot)
        self.actors[slot] = self._new_actor(slot)
        self.num_replaced += 1
        ping = self.actors[slot].ping.remote()
        if wait:
            self.starting.pop(slot, None)
            ray.get(ping)
        else:
            self.starting[slot] = ping

    def kill_worker(self, slot: int) -> None:
        """Kill the worker in ``slot`` (dead already, or hung): its pending calls fail with Ray's actor error."""
        import ray

        try:
            ray.kill(self.actors[slot])
        except Exception:  # already gone
            pass

    def ready(self, slot: int) -> bool:
        """Whether the worker in ``slot`` has started (a replacement started without waiting may still be starting;
        one that died starting counts as started: its calls fail, and the dispatch replaces it again)."""
        import ray

        ping = self.starting.get(slot)
        if ping is None:
            return True
        if not ray.wait([ping], timeout=0)[0]:
            return False
        del self.starting[slot]
        return True

    def sync_base(self, deltas: Sequence[tuple[int, Handle]]) -> None:
        """Queue the updates on every actor: actor calls run in order, so each applies them before its next job."""
        self._base_history.extend(deltas)  # a replacement replays the whole history when it is created
        self._on_workers([(slot, "apply_base_delta", (v, d)) for v, d in deltas for slot in range(len(self.actors))])

    def _on_workers(self, calls: Sequence[tuple[int, str, tuple]]) -> list[Any]:
        """Run ``(slot, method, args)`` calls on the workers and return their results in order, with training's
        policy for a worker that dies meanwhile: it is replaced and its calls run again, up to
        ``resources.max_retries`` times (evaluation, base updates and statistics are the same on any worker).

        Raises:
            BackendError: a worker died more often than that.
        """
        import ray

        results: list[Any] = [None] * len(calls)
        pending, attempt = list(range(len(calls))), 0
        while pending:
            refs = [(i, getattr(self.actors[calls[i][0]], calls[i][1]).remote(*calls[i][2])) for i in pending]
            pending = []
            for i, ref in refs:
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayActorError:
                    pending.append(i)
            if not pending:
                break
            attempt += 1
            lost = sorted({calls[i][0] for i in pending})
            if attempt > self.resources.max_retries:
                raise BackendError(f"worker(s) {lost} died during {calls[pending[0]][1]} {attempt} time(s) in a row; "
                                   "raise resources.max_retries, or give the workers more memory")
            for slot in lost:
                log.warning("worker-%d died during %s; replacing it", slot, calls[pending[0]][1])
                self.replace_worker(slot)
        return results

    def train(self, jobs: Sequence[tuple[ClientJob, Handle]],
              on_done: Callable[[ClientResult | ClientFailure], None] | None = None,
              fold: Handle | None = None, sink: Sink | None = None) -> list[JobOutcome]:
        """Dispatch the jobs to the pool (:class:`~fedsim.runtime.ray.dispatch.Dispatch`): a worker that dies, or a
        call running longer than ``resources.client_timeout_s`` per client in it, is replaced and its clients
        retried up to ``resources.max_retries`` times (:class:`~fedsim.runtime.ray.dispatch.RetryPolicy`). With
        ``fold``, the clients a lost worker had folded into its partial fail with it. With ``sink``, calls start
        within :attr:`Dispatch.window` of the first outcome it has not taken."""
        policy = RetryPolicy(max_attempts=1 + self.resources.max_retries, timeout_s=self.resources.client_timeout_s)
        dispatch = Dispatch(self, jobs, on_done, policy, fold, sink)
        outcomes = dispatch.run()
        done = [r.metrics for r, _ in outcomes if isinstance(r, ClientResult) and "client/time_s" in r.metrics]
        if done:
            self.last_client = (float(np.median([m["client/time_s"] for m in done])),
                                float(np.median([m.get("client/up_bytes", 0.0) for m in done])))
        self._folded = {slot: [jobs[pos][0].spec.client_id for pos in positions]
                        for slot, positions in dispatch.folded.items() if positions}
        return outcomes

    def clients_per_call(self) -> int:
        """The most clients a training call may take (``resources.clients_per_call``; ``auto``:
        :func:`~fedsim.runtime.ray.dispatch.auto_call_cap` from the last round's clients, 1 with injected faults)."""
        if self.resources.clients_per_call != "auto":
            return int(self.resources.clients_per_call)
        return 1 if self.faulty else auto_call_cap(*(self.last_client or (None, None)))

    def collect_partials(self, server_round: int) -> tuple[list[Handle], list[ClientFailure]]:
        """Each worker that folded clients this round hands in its partial: the driver reads the list of clients
        (a small object) and passes the partial's reference on, so partials go to the server one at a time. A
        worker lost before it could: its clients fail, and it is replaced."""
        import ray

        folded, self._folded = getattr(self, "_folded", {}), {}
        calls = {slot: self.actors[slot].take_partial.options(num_returns=2).remote(server_round)
                 for slot in sorted(folded)}
        refs, lost = [], []
        for slot, (meta_ref, part_ref) in calls.items():
            try:
                clients = ray.get(meta_ref)
                why = None if clients == sorted(folded[slot]) else (
                    f"its partial holds clients {clients[:5]}, not the {len(folded[slot])} folded there")
            except ray.exceptions.RayActorError as e:
                why = f"worker died: {e.__class__.__name__}"
                log.warning("worker-%d died before handing in its partial; replacing it", slot)
                self.replace_worker(slot)
            if why is None:
                refs.append(part_ref)
            else:
                lost += [ClientFailure(c, f"worker-{slot} was lost ({why}) holding its folded update "
                                          "(resources.worker_partials)") for c in folded[slot]]
        return refs, lost

    def evaluate(self, payload: Handle, batches: Sequence[np.ndarray]) -> list[dict[str, float]]:
        return self._batches_on_workers("evaluate", payload, batches)

    def generate(self, payload: Handle, batches: Sequence[np.ndarray], server_round: int) -> list:
        return self._batches_on_workers("generate", payload, batches, server_round)

    def harness(self, payload: Handle, items: Sequence[tuple[int, Any, Any]], server_round: int) -> dict:
        return self._on_workers([(0, "harness", (payload, list(items), server_round))])[0]

    def _batches_on_workers(self, method: str, payload: Handle, batches: Sequence[np.ndarray], *args: Any) -> list:
        """``method(payload, its batches, *args)`` on every worker, the batches dealt round-robin; results in order."""
        n = len(self.actors)
        chunks = [list(range(i, len(batches), n)) for i in range(n)]
        calls = [(i, method, (payload, [batches[j] for j in chunk], *args)) for i, chunk in enumerate(chunks) if chunk]
        out: list[Any] = [None] * len(batches)
        for chunk, part in zip([c for c in chunks if c], self._on_workers(calls)):
            for j, r in zip(chunk, part):
                out[j] = r
        return out

    def evaluate_clients(self, payload: Handle, items: Sequence[tuple[int, Any, np.ndarray]],
                         server_round: int | None = None):
        n = len(self.actors)
        parts = [list(items[i::n]) for i in range(n)]
        out: dict = {}
        extra = () if server_round is None else (server_round,)
        for part in self._on_workers([(i, "evaluate_clients", (payload, p, *extra)) for i, p in enumerate(parts) if p]):
            out.update(part)
        return out

    def worker_stats(self) -> list[dict[str, Any]]:
        return self._on_workers([(i, "stats", ()) for i in range(len(self.actors))])

    def shutdown(self) -> None:
        import ray

        if self.server_actor is not None:
            try:
                ray.kill(self.server_actor)
            except Exception:
                pass
            self.server_actor = None
        if self._pool is not None:
            self._pool.actors = self.actors  # replacements included
            self._pool.shutdown()
        self._pool, self.actors, self.started_ray = None, [], False
