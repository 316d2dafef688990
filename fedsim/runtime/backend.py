"""The backend interface: where client jobs, evaluation and the server run.

A backend hands out opaque *handles* for payloads and updates: the objects themselves in-process, Ray object
references with Ray, so that the driver can route tensors between server and workers without touching them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedsim.config import Scenario
from fedsim.data.datasets import TokenizedData
from fedsim.runtime.worker import ClientJob
from fedsim.strategies import StrategySpec
from fedsim.types import ClientFailure, ClientResult, ClientSpec, RoundContext

Handle = Any
JobOutcome = tuple[ClientResult | ClientFailure, Handle | None]


class ServerHandle(ABC):
    """The server as seen from the driver."""

    @abstractmethod
    def configure(self, ctx: RoundContext, clients: Sequence[ClientSpec]
                  ) -> tuple[dict[int, Handle], dict[int, tuple[int, int]]]:
        """Payload handles per client, and (params, bytes) each client downloads."""

    @abstractmethod
    def aggregate(self, ctx: RoundContext, updates: Sequence[Handle]) -> dict[str, float]:
        """Aggregate the update handles; return upload accounting."""

    @abstractmethod
    def base_deltas(self, since: int) -> list[tuple[int, Handle]]:
        """(version, handle) of every base-model update after version ``since``."""

    @abstractmethod
    def get_state(self) -> tuple[Any, dict]:
        """(GlobalState, strategy state) for a checkpoint."""

    @abstractmethod
    def set_state(self, state: Any, strategy_state: dict) -> None:
        """Restore a checkpointed state."""

    @abstractmethod
    def eval_handle(self) -> Handle:
        """A handle to the payload the global model is evaluated with."""

    @abstractmethod
    def global_adapter(self) -> Any:
        """The run's whole model as one adapter (:class:`fedsim.export.ExportedAdapter`), for saving."""


class Backend(ABC):
    """Runs a server and a pool of workers."""

    num_replaced: int = 0  # workers replaced after dying or hanging, over the run

    def launch(self, scenario: Scenario) -> None:  # noqa: B027 (optional hook; the default does nothing)
        """Begin starting the workers, before the data is ready (the driver calls it before preparing the data, so
        that process start-up overlaps the tokenization); :meth:`start` finishes the job. Optional."""

    @abstractmethod
    def start(self, scenario: Scenario, data: TokenizedData, spec: StrategySpec) -> ServerHandle:
        """Start the workers (if :meth:`launch` has not) and the server; return the server handle."""

    @abstractmethod
    def train(self, jobs: Sequence[tuple[ClientJob, Handle]],
              on_done: Callable[[ClientResult | ClientFailure], None] | None = None) -> list[JobOutcome]:
        """Run every job; return one outcome per job (a result with its update handle, or a failure)."""

    @abstractmethod
    def sync_base(self, deltas: Sequence[tuple[int, Handle]]) -> None:
        """Make every worker apply these base-model updates (in order) before its next job."""

    @abstractmethod
    def evaluate(self, payload: Handle, batches: Sequence[np.ndarray]) -> list[dict[str, float]]:
        """Evaluate the payload on test batches; one dict of sums per batch, in order."""

    @abstractmethod
    def evaluate_clients(self, payload: Handle, items: Sequence[tuple[int, Any, np.ndarray]]
                         ) -> dict[int, tuple[dict[str, float], dict[str, float]]]:
        """Per client (id, personal tensors or None, local test indices): sums with the global adapter alone and
        with the personal tensors on top."""

    @abstractmethod
    def worker_stats(self) -> list[dict[str, Any]]:
        """Per-worker counters (model builds, PEFT wraps, clients trained)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers (and Ray, if this backend started it)."""


def make_packs(jobs: Sequence[tuple[ClientJob, Handle]], size: int, resources: Any = None) -> list[list[int]]:
    """Positions of ``jobs`` in packs of at most ``size`` clients that share a worker pool and a base bit width.

    The packs depend on the job list alone, never on timing, so that both backends (and every run) train the same
    clients together and so compute the same numbers. Each group of n jobs is cut into nearly equal, consecutive
    packs — as many as ``size`` needs, rounded up to a multiple of the pool's workers when there are enough jobs, so
    that the last wave of packs keeps every worker busy.
    """
    groups: dict[Any, list[int]] = {}
    for pos, (job, _) in enumerate(jobs):
        pool = resources.pool_of(job.spec.quant.bits) if resources is not None else -1
        groups.setdefault((pool, job.spec.quant), []).append(pos)
    pools = [p for p, _, _ in resources.slots()] if resources is not None else []
    packs = []
    for (pool, _), positions in groups.items():
        n = len(positions)
        workers = max(1, pools.count(pool))
        count = -(-n // size)
        count = min(n, -(-count // workers) * workers)
        edges = np.linspace(0, n, count + 1).round().astype(int)
        packs += [positions[a:b] for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return sorted(packs)


def make_backend(scenario: Scenario) -> Backend:
    """The backend the scenario asks for."""
    if scenario.resources.backend == "local":
        from fedsim.runtime.local import LocalBackend

        return LocalBackend()
    from fedsim.runtime.ray_backend import RayBackend

    return RayBackend()
