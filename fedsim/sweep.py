"""Sweeps: run a scenario at every point of a grid of overrides and tabulate the results.

``fedsim sweep SCENARIO --grid clients.num_clients=10,100,1000 [--grid key=v1,v2 ...] [--seeds N]`` validates every
point first (a bad value fails before anything runs), then runs the points one after another (or ``--parallel N`` at
once: Ray tasks on a cluster, processes otherwise), each in its own run directory ``SWEEP_DIR/<point>`` and as its own
W&B run, all in one W&B group of their own (one per sweep invocation, kept by a resume). It writes ``sweep_runs.csv``
(a row per run), ``sweep.csv`` (a row per point: with several seeds — ``--seeds N`` or a ``seed`` grid key — the mean
of each result and its standard deviation in ``<result>_std``), ``sweep.png`` (results against the first swept key,
mean ± std over seeds, and every point's curves over rounds) and ``sweep.json`` (the plan). ``--resume`` continues an
interrupted sweep: finished points are read back, interrupted ones resumed from their checkpoints, the rest run.
"""

from __future__ import annotations

import itertools
import json
import math
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


RESULTS = ("final_accuracy", "final_loss", "round_time_s", "sim_time_s", "comm_params", "time_s")


MAX_RUNS = 10_000  # runs in one sweep (points × seeds)


def plan(path: str | Path, grid_specs: list[str], overrides: list[str] = (), seeds: int = 1,
         group: str | None = None) -> tuple[Scenario, list[dict]]:
    """Validate every point; return the base scenario and, per point, its values, overrides and scenario.
    ``seeds`` > 1 adds a ``seed`` key (the scenario's seed and the next ones); ``group``: the W&B group of every
    point (when the scenario names none)."""
    base = load_scenario(path, list(overrides))
    grid = parse_grid(list(grid_specs))
    if seeds > 1:
        if "seed" in [k for k, _ in grid]:
            raise ScenarioError("--seeds", "the grid sweeps seed already", "use --seeds or --grid seed=..., not both")
        grid.append(("seed", [str(base.seed + i) for i in range(seeds)]))
    total = math.prod(len(values) for _, values in grid)
    if total > MAX_RUNS:  # each point is validated and held as a scenario: 100,000 took minutes and 2 GB unsaid
        raise ScenarioError("--grid", f"the sweep has {total:,} runs ({' × '.join(str(len(v)) for _, v in grid)} "
                            f"values{' with the seeds' if seeds > 1 else ''}); fedsim sweeps at most {MAX_RUNS:,}",
                            "split it into several sweeps, or sweep fewer values or seeds")
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    points = []
    for combo in itertools.product(*[values for _, values in grid]):
        sets = [f"{k}={v}" for (k, _), v in zip(grid, combo)]
        label = "_".join(f"{k.split('.')[-1]}={v}" for (k, _), v in zip(grid, combo))
        name = _slug(f"{base.name}-{label}")
        extra = [f"name={name}", 'logging.wandb.name="{name}"']
        if base.logging.wandb.group is None:
            extra.append(f"logging.wandb.group={group or base.name + '-sweep'}")
        if "sweep" not in base.logging.wandb.tags:
            extra.append(f"logging.wandb.tags={json.dumps([*base.logging.wandb.tags, 'sweep'])}")
        try:
            scenario = scenario_from_dict(raw, list(overrides) + sets + extra)
        except ScenarioError as e:
            raise ScenarioError("--grid", f"point {label}: {e}") from None
        points.append({"values": dict(zip([k for k, _ in grid], combo)), "name": name, "scenario": scenario})
    seen: dict[str, str] = {}
    for p in points:  # two points that resolve to one scenario would run it twice under two names
        d = p["scenario"].to_dict()
        d.pop("name")
        d["logging"]["wandb"].pop("name", None)
        key = json.dumps(d, sort_keys=True)
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
    """Run the point (or finish it: read a finished run back, resume an interrupted one) and summarise it."""
    from fedsim.driver import resume_run, run_scenario

    run_dir = Path(run_dir)
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    elif (run_dir / "metrics.jsonl").is_file():
        try:
            summary = resume_run(run_dir)
        except ScenarioError as e:  # interrupted before its first checkpoint: set aside, then run afresh
            if "checkpoint" not in str(e):
                raise
            k = 1
            while run_dir.with_name(f"{run_dir.name}.interrupted-{k}").exists():
                k += 1
            run_dir.rename(run_dir.with_name(f"{run_dir.name}.interrupted-{k}"))
            summary = run_scenario(scenario, run_dir)
    else:
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
              parallel: int = 1, seeds: int = 1, resume: bool = False) -> list[dict[str, Any]]:
    """Run every point; write ``sweep_runs.csv``, ``sweep.csv``, ``sweep.png`` and ``sweep.json`` into ``out``
    (default ``runs/<name>-sweep``, suffixed when it exists; with ``resume``, the sweep to continue).

    ``parallel`` > 1 runs that many points at once: with the Ray backend each point's driver is a Ray task on the
    cluster (its workers and server are actors there, placed like any run's), otherwise a process of its own.
    Every point runs, whatever another one does; a failed point is a row of ``sweep_runs.csv`` with its ``error``.

    Raises:
        ScenarioError: ``out`` holds a sweep already (without ``resume``), or not this one (with it).
        FedsimError: after every point ran and the tables are written, when some point failed (naming it).
    """
    base, _ = plan(path, grid_specs, overrides, seeds)  # every point valid before the sweep's directory exists
    out_dir, group = _sweep_dir(base, out, resume, {"scenario": str(Path(path).resolve()), "grid": list(grid_specs),
                                                    "overrides": list(overrides), "seeds": seeds})
    _, points = plan(path, grid_specs, overrides, seeds, group)
    jobs = [(p["scenario"], str(_point_dir(p["scenario"], out_dir / p["name"], resume)), p["values"]) for p in points]
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    keys = list(points[0]["values"])

    def done(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        status = f"failed: {row['error']}" if row.get("error") else "done"
        print(f"[sweep {sum(r is not None for r in rows)}/{len(jobs)}] {points[i]['name']} {status}", flush=True)
        _write(out_dir, [r for r in rows if r is not None], keys)

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
    _plot(out_dir, [r for r in rows if r is not None and not r.get("error")], keys)
    failed = [(points[i]["name"], r["error"]) for i, r in enumerate(rows) if r is not None and r.get("error")]
    if failed:
        raise FedsimError(f"{len(failed)} of {len(rows)} sweep points failed (their rows in "
                          f"{out_dir / 'sweep_runs.csv'} say why), e.g. {failed[0][0]}: {failed[0][1]}")
    return rows


def _sweep_dir(base: Scenario, out: str | Path | None, resume: bool, plan_info: dict[str, Any]) -> tuple[Path, str]:
    """The sweep's directory and W&B group: a new one (``sweep.json`` written, the group named after the directory
    and the time), or with ``resume`` the existing one whose ``sweep.json`` records this very plan."""
    import time

    if resume:
        path = Path(out) if out is not None else Path("runs") / f"{base.name}-sweep"
        info = path / "sweep.json"
        if not info.is_file():
            raise ScenarioError("--resume", f"{path} holds no sweep (no sweep.json)", "give the sweep's --out")
        saved = json.loads(info.read_text(encoding="utf-8"))
        changed = [k for k, v in plan_info.items() if saved.get(k) != v]
        if changed:
            raise ScenarioError("--resume", f"{path} holds another sweep: its {', '.join(changed)} differ(s)",
                                "repeat the sweep's own command line with --resume, or start a new one")
        return path, saved["group"]
    if out is not None:
        path = Path(out)
        if (path / "sweep.json").is_file():
            raise ScenarioError("--out", f"{path} holds a sweep already", "continue it with --resume, or give "
                                "another --out")
    else:
        stem = Path("runs") / f"{base.name}-sweep"
        path, k = stem, 1
        while path.exists():
            k += 1
            path = stem.with_name(f"{stem.name}-{k}")
    path.mkdir(parents=True, exist_ok=True)
    group = base.logging.wandb.group or f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    (path / "sweep.json").write_text(json.dumps({**plan_info, "group": group}, indent=1), encoding="utf-8")
    return path, group


def _point_dir(scenario: Scenario, path: Path, resume: bool) -> Path:
    """A point's run directory: new, or with ``resume`` whatever an earlier invocation left there."""
    from fedsim.federation.rundir import new_run_dir

    if resume and (path / "metrics.jsonl").is_file():
        return path
    return new_run_dir(scenario, path)


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


def _write(out_dir: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """``sweep_runs.csv`` (every run) and ``sweep.csv`` (every point: over seeds, means and ``_std``)."""
    _csv(out_dir / "sweep_runs.csv", rows)
    if "seed" not in keys:
        _csv(out_dir / "sweep.csv", rows)
        return
    points: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        points.setdefault(tuple(r[k] for k in keys if k != "seed"), []).append(r)
    table = []
    for values, runs in points.items():
        ok = [r for r in runs if not r.get("error")]
        row: dict[str, Any] = dict(zip([k for k in keys if k != "seed"], values))
        row["seeds"] = len(ok)
        for m in RESULTS:
            xs = [float(r[m]) for r in ok if r.get(m) is not None]
            row[m] = statistics.mean(xs) if xs else None
            row[f"{m}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0 if xs else None
        row["failed"] = len(runs) - len(ok)
        table.append(row)
    _csv(out_dir / "sweep.csv", table)


def _csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    fields = list(dict.fromkeys(k for r in rows for k in r))  # failed points' rows have fewer columns
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(sweep_dir: Path, path: Path | None = None) -> Path:
    """Draw a finished (or partly finished) sweep from its ``sweep_runs.csv``; returns the figure's path."""
    import csv

    runs = sweep_dir / "sweep_runs.csv"
    if not runs.is_file():
        runs = sweep_dir / "sweep.csv"  # a sweep written before sweep_runs.csv existed
    with open(runs, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if not r.get("error")]
    keys = fields[: fields.index("run_dir")] if "run_dir" in fields else fields[:1]
    rows = [r for r in rows if (Path(r["run_dir"]) / "metrics.jsonl").is_file()]
    if not rows:
        raise FedsimError(f"{sweep_dir} holds no finished point to draw")
    return _plot(sweep_dir, rows, keys, path)


def _plot(out_dir: Path, rows: list[dict[str, Any]], keys: list[str], path: Path | None = None) -> Path:
    """``sweep.png``: results against the first swept key (over seeds, mean ± std) and each point's curves."""
    from fedsim.plots import draw_sweep, read_rows

    shown = [k for k in keys if k != "seed"] or keys
    curves: dict[str, list[list[dict]]] = {}
    for r in rows:
        label = ", ".join(f"{k.split('.')[-1]}={r[k]}" for k in shown)
        curves.setdefault(label, []).append(read_rows(Path(r["run_dir"])))
    path = path or out_dir / "sweep.png"
    draw_sweep(rows, shown, curves, path)
    return path
