"""Ray backend: a pool of long-lived worker actors multiplexing virtual clients, and the server (in the driver, or a
Ray actor of its own when ``resources.server`` asks for resources).

- Workers are created once per run with fractional ``num_cpus``/``num_gpus``; each caches its base model and trains
  many clients in turn.
- The tokenized data goes into the object store once (numpy arrays are read zero-copy by every worker).
- The server ``ray.put``s each distinct payload once per round (FedIT's global adapter is one object for all
  sampled clients) and receives client updates by object reference: with the server in an actor, adapter tensors
  never pass through the driver.
- Ray and the workers start before the driver prepares the data (:meth:`RayBackend.launch`), so that their imports
  and model builds overlap the tokenization.
- A worker that dies is replaced (Ray's own ActorPool would shrink silently) and its client retried.
"""

from __future__ import annotations

import logging
import os
import tempfile
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
from fedsim.runtime.wire import pack, pack_tensors_of, unpack, unpack_tensors_of
from fedsim.runtime.worker import ClientJob
from fedsim.server import Server
from fedsim.strategies import StrategySpec
from fedsim.types import ClientFailure, ClientResult, ClientSpec, RoundContext

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 2  # jobs queued per actor: hides the driver's dispatch latency between two clients


def ray_temp_dir() -> str:
    """Ray's session directory: ``$FEDSIM_RAY_TMPDIR`` or a short per-user path under the system temp dir (Ray's
    socket paths must stay under ~107 characters)."""
    return os.environ.get("FEDSIM_RAY_TMPDIR", os.path.join(tempfile.gettempdir(), f"fedsim-ray-{os.getuid()}"))


def init_ray(scenario: Scenario, runs: int = 1) -> bool:
    """Connect to (``resources.address``) or start a local Ray instance with room for ``runs`` concurrent runs of
    ``scenario``. Returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    res = scenario.resources
    kwargs: dict[str, Any] = dict(include_dashboard=res.dashboard, logging_level=logging.WARNING,
                                  configure_logging=True, log_to_driver=True)
    if res.address:
        kwargs["address"] = res.address
    else:
        import torch

        # Logical CPUs: enough for the pool and the server even on a 2-core machine (threads are pinned per worker).
        need_cpus = runs * (sum(c for _, c, _ in res.slots()) + res.server.num_cpus)
        kwargs["num_cpus"] = max(os.cpu_count() or 1, int(np.ceil(need_cpus)))
        need_gpus = runs * (sum(g for _, _, g in res.slots()) + res.server.num_gpus)
        if need_gpus > 0 and not torch.cuda.is_available():
            log.warning("no CUDA device: the %.2f GPUs requested are logical only; training runs on CPU", need_gpus)
            kwargs["num_gpus"] = int(np.ceil(need_gpus))
        kwargs["_temp_dir"] = ray_temp_dir()
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    keep = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        ray.init(**kwargs)
    except Exception as e:
        where = f"the Ray cluster at {res.address!r}" if res.address else "a local Ray instance"
        raise BackendError(f"could not start {where}: {e.__class__.__name__}: {e}. "
                           "Check resources.address, or use resources.backend: local") from None
    finally:
        if keep is not None:  # Ray's core worker replaces SIGTERM with a handler that dumps a native stack and aborts
            signal.signal(signal.SIGTERM, keep)
    if not res.address:
        stop_unused_ray_processes(res)
    return True


def stop_unused_ray_processes(res: Any) -> list[str]:
    """Stop what a local Ray head starts that a simulation does not use (~80 MB of memory each, a quarter of a
    worker's): the autoscaler monitor (one machine: nothing to scale); the API server, unless ``resources.dashboard``
    (without the dashboard it serves only usage statistics, which fedsim turns off); and the log monitor, which
    forwards the workers' output to the driver, when the command line runs quiet (what the workers print is then
    library chatter; ``--verbose`` keeps it). Returns the processes stopped; a Ray without these hooks keeps them.
    """
    from fedsim.quiet import worker_output_wanted

    stop = ["monitor"] + ([] if res.dashboard else ["dashboard"]) + ([] if worker_output_wanted() else ["log_monitor"])
    try:
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        for name in stop:
            getattr(node, f"kill_{name}")(check_alive=False)
    except Exception as e:  # private hooks: a Ray release without them keeps its processes, nothing else changes
        log.debug("could not stop Ray's unused processes (%s)", e)
        return []
    return stop


def check_placement(res: Any) -> None:
    """Fail now, not after a long wait, when the cluster cannot place the requested workers and server.

    Raises:
        BackendError: naming what is short and the fix.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    slots = res.slots()
    need_cpu = sum(c for _, c, _ in slots) + res.server.num_cpus
    need_gpu = sum(g for _, _, g in slots) + res.server.num_gpus
    biggest_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    biggest_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    problems = []
    one_cpu = max([c for _, c, _ in slots] + [res.server.num_cpus])
    one_gpu = max([g for _, _, g in slots] + [res.server.num_gpus])
    if one_cpu > biggest_cpu:
        problems.append(f"no node has {one_cpu:g} CPUs (largest: {biggest_cpu:g})")
    if one_gpu > biggest_gpu:
        problems.append(f"no node has {one_gpu:g} GPUs (largest: {biggest_gpu:g})")
    if need_cpu > total_cpu + 1e-9:
        problems.append(f"{need_cpu:g} CPUs needed, the cluster has {total_cpu:g}")
    if need_gpu > total_gpu + 1e-9:
        problems.append(f"{need_gpu:g} GPUs needed, the cluster has {total_gpu:g}")
    if problems:
        raise BackendError(
            "Ray cannot place the workers: " + "; ".join(problems) + ". Lower resources.num_workers, "
            "resources.num_cpus / num_gpus, resources.pools or resources.server, or add nodes to the cluster")


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


def _actor_classes():
    import ray

    from fedsim.models.quant import skip_unused_backends
    from fedsim.runtime.worker import Worker

    class WorkerActor(Worker):
        def __init__(self, scenario: dict, data: Any, name: str, num_gpus: float):
            from fedsim.config import scenario_from_dict

            scenario = scenario_from_dict(scenario)
            skip_unused_backends(scenario.clients.quant.backends())  # a process of ours, nothing imported yet
            super().__init__(scenario, data, name, num_gpus)

        @ray.method(num_returns=2)
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

        def stats(self):
            return {**super().stats(), "node": ray.get_runtime_context().get_node_id()}

    return ray.remote(WorkerActor), ray.remote(ObjectStoreServer)


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
        self._worker_cls: Any = None
        self._server_cls: Any = None
        self._args: tuple = ()
        self.num_replaced = 0
        self._base_history: list[tuple[int, Any]] = []
        self._pack_size = 1
        self._ready: list[Any] = []

    def launch(self, scenario: Scenario) -> None:
        """Start Ray and the worker actors; return at once. Each actor imports torch, transformers and PEFT and
        builds its base model while the driver loads and tokenizes the data."""
        if self.actors:
            return
        self.started_ray = init_ray(scenario)
        check_placement(scenario.resources)
        self._worker_cls, self._server_cls = _actor_classes()
        self._resources = scenario.resources
        self._slots = scenario.resources.slots()  # (pool, num_cpus, num_gpus) per worker
        self._pack_size = scenario.pack_size()
        self._args = (scenario.to_dict(), None)  # the data follows in start()
        self.actors = [self._new_actor(i) for i in range(len(self._slots))]
        self._ready = [a.ping.remote() for a in self.actors]  # builds each model as soon as its actor is up

    def start(self, scenario: Scenario, data: TokenizedData, spec: StrategySpec) -> ServerHandle:
        import ray

        self.launch(scenario)
        data_ref = ray.put(data)
        self._args = (self._args[0], data_ref)  # replacements get the data when they are created
        ready = self._ready + [a.attach.remote(data_ref) for a in self.actors]
        res = scenario.resources
        if res.server.num_cpus > 0 or res.server.num_gpus > 0:
            self.server_actor = self._server_cls.options(num_cpus=res.server.num_cpus,
                                                         num_gpus=res.server.num_gpus).remote(
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
        pool, cpus, gpus = self._slots[i]
        # SPREAD: on a cluster, workers go to different nodes first (on one machine it changes nothing)
        actor = self._worker_cls.options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, scheduling_strategy="SPREAD"
                                         ).remote(self._args[0], self._args[1],
                                                  f"worker-{i}" + (f"-pool{pool}" if pool >= 0 else ""), gpus)
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
                meta_ref, update_ref = actor.run_client.remote(unit[0][1], unit[0][2])
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

        for a in self.actors + ([self.server_actor] if self.server_actor is not None else []):
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors, self.server_actor = [], None
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        self.started_ray = False
