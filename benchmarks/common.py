"""Helpers shared by the benchmark scripts (run them from the repository root: python benchmarks/<name>.py)."""

from __future__ import annotations

import copy
import multiprocessing as mp
import statistics
from collections.abc import Callable


def merge(a: dict, b: dict) -> dict:
    """A deep copy of ``a`` with ``b`` merged in (nested mappings merged, everything else replaced)."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def mean_std(xs: list) -> str:
    """``mean ± std`` over the values that are not None (``—`` if none are)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def in_subprocess(target: Callable, args: tuple) -> dict:
    """``target(args, queue)`` in a fresh spawned process (its own peak RSS, its own imports); what it puts on the
    queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=(args, queue))
    p.start()
    out = queue.get()
    p.join()
    return out
