"""Ray backend: a pool of long-lived worker actors multiplexing virtual clients, and a server actor.

- Workers are created once per run with fractional ``num_cpus``/``num_gpus``; each caches its base model and trains
  many clients in turn.
- The tokenized data goes into the object store once (numpy arrays are read zero-copy by every worker).
- The server actor ``ray.put``s each distinct payload once per round (FedIT's global adapter is one object for all
  sampled clients) and receives client updates by object reference, so adapter tensors never pass through the driver.
- A worker that dies is replaced (Ray's own ActorPool would shrink silently) and its client retried.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedsim.config import Scenario
from fedsim.data.datasets import TokenizedData
from fedsim.errors import BackendError
from fedsim.runtime.backend import Backend, Handle, JobOutcome, ServerHandle
from fedsim.runtime.worker import ClientJob
from fedsim.strategies import StrategySpec
from fedsim.types import ClientFailure, ClientResult, ClientSpec, RoundContext, Tensors

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # a client whose worker died is retried once on a fresh worker
PIPELINE_DEPTH = 2  # jobs queued per actor: hides the driver's dispatch latency between two clients


def ray_temp_dir() -> str:
    """Ray's session directory: ``$FEDSIM_RAY_TMPDIR`` or a short per-user path under the system temp dir (Ray's
    socket paths must stay under ~107 characters)."""
    return os.environ.get("FEDSIM_RAY_TMPDIR", os.path.join(tempfile.gettempdir(), f"fedsim-ray-{os.getuid()}"))


def init_ray(scenario: Scenario) -> bool:
    """Connect to (``resources.address``) or start a local Ray instance. Returns True if this call started it."""
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
        need_cpus = res.num_workers * res.num_cpus + res.server.num_cpus
        kwargs["num_cpus"] = max(os.cpu_count() or 1, int(np.ceil(need_cpus)))
        need_gpus = res.num_workers * res.num_gpus + res.server.num_gpus
        if need_gpus > 0 and not torch.cuda.is_available():
            log.warning("no CUDA device: the %.2f GPUs requested are logical only; training runs on CPU", need_gpus)
            kwargs["num_gpus"] = int(np.ceil(need_gpus))
        kwargs["_temp_dir"] = ray_temp_dir()
    try:
        ray.init(**kwargs)
    except Exception as e:
        where = f"the Ray cluster at {res.address!r}" if res.address else "a local Ray instance"
        raise BackendError(f"could not start {where}: {e.__class__.__name__}: {e}. "
                           "Check resources.address, or use resources.backend: local") from None
    return True


def _actor_classes():
    import ray

    from fedsim.runtime.wire import pack, pack_tensors_of, unpack, unpack_tensors_of
    from fedsim.runtime.worker import Worker
    from fedsim.server import Server

    class WorkerActor(Worker):
        @ray.method(num_returns=2)
        def run_client(self, job, payload):
            result, update = super().run_client(job, unpack_tensors_of(payload))
            return result, pack_tensors_of(update)

        def evaluate(self, payload, batches):
            return super().evaluate(unpack_tensors_of(payload), batches)

        def apply_base_delta(self, version, delta):
            return super().apply_base_delta(version, unpack(delta))

        def ping(self) -> str:
            return self.name

    class ServerActor:
        def __init__(self, strategy_name: str, params: dict, spec: StrategySpec):
            self.server = Server(strategy_name, params, spec)

        def configure(self, ctx: RoundContext, clients: Sequence[ClientSpec]):
            payloads, down = self.server.configure(ctx, clients)
            refs: dict[int, Any] = {}
            by_object: dict[int, Any] = {}
            for cid, p in payloads.items():
                if id(p) not in by_object:  # one object-store copy per distinct payload
                    by_object[id(p)] = ray.put(pack_tensors_of(p))
                refs[cid] = by_object[id(p)]
            return refs, down

        def aggregate(self, ctx: RoundContext, update_refs: list) -> dict[str, float]:
            return self.server.aggregate(ctx, [unpack_tensors_of(u) for u in ray.get(list(update_refs))])

        def base_deltas(self, since: int):
            return [(v, ray.put(pack(d))) for v, d in self.server.base_deltas(since)]

        def get_state(self):
            return self.server.get_state()

        def set_state(self, state, strategy_state):
            self.server.set_state(state, strategy_state)

        def eval_handle(self):
            return [ray.put(pack_tensors_of(self.server.eval_payload()))]

        def global_adapter(self):
            return self.server.global_adapter()

    return ray.remote(WorkerActor), ray.remote(ServerActor)


class RayServerHandle(ServerHandle):
    def __init__(self, actor: Any):
        self.actor = actor

    def configure(self, ctx: RoundContext, clients: Sequence[ClientSpec]):
        import ray

        return ray.get(self.actor.configure.remote(ctx, list(clients)))

    def aggregate(self, ctx: RoundContext, updates: Sequence[Handle]) -> dict[str, float]:
        import ray

        # Wrapped in a list so that Ray passes the references through instead of resolving them here.
        return ray.get(self.actor.aggregate.remote(ctx, list(updates)))

    def base_deltas(self, since: int) -> list[tuple[int, Handle]]:
        import ray

        return ray.get(self.actor.base_deltas.remote(since))

    def get_state(self) -> tuple[Any, dict]:
        import ray

        return ray.get(self.actor.get_state.remote())

    def set_state(self, state: Any, strategy_state: dict) -> None:
        import ray

        ray.get(self.actor.set_state.remote(state, strategy_state))

    def eval_handle(self) -> Handle:
        import ray

        return ray.get(self.actor.eval_handle.remote())[0]

    def global_adapter(self) -> tuple[Tensors, Any]:
        import ray

        return ray.get(self.actor.global_adapter.remote())


class RayBackend(Backend):
    """A pool of ``resources.num_workers`` worker actors plus one server actor."""

    def __init__(self) -> None:
        self.started_ray = False
        self.actors: list[Any] = []
        self.server_actor: Any = None
        self._worker_cls: Any = None
        self._args: tuple = ()
        self._opts: dict[str, Any] = {}
        self.num_replaced = 0
        self._base_history: list[tuple[int, Any]] = []

    def start(self, scenario: Scenario, data: TokenizedData, spec: StrategySpec) -> ServerHandle:
        import ray

        self.started_ray = init_ray(scenario)
        worker_cls, server_cls = _actor_classes()
        res = scenario.resources
        self._worker_cls = worker_cls
        self._opts = dict(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=0)
        self._args = (scenario.to_dict(), ray.put(data))
        self.actors = [self._new_actor(i) for i in range(res.num_workers)]
        self.server_actor = server_cls.options(num_cpus=res.server.num_cpus, num_gpus=res.server.num_gpus).remote(
            scenario.strategy.name, scenario.strategy.params, spec)
        try:
            ray.get([a.ping.remote() for a in self.actors] + [self.server_actor.__ray_ready__.remote()], timeout=600)
        except ray.exceptions.GetTimeoutError:
            raise BackendError(
                f"Ray could not place {res.num_workers} workers with num_cpus={res.num_cpus}, num_gpus={res.num_gpus} "
                f"(cluster has {ray.cluster_resources()}); lower resources.num_workers or the per-worker resources"
            ) from None
        return RayServerHandle(self.server_actor)

    def _new_actor(self, i: int) -> Any:
        actor = self._worker_cls.options(**self._opts).remote(self._args[0], self._args[1], f"worker-{i}")
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
        the driver hands it the next client (actor calls run in submission order)."""
        import ray

        pending = deque((pos, job, payload, 1) for pos, (job, payload) in enumerate(jobs))
        free = deque(slot for _ in range(PIPELINE_DEPTH) for slot in range(len(self.actors)))
        generation = [0] * len(self.actors)
        inflight: dict[Any, tuple[int, int, int, ClientJob, Handle, int, Any]] = {}
        outcomes: list[JobOutcome | None] = [None] * len(jobs)

        def finish(pos: int, outcome: JobOutcome) -> None:
            outcomes[pos] = outcome
            if on_done is not None:
                on_done(outcome[0])

        while pending or inflight:
            while free and pending:
                slot = free.popleft()
                pos, job, payload, attempt = pending.popleft()
                meta_ref, update_ref = self.actors[slot].run_client.remote(job, payload)
                inflight[meta_ref] = (slot, generation[slot], pos, job, payload, attempt, update_ref)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                slot, gen, pos, job, payload, attempt, update_ref = inflight.pop(ref)
                try:
                    finish(pos, (ray.get(ref), update_ref))
                except ray.exceptions.RayActorError as e:
                    if gen == generation[slot]:  # the first of its jobs to report the death replaces the actor
                        log.warning("worker-%d died while training client %d (%s); replacing it", slot,
                                    job.spec.client_id, e.__class__.__name__)
                        self.actors[slot] = self._new_actor(slot)
                        generation[slot] += 1
                        self.num_replaced += 1
                    if attempt < MAX_ATTEMPTS:
                        pending.appendleft((pos, job, payload, attempt + 1))
                    else:
                        finish(pos, (ClientFailure(job.spec.client_id, f"worker died: {e.__class__.__name__}"), None))
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    finish(pos, (ClientFailure(job.spec.client_id, f"{cause.__class__.__name__}: {cause}"), None))
                free.append(slot)
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
