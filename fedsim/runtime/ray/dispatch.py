"""Dispatching a round's client jobs to the Ray worker pool, and what a lost worker costs its clients.

Each actor keeps ``PIPELINE_DEPTH`` calls queued; actor calls run in submission order, so no actor idles while the
driver hands it the next one. A call is one client; or with ``resources.clients_per_pass`` K > 1 a pack of up to K
clients from :func:`~fedsim.runtime.packs.make_packs`, cut from the job list alone so that the numbers never depend
on timing; or with ``resources.clients_per_call`` several clients trained one after another (:func:`call_size`: their
numbers are each client's own, whichever call it is in).

The policy (:class:`RetryPolicy`), when a worker dies or a call outlives ``resources.client_timeout_s`` per client
in it: the worker is killed and its calls settle (a result still on its way is waited for, not guessed lost), then
it is replaced; calls it had finished keep their results; the first unfinished one — the clients it was running — is
*charged* an attempt and retried (in the same pack) until ``resources.max_retries`` is spent; the
calls queued behind it are resubmitted uncharged. A client that raises (e.g. a non-finite loss) is not retried: it
would fail the same way. The replacement starts while the other workers go on; calls queue behind its start, and the
clock of a call's time limit starts when the new worker is up.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedsim.runtime.interfaces import Handle, JobOutcome, Sink, drain
from fedsim.runtime.packs import make_packs
from fedsim.types import ClientFailure, ClientJob, ClientResult

log = logging.getLogger(__name__)

# at most this long, once a lost worker is killed, for its calls to settle (each does as soon as Ray learns of the
# death; the bound only keeps a wedged Ray from stalling the round)
SETTLE_S = 60.0

PIPELINE_DEPTH = 2  # jobs queued per actor: hides the driver's dispatch latency between two clients
CALL_TARGET_S = 0.5  # clients_per_call: auto — a call of several clients lasts about this long (Ray's ~2-4 ms per
# call, measured on 2 cores, is then under 1% of it)
CALL_BYTES = 128 * 2**20  # ... and its clients' updates, which the worker holds until the call ends, stay under this


def call_size(remaining: int, workers: int, cap: int) -> int:
    """How many of a pool's ``remaining`` clients the next call takes: guided self-scheduling — a share of what is
    left (half of an even split over the pool's ``workers``), at most ``cap`` — so that calls are long early in a
    round and single clients at its end, where no worker should wait on another's last long call."""
    return max(1, min(cap, -(-remaining // (2 * max(1, workers)))))


def auto_call_cap(client_s: float | None, up_bytes: float | None) -> int:
    """``clients_per_call: auto``'s largest call from the previous round's median client time and update size (1
    before any client has trained)."""
    if not client_s or up_bytes is None:
        return 1
    return max(1, min(int(CALL_TARGET_S / client_s), int(CALL_BYTES / max(up_bytes, 1.0))))

Unit = list[tuple[int, ClientJob, Handle]]  # a call's clients: (position in the job list, job, payload handle)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a client whose worker was lost is tried, and how long a call may run per client in it."""

    max_attempts: int
    timeout_s: float | None = None

    def charge(self, unit: Unit, reason: str) -> tuple[Unit, list[tuple[int, ClientFailure]]]:
        """The clients of a lost call: (those tried again, one attempt more; those out of attempts, failed)."""
        again, failed = [], []
        for pos, job, payload in unit:
            if job.attempt < self.max_attempts:
                again.append((pos, replace(job, attempt=job.attempt + 1), payload))
            else:
                failed.append((pos, ClientFailure(job.spec.client_id, f"{reason} (after {job.attempt} attempts)")))
        return again, failed

    def limit_s(self, unit: Unit) -> float:
        """How long the call may run before its worker is replaced."""
        return self.timeout_s * len(unit) if self.timeout_s is not None else float("inf")


class Dispatch:
    """One round's jobs on the pool of ``backend`` (a :class:`~fedsim.runtime.ray.backend.RayBackend`: its
    ``actors``, slots, resources, pack size, :meth:`kill_worker`, :meth:`replace_worker` and :meth:`ready`)."""

    def __init__(self, backend: Any, jobs: Sequence[tuple[ClientJob, Handle]],
                 on_done: Callable[[ClientResult | ClientFailure], None] | None, policy: RetryPolicy,
                 fold: Handle | None = None, sink: Sink | None = None):
        self.backend, self.jobs, self.on_done, self.policy = backend, jobs, on_done, policy
        self.fold = fold  # the round's FoldSpec: workers fold their clients' updates into partials
        self.sink, self.taken = sink, 0  # outcomes go to the sink in job order; the first position not given yet
        self.folded: dict[int, list[int]] = {}  # slot → positions of the jobs whose update its partial holds
        res = backend.resources
        self.depth = PIPELINE_DEPTH if backend.pack_size == 1 else 1  # a pack hides the dispatch latency itself
        self.cap = backend.clients_per_call() if backend.pack_size == 1 else 1  # clients per call, at most
        self.waiting = {p: deque() for p in sorted({p for p, _, _ in backend.slots})}  # units per worker pool
        self.workers = {p: [q for q, _, _ in backend.slots].count(p) for p in self.waiting}
        for unit in make_packs(jobs, backend.pack_size, res):
            self.waiting[self._pool(jobs[unit[0]][0])].append([(pos, *jobs[pos]) for pos in unit])
        self.queues: list[deque] = [deque() for _ in backend.actors]  # per actor: refs in submission order
        self.started: dict[Any, float] = {}  # ref at the head of its actor's queue → when it started running
        self.inflight: dict[Any, tuple[int, Unit, list]] = {}  # meta ref → (slot, unit, update ref per client)
        self.outcomes: list[JobOutcome | None] = [None] * len(jobs)
        # with a sink, a call starts only within this many positions of the first outcome not given to it: the
        # updates waiting in the object store stay O(workers × call size) — every worker busy with its queue full,
        # and one call each of slack for the order clients finish in
        self.window = (self.depth + 1) * len(backend.actors) * self.cap if sink is not None else len(jobs)

    def _pool(self, job: ClientJob) -> int:
        p = self.backend.resources.pool_of(job.spec.quant.bits)
        return p if p in self.waiting else -1

    def run(self) -> list[JobOutcome]:
        """Every job's outcome, in the order of the jobs."""
        import ray

        while any(self.waiting.values()) or self.inflight:
            for slot in range(len(self.backend.actors)):
                self._fill(slot)
            self._start_clocks()
            starting = [p for s, p in self.backend.starting.items() if self.queues[s]]
            ready, _ = ray.wait(list(self.inflight) + starting, num_returns=1, timeout=self._wait_s())
            for ref in ready:
                if ref in self.inflight:  # else dropped together with its worker
                    self._collect(ref)
            self._enforce_timeouts()
            if self.sink is not None:
                self.taken = drain(self.sink, self.outcomes, self.taken)
        return [o for o in self.outcomes if o is not None]

    def _within(self, unit: Unit) -> bool:
        """Whether ``unit`` may start: its first client lies within the window (the unit holding the first
        position not given to the sink always does, so the round never waits on itself)."""
        return min(pos for pos, _, _ in unit) < self.taken + self.window

    # -- submitting ------------------------------------------------------------------------------------------
    def _fill(self, slot: int) -> None:
        pending = self.waiting[self.backend.slots[slot][0]]
        while pending and len(self.queues[slot]) < self.depth and self._within(pending[0]):
            unit = pending.popleft()
            if self.cap > 1:  # a call of several clients, one after another
                size = call_size(len(unit) + sum(map(len, pending)), self.workers[self.backend.slots[slot][0]],
                                 self.cap)
                while pending and len(unit) + len(pending[0]) <= size and self._within(pending[0]):
                    unit = unit + pending.popleft()
            meta_ref, update_refs = self._submit(slot, unit)
            self.inflight[meta_ref] = (slot, unit, update_refs)
            self.queues[slot].append(meta_ref)

    def _start_clocks(self) -> None:
        """The call at the head of each started worker's queue is running: its time limit counts from now (a
        replacement still starting runs nothing yet)."""
        now = time.monotonic()
        for slot, queue in enumerate(self.queues):
            if queue and queue[0] not in self.started and self.backend.ready(slot):
                self.started[queue[0]] = now

    def _submit(self, slot: int, unit: Unit) -> tuple[Any, list]:
        actor = self.backend.actors[slot]
        fold = {} if self.fold is None else {"fold": self.fold}
        if len(unit) == 1:
            meta_ref, update_ref = actor.run_client.options(num_returns=2).remote(unit[0][1], unit[0][2], **fold)
            return meta_ref, [update_ref]
        if self.backend.pack_size == 1:  # one after another; each payload once (a round's clients mostly share one)
            index: dict[Any, int] = {}  # payload reference → its position among the call's payloads
            which = [index.setdefault(p, len(index)) for _, _, p in unit]
            refs = actor.run_clients.options(num_returns=1 + len(unit)).remote([j for _, j, _ in unit], which,
                                                                               *index, **fold)
            return refs[0], list(refs[1:])
        refs = actor.run_pack.options(num_returns=1 + len(unit)).remote([j for _, j, _ in unit],
                                                                        *[p for _, _, p in unit], **fold)
        return refs[0], list(refs[1:])

    def _wait_s(self) -> float | None:
        if self.policy.timeout_s is None or not self.started:
            return None
        deadline = min(t + self.policy.limit_s(self.inflight[r][1]) for r, t in self.started.items())
        return max(0.01, deadline - time.monotonic())

    # -- results ------------------------------------------------------------------------------------------------
    def _finish(self, pos: int, outcome: JobOutcome) -> None:
        self.outcomes[pos] = outcome
        if self.on_done is not None:
            self.on_done(outcome[0])

    def _finish_unit(self, unit: Unit, metas: Any, update_refs: list, slot: int) -> None:
        metas = metas if isinstance(metas, list) else [metas]
        for (pos, _, _), meta, update_ref in zip(unit, metas, update_refs):
            if self.fold is not None:
                if isinstance(meta, ClientResult) and meta.rejected is None:
                    self.folded.setdefault(slot, []).append(pos)
                self._finish(pos, (meta, None))
            else:
                self._finish(pos, (meta, None if isinstance(meta, ClientFailure) else update_ref))

    def _lose_partial(self, slot: int, reason: str) -> None:
        """The clients folded into a lost worker's partial fail: their updates died with it."""
        for pos in self.folded.pop(slot, []):
            cid = self.jobs[pos][0].spec.client_id
            self.outcomes[pos] = (ClientFailure(cid, f"worker-{slot} was lost ({reason}) holding its folded update "
                                                     "(resources.worker_partials)"), None)

    def _fail_unit(self, unit: Unit, cause: BaseException) -> None:
        for pos, job, _ in unit:
            self._finish(pos, (ClientFailure.of(job.spec.client_id, cause), None))

    def _collect(self, ref: Any) -> None:
        import ray

        slot, unit, update_refs = self.inflight[ref]
        metas, cause = None, None
        try:
            metas = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            log.warning("worker-%d died while training client(s) %s (%s); replacing it", slot,
                        [j.spec.client_id for _, j, _ in unit], e.__class__.__name__)
            self._lose_worker(slot, f"worker died: {e.__class__.__name__}")
            return
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
        del self.inflight[ref]
        self.started.pop(ref, None)
        self.queues[slot].remove(ref)
        self._start_clocks()
        if cause is not None:
            self._fail_unit(unit, cause)
        else:
            self._finish_unit(unit, metas, update_refs, slot)

    # -- faults -------------------------------------------------------------------------------------------------
    def _requeue(self, unit: Unit, charged: bool, reason: str) -> None:
        """Put a lost call's clients back in line — charged an attempt (the call that was running) or not."""
        if charged:
            unit, failed = self.policy.charge(unit, reason)
            for pos, failure in failed:
                self._finish(pos, (failure, None))
        if unit:
            self.waiting[self._pool(unit[0][1])].appendleft(unit)

    def _lose_worker(self, slot: int, reason: str) -> None:
        """Replace a dead or hung worker. Calls it finished keep their results; the first unfinished one (the
        clients it was running) is charged an attempt; the ones queued behind it are resubmitted uncharged."""
        import ray

        self.backend.kill_worker(slot)
        # which of its calls had finished is the driver's to learn, not to guess: once the worker is gone, each call
        # settles — a result whose reply was still on its way, or the worker's death — so that a call finished just
        # before the death is not charged in its place (a busy machine delays the replies, not the outcome)
        refs = list(self.queues[slot])
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=SETTLE_S)
        charged = False
        for ref in refs:
            _, unit, update_refs = self.inflight.pop(ref)
            self.started.pop(ref, None)
            if ray.wait([ref], timeout=0)[0]:
                try:
                    self._finish_unit(unit, ray.get(ref), update_refs, slot)
                    continue
                except ray.exceptions.RayTaskError as e:
                    self._fail_unit(unit, e.cause if getattr(e, "cause", None) is not None else e)
                    continue
                except ray.exceptions.RayActorError:
                    pass
            self._requeue(unit, charged=not charged, reason=reason)
            charged = True
        self.queues[slot].clear()
        self._lose_partial(slot, reason)
        self.backend.replace_worker(slot, wait=False)

    def _enforce_timeouts(self) -> None:
        if self.policy.timeout_s is None:
            return
        now = time.monotonic()
        for slot in range(len(self.backend.actors)):
            head = self.queues[slot][0] if self.queues[slot] else None
            if head is not None and now - self.started.get(head, now) > self.policy.limit_s(self.inflight[head][1]):
                clients = [j.spec.client_id for _, j, _ in self.inflight[head][1]]
                log.warning("client(s) %s exceeded client_timeout_s=%g on worker-%d; replacing the worker",
                            clients, self.policy.timeout_s, slot)
                self._lose_worker(slot, f"timed out after {self.policy.timeout_s:g}s")
