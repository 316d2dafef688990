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
    while True:  # a child that dies without a result (an exception, the OOM killer) must not hang the benchmark
        try:
            out = queue.get(timeout=1.0)
            break
        except Exception:  # queue.Empty
            if not p.is_alive():
                raise RuntimeError(f"{getattr(target, '__name__', target)} exited with code {p.exitcode} "
                                   "without a result (its traceback is above)") from None
    p.join()
    return out


def floor_rounds(target: Callable, num_clients: int, args: tuple = ()) -> list[float]:
    """The compute floor's round times: ``target(args + (clients, ), queue)`` in 2 spawned processes that share the
    round's clients (each puts its per-round times on the queue); a round ends when the slower process ends."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    share = [num_clients // 2 + (i < num_clients % 2) for i in range(2)]
    procs = [ctx.Process(target=target, args=((*args, share[i]), queue)) for i in range(2)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return [max(ts) for ts in zip(*results)]


def floor_loop(step: Callable[[], None], params: list, num_clients: int, rounds: int) -> list[float]:
    """Per-round times of the floor's loop in one process: per client a fresh AdamW, then ``step`` (forward and
    backward) with gradient clipping at 1.0 and the optimizer's step, 5 times (the benchmarks' local steps)."""
    import time

    import torch

    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(num_clients):
            opt = torch.optim.AdamW(params, lr=1e-3)
            for _ in range(5):
                step()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


MODEL_ENV = "FEDSIM_BENCH_MODEL"  # the base model of a benchmark's runs (inherited by its worker processes)


def add_base_argument(ap) -> None:
    ap.add_argument("--base", choices=["random", "warm"], default="random",
                    help="random: the built-in randomly initialised tiny model; warm: the same architecture pretrained by "
                         "benchmarks/warm_base.py (built once, cached), loaded through from_pretrained")


def use_base(args) -> str:
    """Set the base model for this benchmark's runs from ``--base``; returns a suffix for the output names."""
    import os

    if args.base == "warm":
        import warm_base

        try:
            os.environ[MODEL_ENV] = str(warm_base.ensure())
        except warm_base.CorpusError as e:
            raise SystemExit(f"error: {e}") from None
        return "_warm"
    os.environ.pop(MODEL_ENV, None)
    return ""


def with_base(raw: dict) -> dict:
    """``raw`` with ``model.name`` set to the benchmark's base (``--base``), the tiny model by default."""
    import os

    name = os.environ.get(MODEL_ENV)
    if name:
        raw = merge(raw, {"model": {"name": name}})
    return raw


def base_label() -> str:
    import os

    return "warm base (benchmarks/warm_base.py)" if os.environ.get(MODEL_ENV) else "tiny model (random init)"
