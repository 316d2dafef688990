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


class _InProcess:
    """One process: the runs one after another here (no process start-up per pool)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap_unordered(fn, jobs):
        return map(fn, jobs)


def cached_pool(jobs: list, n: int, cache, run: Callable, key: Callable, where: Callable, said: Callable,
                label: str = "") -> list[dict]:
    """The jobs' reports (``run(job)``, a dict with ``key``), those in ``cache`` (a JSON-lines file of finished runs)
    read from it, the others run on ``n`` spawned processes (1: here) and appended to it as each ends: an interrupted
    sweep resumes where it stopped. A report with an ``error`` is printed and left out (not cached: a rerun tries it
    again). ``where(i, todo, report)`` and ``said(report)`` make each progress line."""
    import json
    from pathlib import Path

    done = {}
    if cache is not None and Path(cache).is_file():
        for line in Path(cache).read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            done[r["key"]] = r
    out = [done[k] for j in jobs if (k := key(j)) in done]
    todo = [j for j in jobs if key(j) not in done]
    if out:
        print(f"{label}{len(out)} of {len(jobs)} runs read from {cache}", flush=True)
    if not todo:
        return out
    with mp.get_context("spawn").Pool(n) if n > 1 else _InProcess() as pool:
        for i, r in enumerate(pool.imap_unordered(run, todo), start=1):
            if "error" in r:
                print(f"{where(i, len(todo), r)}: FAILED {r['error']}", flush=True)
                continue
            out.append(r)
            if cache is not None:
                with Path(cache).open("a") as f:
                    f.write(json.dumps(r, default=str) + "\n")
            print(f"{where(i, len(todo), r)}: {said(r)}", flush=True)
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
