"""Sweeps: run a scenario at every point of a grid of overrides and tabulate the results.

``fedsim sweep SCENARIO --grid clients.num_clients=10,100,1000 [--grid key=v1,v2 ...]`` validates every point first
(a bad value fails before anything runs), then runs the points one after another (or ``--parallel N`` at once: Ray
tasks on a cluster, processes otherwise), each in its own run directory and as its own W&B run in one group, and writes ``sweep.csv`` and ``sweep.png`` (round time, accuracy and communication
against the first swept key).
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from pathlib import Path
from typing import Any

import yaml

from fedsim.config import Scenario, load_scenario, scenario_from_dict
from fedsim.errors import FedsimError, ScenarioError


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``key=v1,v2`` strings → (key, [raw values]); values are parsed as YAML later, per point."""
    grid = []
    for spec in specs:
        if "=" not in spec:
            raise ScenarioError("--grid", f"{spec!r} has no '='", "write it as key.path=v1,v2,v3")
        key, values = spec.split("=", 1)
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not key.strip() or not items:
            raise ScenarioError("--grid", f"{spec!r} needs a key and at least one value", "e.g. --grid rounds=3,5")
        if key in [k for k, _ in grid]:
            raise ScenarioError("--grid", f"key {key!r} is swept twice", "give each key once")
        grid.append((key.strip(), items))
    if not grid:
        raise ScenarioError("--grid", "a sweep needs at least one --grid", "e.g. --grid clients.num_clients=10,100")
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-")[:80]


def plan(path: str | Path, grid_specs: list[str], overrides: list[str] = ()) -> tuple[Scenario, list[dict]]:
    """Validate every point; return the base scenario and, per point, its values, overrides and scenario."""
    base = load_scenario(path, list(overrides))
    grid = parse_grid(list(grid_specs))
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    points = []
    for combo in itertools.product(*[values for _, values in grid]):
        sets = [f"{k}={v}" for (k, _), v in zip(grid, combo)]
        label = "_".join(f"{k.split('.')[-1]}={v}" for (k, _), v in zip(grid, combo))
        name = _slug(f"{base.name}-{label}")
        extra = [f"name={name}"]
        if base.logging.wandb.group is None:
            extra.append(f"logging.wandb.group={base.name}-sweep")
        try:
            scenario = scenario_from_dict(raw, list(overrides) + sets + extra)
        except ScenarioError as e:
            raise ScenarioError("--grid", f"point {label}: {e}") from None
        points.append({"values": dict(zip([k for k, _ in grid], combo)), "name": name, "scenario": scenario})
    seen: dict[str, str] = {}
    for p in points:  # two points that resolve to one scenario would run it twice under two names
        key = json.dumps({k: v for k, v in p["scenario"].to_dict().items() if k != "name"}, sort_keys=True)
        if key in seen:
            raise ScenarioError("--grid", f"points {seen[key]} and {p['name']} are the same scenario",
                                "give each value once")
        seen[key] = p["name"]
    return base, points


def _run_point(scenario: Scenario, run_dir: str, values: dict[str, Any]) -> dict[str, Any]:
    """Run one point and summarise it as a row of ``sweep.csv``; a point that fails is a row too, with its error
    (one line: no traceback crosses into the sweep, from a process or a Ray task)."""
    try:
        return _summarise(scenario, run_dir, values)
    except Exception as e:  # noqa: BLE001 - every failure of one point is that point's row, the others go on
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {**values, "run_dir": str(run_dir), "error": f"{e.__class__.__name__}: {msg}"}


def _summarise(scenario: Scenario, run_dir: str, values: dict[str, Any]) -> dict[str, Any]:
    from fedsim.driver import run_scenario

    run_dir = Path(run_dir)
    summary = run_scenario(scenario, run_dir)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [m for m in metrics if m["round"] >= 1]
    steady = rounds[1:] or rounds
    return {**values, "run_dir": str(run_dir),
            "final_accuracy": summary["final/eval/accuracy"], "final_loss": summary["final/eval/loss"],
            "round_time_s": statistics.median(m["time/fit_s"] for m in steady),
            "sim_time_s": summary.get("time/sim_total_s", 0.0),
            "comm_params": summary["comm/total_up_params"] + summary["comm/total_down_params"],
            "time_s": summary["time_s"], "error": ""}


def run_sweep(path: str | Path, grid_specs: list[str], overrides: list[str] = (), out: str | Path | None = None,
              parallel: int = 1) -> list[dict[str, Any]]:
    """Run every point; write ``sweep.csv`` and ``sweep.png`` into ``out`` (default ``runs/<name>-sweep``).

    ``parallel`` > 1 runs that many points at once: with the Ray backend each point's driver is a Ray task on the
    cluster (its workers and server are actors there, placed like any run's), otherwise a process of its own.
    Every point runs, whatever another one does; a failed point is a row of ``sweep.csv`` with its ``error``.

    Raises:
        FedsimError: after every point ran and the table is written, when some point failed (naming it).
    """
    from fedsim.federation.rundir import new_run_dir

    base, points = plan(path, grid_specs, overrides)
    out_dir = Path(out) if out is not None else Path("runs") / f"{base.name}-sweep"
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(p["scenario"], str(new_run_dir(p["scenario"], out_dir / p["name"])), p["values"]) for p in points]
    rows: list[dict[str, Any] | None] = [None] * len(jobs)

    def done(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        status = f"failed: {row['error']}" if row.get("error") else "done"
        print(f"[sweep {sum(r is not None for r in rows)}/{len(jobs)}] {points[i]['name']} {status}", flush=True)
        _write(out_dir, [r for r in rows if r is not None])

    if parallel <= 1:
        for i, job in enumerate(jobs):
            print(f"[sweep {i + 1}/{len(jobs)}] {points[i]['name']}", flush=True)
            done(i, _run_point(*job))
    elif base.resources.backend == "ray":
        _run_on_ray(jobs, parallel, base, done)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(parallel, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_point, *job): i for i, job in enumerate(jobs)}
            for f in cf.as_completed(futures):
                done(futures[f], f.result())
    _plot(out_dir, [r for r in rows if r is not None and not r.get("error")], [k for k in points[0]["values"]])
    failed = [(points[i]["name"], r["error"]) for i, r in enumerate(rows) if r is not None and r.get("error")]
    if failed:
        raise FedsimError(f"{len(failed)} of {len(rows)} sweep points failed (their rows in {out_dir / 'sweep.csv'} "
                          f"say why), e.g. {failed[0][0]}: {failed[0][1]}")
    return rows


def _run_on_ray(jobs: list[tuple], parallel: int, base: Scenario, done: Any) -> None:
    """Each point's driver as a Ray task (no CPU of its own: its workers and server hold the resources)."""
    import ray

    from fedsim.runtime.ray.pool import init_ray

    started = init_ray(base, runs=parallel)
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(_run_point)
        pending: dict[Any, int] = {}
        queue = list(enumerate(jobs))
        while queue or pending:
            while queue and len(pending) < parallel:
                i, job = queue.pop(0)
                pending[task.remote(*job)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                done(pending.pop(ref), ray.get(ref))
    finally:
        if started:
            ray.shutdown()


def _write(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    fields = list(dict.fromkeys(k for r in rows for k in r))  # failed points' rows have fewer columns
    with open(out_dir / "sweep.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _plot(out_dir: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, others = keys[0], keys[1:]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in others), []).append(r)
    for group, rs in groups.items():
        label = ", ".join(f"{k}={v}" for k, v in zip(others, group)) or None
        xs = [str(r[x_key]) for r in rs]
        for ax, metric, title in zip(axes, ("round_time_s", "final_accuracy", "comm_params"),
                                     ("round time (s, median)", "final eval accuracy", "communication (params)")):
            ax.plot(xs, [r[metric] for r in rs], marker="o", label=label)
            ax.set_xlabel(x_key)
            ax.set_title(title)
            ax.grid(alpha=0.3)
    if others:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "sweep.png", dpi=110)
    plt.close(fig)
