"""Ray backend: a pool of long-lived worker actors multiplexing virtual clients, and the server (in the driver, or a
Ray actor of its own when ``resources.server`` asks for resources).

- Workers are created once per run with fractional ``num_cpus``/``num_gpus``; each caches its base model and trains
  many clients in turn.
- The tokenized data goes into the object store once (numpy arrays are read zero-copy by every worker).
- The server ``ray.put``s each distinct payload once per round (FedIT's global adapter is one object for all
  sampled clients) and receives client updates by object reference: with the server in an actor, adapter tensors
  never pass through the driver.
- Ray and the workers start before the driver prepares the data (:meth:`RayBackend.launch`; the ``fedsim`` command
  starts them even before it imports torch, and the backend adopts them: :mod:`fedsim.runtime.ray_pool`), so that
  their imports and model builds overlap the driver's.
- A worker that dies is replaced (Ray's own ActorPool would shrink silently) and its client retried.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from fedsim.config import Scenario
from fedsim.data.datasets import TokenizedData
from fedsim.errors import BackendError, ServerLostError
from fedsim.models.base import configure_threads
from fedsim.runtime.backend import Backend, Handle, JobOutcome, ServerHandle, make_packs
from fedsim.runtime.local import LocalServerHandle
from fedsim.runtime.ray_pool import (  # noqa: F401  # re-exported: sweeps and tests start Ray through here
    Pool,
    init_ray,
    launch_pool,
    ray_temp_dir,
    take_early,
)
from fedsim.runtime.wire import pack, pack_tensors_of, unpack, unpack_tensors_of
from fedsim.runtime.worker import ClientJob, Worker
from fedsim.server import Server
from fedsim.strategies import StrategySpec
from fedsim.types import ClientFailure, ClientResult, ClientSpec, RoundContext

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 2  # jobs queued per actor: hides the driver's dispatch latency between two clients


class ObjectStoreServer:
    """The server behind Ray object references: ``ray.put`` of each distinct payload once per round (FedIT's global
    adapter is one object for all sampled clients), updates read by reference, so adapter tensors never pass through
    the driver's dispatch. Runs in the driver, or inside the server actor."""

    def __init__(self, strategy_name: str, params: dict, spec: StrategySpec):
        self.server = Server(strategy_name, params, spec)

    def configure(self, ctx: RoundContext, clients: Sequence[ClientSpec]):
        import ray

        payloads, down = self.server.configure(ctx, clients)
        refs: dict[int, Any] = {}
        by_object: dict[int, Any] = {}
        for cid, p in payloads.items():
            if id(p) not in by_object:  # one object-store copy per distinct payload
                by_object[id(p)] = ray.put(pack_tensors_of(p))
            refs[cid] = by_object[id(p)]
        return refs, down

    def aggregate(self, ctx: RoundContext, update_refs: list) -> dict[str, float]:
        import ray

        return self.server.aggregate(ctx, [unpack_tensors_of(u) for u in ray.get(list(update_refs))])

    def base_deltas(self, since: int):
        import ray

        return [(v, ray.put(pack(d))) for v, d in self.server.base_deltas(since)]

    def get_state(self):
        return self.server.get_state()

    def set_state(self, state, strategy_state):
        self.server.set_state(state, strategy_state)

    def eval_handle(self):
        import ray

        return [ray.put(pack_tensors_of(self.server.eval_payload()))]  # in a list: an actor's caller gets the ref

    def global_adapter(self):
        return self.server.global_adapter()


class RayWorker(Worker):
    """A :class:`Worker` behind Ray: tensors cross the object store as packed byte buffers (:mod:`fedsim.runtime.wire`).
    Runs inside :class:`~fedsim.runtime.ray_pool.WorkerActor`."""

    def run_client(self, job, payload):
        result, update = super().run_client(job, unpack_tensors_of(payload))
        return result, pack_tensors_of(update)

    def run_pack(self, jobs, *payloads):
        outs = super().run_pack([(j, unpack_tensors_of(p)) for j, p in zip(jobs, payloads)])
        results = [o if isinstance(o, ClientFailure) else o[0] for o in outs]
        updates = [None if isinstance(o, ClientFailure) else pack_tensors_of(o[1]) for o in outs]
        return (results, *updates)  # one object per update, so that the server gets each by reference

    def evaluate(self, payload, batches):
        return super().evaluate(unpack_tensors_of(payload), batches)

    def evaluate_clients(self, payload, items):
        return super().evaluate_clients(unpack_tensors_of(payload), items)

    def apply_base_delta(self, version, delta):
        return super().apply_base_delta(version, unpack(delta))

    def ping(self) -> str:
        self.host(self._base_version)  # build the model now, so that no client's clock pays for it
        return self.name


class RayServerHandle(ServerHandle):
    """The server as a Ray actor of its own (``resources.server`` asks for resources): isolated from the driver, and
    placed where those resources are."""

    def __init__(self, actor: Any):
        self.actor = actor

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        try:
            return ray.get(getattr(self.actor, method).remote(*args))
        except ray.exceptions.RayActorError as e:  # ActorDiedError, or its node gone
            why = (getattr(e, "error_msg", None) or str(e)).strip()
            first = why.splitlines()[0] if why else "no reason given"
            raise ServerLostError(f"the server actor died during {method} ({first}); the global model and the "
                                  "strategy's state were in it, so the run cannot go on") from None

    def configure(self, ctx: RoundContext, clients: Sequence[ClientSpec]):
        return self._call("configure", ctx, list(clients))

    def aggregate(self, ctx: RoundContext, updates: Sequence[Handle]) -> dict[str, float]:
        # Wrapped in a list so that Ray passes the references through instead of resolving them here.
        return self._call("aggregate", ctx, list(updates))

    def base_deltas(self, since: int) -> list[tuple[int, Handle]]:
        return self._call("base_deltas", since)

    def get_state(self) -> tuple[Any, dict]:
        return self._call("get_state")

    def set_state(self, state: Any, strategy_state: dict) -> None:
        self._call("set_state", state, strategy_state)

    def eval_handle(self) -> Handle:
        return self._call("eval_handle")[0]

    def global_adapter(self) -> Any:
        return self._call("global_adapter")


class DriverServerHandle(LocalServerHandle):
    """The server in the driver process (``resources.server`` asks for no resources, the default): no process of its
    own to start or to keep in memory; payloads and updates still travel through the object store."""

    def __init__(self, server: ObjectStoreServer):
        super().__init__(server)  # type: ignore[arg-type]  # Server's interface, with object references

    def eval_handle(self) -> Handle:
        return self.server.eval_handle()[0]  # type: ignore[attr-defined]


class RayBackend(Backend):
    """A pool of ``resources.num_workers`` worker actors (plus those of ``resources.pools``) and the server."""

    def __init__(self) -> None:
        self.started_ray = False
        self.actors: list[Any] = []
        self.server_actor: Any = None
        self._pool: Pool | None = None
        self._data_ref: Any = None
        self.num_replaced = 0
        self._base_history: list[tuple[int, Any]] = []
        self._pack_size = 1

    def launch(self, scenario: Scenario) -> None:
        """Start Ray and the worker actors — or adopt those the ``fedsim`` command started for this scenario before
        it imported torch (:func:`~fedsim.runtime.ray_pool.launch_early`); return at once. Each actor imports torch,
        transformers and PEFT and builds its base model while the driver loads and tokenizes the data."""
        if self._pool is not None:
            return
        self._pool = take_early(scenario.to_dict()) or launch_pool(scenario)
        self.started_ray, self.actors, self._slots = self._pool.started_ray, self._pool.actors, self._pool.slots
        self.launched_at = self._pool.started_at
        self._resources = scenario.resources
        self._pack_size = scenario.pack_size()

    def start(self, scenario: Scenario, data: TokenizedData, spec: StrategySpec) -> ServerHandle:
        import ray

        self.launch(scenario)
        self._data_ref = ray.put(data)  # replacements get the data when they are created
        ready = self._pool.ready + [a.attach.remote(self._data_ref) for a in self.actors]
        res = scenario.resources
        if res.server.num_cpus > 0 or res.server.num_gpus > 0:
            self.server_actor = ray.remote(ObjectStoreServer).options(
                num_cpus=res.server.num_cpus, num_gpus=res.server.num_gpus).remote(
                scenario.strategy.name, scenario.strategy.params, spec)
            ready.append(self.server_actor.__ray_ready__.remote())
            handle: ServerHandle = RayServerHandle(self.server_actor)
        else:  # torch threads as a worker's (and as the local backend's server): the same numbers on any machine
            configure_threads(res.threads_per_worker())
            handle = DriverServerHandle(ObjectStoreServer(scenario.strategy.name, scenario.strategy.params, spec))
        try:
            ray.get(ready, timeout=600)
        except ray.exceptions.GetTimeoutError:
            raise BackendError(
                f"Ray could not place {len(self._slots)} workers (num_cpus/num_gpus per worker: "
                f"{sorted({(c, g) for _, c, g in self._slots})}; cluster has {ray.cluster_resources()}); lower "
                "resources.num_workers, resources.pools or the per-worker resources"
            ) from None
        return handle

    def _new_actor(self, i: int) -> Any:
        actor = self._pool.new_actor(i, self._data_ref)
        for version, delta in self._base_history:  # a replacement catches up with the merged base
            actor.apply_base_delta.remote(version, delta)
        return actor

    def sync_base(self, deltas: Sequence[tuple[int, Handle]]) -> None:
        """Queue the updates on every actor: actor calls run in order, so each applies them before its next job."""
        import ray

        self._base_history.extend(deltas)
        acks = [a.apply_base_delta.remote(v, d) for v, d in deltas for a in self.actors]
        ray.get(acks)  # surface a failed merge now rather than as a confusing client failure

    def train(self, jobs: Sequence[tuple[ClientJob, Handle]],
              on_done: Callable[[ClientResult | ClientFailure], None] | None = None) -> list[JobOutcome]:
        """Dispatch jobs to the pool, keeping ``PIPELINE_DEPTH`` jobs queued per actor so that no actor idles while
        the driver hands it the next client (actor calls run in submission order). With
        ``resources.clients_per_pass`` K > 1, an actor is handed a whole pack instead (:func:`make_packs`: up to K
        jobs on one base, cut from the job list alone, so that the numbers never depend on timing), which it trains
        in shared passes (:meth:`Worker.run_pack`).

        Faults: a worker that dies is replaced; the client it was running (every client of the pack it was running)
        is retried, in the same pack, up to ``resources.max_retries`` times; the clients queued behind it are
        resubmitted without being charged; a call running longer than ``resources.client_timeout_s`` per client in
        it is cancelled by replacing its worker. A client that raises (e.g. a non-finite loss) is not retried: it
        would fail the same way.
        """
        import ray

        max_attempts = 1 + self._resources.max_retries
        timeout_s = self._resources.client_timeout_s
        res = self._resources
        pack_size = self._pack_size
        depth = PIPELINE_DEPTH if pack_size == 1 else 1  # a pack is long enough to hide the dispatch latency
        pools = sorted({p for p, _, _ in self._slots})
        queue_of = {p: deque() for p in pools}  # jobs waiting, per worker pool

        def pool_for(job: ClientJob) -> int:
            p = res.pool_of(job.spec.quant.bits)
            return p if p in queue_of else -1

        for unit in make_packs(jobs, pack_size, res):  # units of work: lists of (pos, job, payload)
            queue_of[pool_for(jobs[unit[0]][0])].append([(pos, *jobs[pos]) for pos in unit])
        queues: list[deque] = [deque() for _ in self.actors]  # per actor: refs in submission order
        started: dict[Any, float] = {}  # ref at the head of its actor's queue → when it started running
        # meta ref → (slot, [(pos, job, payload)], [update ref per job])
        inflight: dict[Any, tuple[int, list, list]] = {}
        outcomes: list[JobOutcome | None] = [None] * len(jobs)

        def finish(pos: int, outcome: JobOutcome) -> None:
            outcomes[pos] = outcome
            if on_done is not None:
                on_done(outcome[0])

        def finish_unit(unit: list, metas: Any, update_refs: list) -> None:
            metas = metas if isinstance(metas, list) else [metas]
            for (pos, _, _), meta, update_ref in zip(unit, metas, update_refs):
                finish(pos, (meta, None if isinstance(meta, ClientFailure) else update_ref))

        def fail_unit(unit: list, cause: BaseException) -> None:
            for pos, job, _ in unit:
                finish(pos, (ClientFailure.of(job.spec.client_id, cause), None))

        def retry_or_fail(unit: list, charged: bool, reason: str) -> None:
            if not charged:
                queue_of[pool_for(unit[0][1])].appendleft(unit)
                return
            again = []
            for pos, job, payload in unit:
                if job.attempt < max_attempts:
                    again.append((pos, replace(job, attempt=job.attempt + 1), payload))
                else:
                    finish(pos, (ClientFailure(job.spec.client_id, f"{reason} (after {job.attempt} attempts)"), None))
            if again:
                queue_of[pool_for(again[0][1])].appendleft(again)

        def lose_worker(slot: int, reason: str) -> None:
            """Replace a dead or hung worker. Calls it finished keep their results; the first unfinished one (the
            clients it was running) is charged an attempt; the ones queued behind it are resubmitted uncharged."""
            charged = False
            for ref in list(queues[slot]):
                _, unit, update_refs = inflight.pop(ref)
                started.pop(ref, None)
                if ray.wait([ref], timeout=0)[0]:
                    try:
                        finish_unit(unit, ray.get(ref), update_refs)
                        continue
                    except ray.exceptions.RayTaskError as e:
                        fail_unit(unit, e.cause if getattr(e, "cause", None) is not None else e)
                        continue
                    except ray.exceptions.RayActorError:
                        pass
                retry_or_fail(unit, charged=not charged, reason=reason)
                charged = True
            queues[slot].clear()
            try:
                ray.kill(self.actors[slot])
            except Exception:
                pass
            self.actors[slot] = self._new_actor(slot)
            self.num_replaced += 1
            ray.get(self.actors[slot].ping.remote())  # ready (model built, base caught up) before its clock starts

        def submit(slot: int, unit: list) -> Any:
            actor = self.actors[slot]
            if len(unit) == 1:
                meta_ref, update_ref = actor.run_client.options(num_returns=2).remote(unit[0][1], unit[0][2])
                return meta_ref, [update_ref]
            refs = actor.run_pack.options(num_returns=1 + len(unit)).remote([j for _, j, _ in unit],
                                                                            *[p for _, _, p in unit])
            return refs[0], list(refs[1:])

        def limit(ref: Any) -> float:
            return timeout_s * len(inflight[ref][1])

        while any(queue_of.values()) or inflight:
            for slot in range(len(self.actors)):
                pending = queue_of[self._slots[slot][0]]
                while pending and len(queues[slot]) < depth:
                    unit = pending.popleft()
                    meta_ref, update_refs = submit(slot, unit)
                    inflight[meta_ref] = (slot, unit, update_refs)
                    if not queues[slot]:
                        started[meta_ref] = time.monotonic()
                    queues[slot].append(meta_ref)
            wait_s = None
            if timeout_s is not None and started:
                wait_s = max(0.01, min(t + limit(r) for r, t in started.items()) - time.monotonic())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=wait_s)
            for ref in ready:
                if ref not in inflight:
                    continue  # dropped together with its worker
                slot, unit, update_refs = inflight[ref]
                try:
                    metas = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    log.warning("worker-%d died while training client(s) %s (%s); replacing it", slot,
                                [j.spec.client_id for _, j, _ in unit], e.__class__.__name__)
                    lose_worker(slot, f"worker died: {e.__class__.__name__}")
                    continue
                except ray.exceptions.RayTaskError as e:
                    metas = None
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                del inflight[ref]
                started.pop(ref, None)
                queues[slot].remove(ref)
                if queues[slot]:
                    started.setdefault(queues[slot][0], time.monotonic())
                if metas is None:
                    fail_unit(unit, cause)
                else:
                    finish_unit(unit, metas, update_refs)
            if timeout_s is not None:
                now = time.monotonic()
                for slot in range(len(self.actors)):
                    head = queues[slot][0] if queues[slot] else None
                    if head is not None and now - started.get(head, now) > limit(head):
                        clients = [j.spec.client_id for _, j, _ in inflight[head][1]]
                        log.warning("client(s) %s exceeded client_timeout_s=%g on worker-%d; replacing the worker",
                                    clients, timeout_s, slot)
                        lose_worker(slot, f"timed out after {timeout_s:g}s")
        return [o for o in outcomes if o is not None]

    def evaluate(self, payload: Handle, batches: Sequence[np.ndarray]) -> list[dict[str, float]]:
        import ray

        n = len(self.actors)
        chunks = [list(range(i, len(batches), n)) for i in range(n)]
        refs = [self.actors[i].evaluate.remote(payload, [batches[j] for j in chunk])
                for i, chunk in enumerate(chunks) if chunk]
        out: list[dict[str, float] | None] = [None] * len(batches)
        for chunk, part in zip([c for c in chunks if c], ray.get(refs)):
            for j, r in zip(chunk, part):
                out[j] = r
        return out  # type: ignore[return-value]

    def evaluate_clients(self, payload: Handle, items: Sequence[tuple[int, Any, np.ndarray]]):
        import ray

        n = len(self.actors)
        parts = [list(items[i::n]) for i in range(n)]
        out: dict = {}
        for part in ray.get([self.actors[i].evaluate_clients.remote(payload, p) for i, p in enumerate(parts) if p]):
            out.update(part)
        return out

    def worker_stats(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.stats.remote() for a in self.actors])

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
