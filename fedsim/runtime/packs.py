"""Which clients train together: the packs of :data:`resources.clients_per_pass`, cut from the job list alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedsim.types import ClientJob


def make_packs(jobs: Sequence[tuple[ClientJob, Any]], size: int, resources: Any = None) -> list[list[int]]:
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
