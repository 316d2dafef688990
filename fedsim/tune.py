"""``fedsim tune``: a Ray Tune search over any scenario keys, each trial a fedsim run.

The search space is a YAML file::

    space:                                      # scenario keys → distributions
      training.lr: {loguniform: [1.0e-4, 1.0e-2]}
      strategy.server_optimizer.lr: {choice: [0.1, 0.3, 1.0]}
      training.local_steps: {randint: [2, 6]}   # low inclusive, high exclusive (Tune's)
    metric: eval/accuracy                       # a round metric of metrics.jsonl
    mode: max
    samples: 8                                  # trials
    search: random                              # random, optuna or hyperopt (when installed)
    asha: {grace_period: 1, reduction_factor: 2}  # early stopping on the metric by round (omit: none)
    concurrent: 2                               # trials at once (default: as many as the cluster holds)

Each trial runs the scenario with its sampled keys in ``OUT/trials/<trial>`` and reports every round's row to Tune
(ASHA's time is the round). A trial on the Ray backend reserves its workers in a placement group (a bundle per
worker, as the scenario asks), and its actors are created inside it: trials share the cluster without one trial's
workers waiting on another's. ``OUT/tune.csv`` holds a row per trial (its keys, the metric's last and best values,
rounds run, whether ASHA stopped it, its run directory, its error) and ``OUT/best.yaml`` the scenario of the best
trial. ``--resume`` continues an interrupted search (Tune's restore): finished trials are kept, interrupted ones
resume their fedsim run from its checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from fedsim.config import Scenario, dump_scenario, load_scenario, scenario_from_dict
from fedsim.config.base import format_validation
from fedsim.errors import FedsimError, ScenarioError
from fedsim.schema import Strict

DRIVER_CPUS = 0.01  # a trial's driver (the fedsim run's) beside its workers, in its placement group
DISTRIBUTIONS = {"choice": "a list of values", "grid": "a list of values (every one, each `samples` times)",
                 "uniform": "[low, high]", "loguniform": "[low, high], both > 0", "randint": "[low, high)",
                 "quniform": "[low, high, q]"}


class TuneSpec(Strict):
    """A search: the space over scenario keys and how to search it (module docstring)."""

    space: dict[str, dict[str, list[Any]]] = Field(min_length=1)
    metric: str = "eval/accuracy"
    mode: Literal["max", "min"] = "max"
    samples: int = Field(8, ge=1, le=10_000)
    search: Literal["random", "optuna", "hyperopt"] = "random"
    asha: dict[str, int] | None = None
    concurrent: int | None = Field(None, ge=1, le=1_000)

    @field_validator("space")
    @classmethod
    def _distributions(cls, v: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for key, dist in v.items():
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ValueError(f"{key}: give one distribution of {', '.join(DISTRIBUTIONS)} (e.g. {{choice: [4, 8]}}),"
                                 f" not {dist}")
            (kind, args), = dist.items()
            if kind in ("choice", "grid"):
                if not args:
                    raise ValueError(f"{key}: {kind} needs at least one value")
                continue
            if len(args) != (3 if kind == "quniform" else 2) or not all(isinstance(a, (int, float)) for a in args):
                raise ValueError(f"{key}: {kind} takes {DISTRIBUTIONS[kind]}, got {args}")
            if not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
                raise ValueError(f"{key}: {kind} takes {DISTRIBUTIONS[kind]}, got {args}")
        return v

    @field_validator("asha")
    @classmethod
    def _asha(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is not None and set(v) - {"grace_period", "reduction_factor", "max_t"}:
            raise ValueError(f"asha takes grace_period, reduction_factor and max_t, not {sorted(v)}")
        return v


def read_spec(path: str | Path) -> TuneSpec:
    """The search file, validated.

    Raises:
        ScenarioError: missing, not YAML, or invalid (naming the key and the fix).
    """
    p = Path(path)
    if not p.is_file():
        raise ScenarioError("--space", f"search space file {str(p)!r} does not exist", "give a YAML file with a space: "
                            "section (fedsim/tune.py's docstring has an example)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        return TuneSpec.model_validate(raw if raw is not None else {})
    except yaml.YAMLError as e:
        raise ScenarioError("--space", f"{p.name} is not valid YAML: {e}", "fix the YAML syntax") from None
    except ValidationError as e:
        raise ScenarioError("--space", format_validation(e, model=TuneSpec)) from None


def _corners(spec: TuneSpec) -> list[dict[str, Any]]:
    """Assignments that reach every value a choice can take and both ends of every range (checked before the search)."""
    out: list[dict[str, Any]] = []
    for key, dist in spec.space.items():
        (kind, args), = dist.items()
        values = args if kind in ("choice", "grid") else [args[0], args[1] - 1 if kind == "randint" else args[1]]
        out += [{key: v} for v in values]
    return out


def overrides_of(config: dict[str, Any]) -> list[str]:
    """A trial's sampled keys as ``--set`` overrides (values as YAML)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in config.items()]


def check(base_path: str | Path, overrides: list[str], spec: TuneSpec) -> Scenario:
    """The base scenario, and every value the space can give applied to it (a key the scenario lacks, a value its
    schema refuses: refused before a trial starts)."""
    base = load_scenario(base_path, overrides)
    for assignment in _corners(spec):
        try:
            scenario_from_dict(base.to_dict(), overrides_of(assignment))
        except ScenarioError as e:
            raise ScenarioError("--space", f"the search space's {next(iter(assignment))} = "
                                f"{next(iter(assignment.values()))!r} does not fit the scenario: {e}") from None
    return base


def _space(spec: TuneSpec) -> dict[str, Any]:
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a),
            "quniform": lambda a: tune.quniform(*a)}
    return {key: make[kind](args) for key, dist in spec.space.items() for kind, args in dist.items()}


def _search(spec: TuneSpec, seed: int) -> Any:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if spec.search == "random":
        return BasicVariantGenerator(random_state=seed, max_concurrent=spec.concurrent or 0)
    try:
        if spec.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(seed=seed)
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=seed)
    except (ImportError, AssertionError):
        raise FedsimError(f"search: {spec.search} needs the {spec.search} package: pip install {spec.search}, or use "
                          "search: random") from None


def _trial(base: dict[str, Any], spec_metric: str, trials_dir: str, config: dict[str, Any]) -> None:
    """One trial: the scenario with ``config``'s keys, its run directory named after the trial (an interrupted one
    resumes from its checkpoint), every round reported to Tune."""
    from ray import tune

    from fedsim.driver import resume_run, run_scenario
    from fedsim.federation.callbacks import RoundCallback

    class Report(RoundCallback):
        def on_round_end(self, server_round: int, row: dict[str, Any]) -> None:
            if server_round >= 1 and isinstance(row.get(spec_metric), (int, float)):
                tune.report({"round": server_round, spec_metric: float(row[spec_metric])})

    run_dir = Path(trials_dir) / tune.get_context().get_trial_id()
    scenario = scenario_from_dict(base, overrides_of(config))
    if (run_dir / "checkpoint").is_dir() and not (run_dir / "summary.json").is_file():
        resume_run(run_dir, callbacks=[Report()])
        return
    if run_dir.exists():  # interrupted before its first checkpoint, or finished before a restore: run it again
        import shutil

        shutil.rmtree(run_dir)
    run_scenario(scenario, run_dir, callbacks=[Report()])


def _resources(scenario: Scenario) -> Any:
    """A trial's reservation: the run's workers (a bundle each) beside a sliver for its driver; on the local backend,
    the one worker's CPUs."""
    from ray import tune

    res = scenario.resources
    if res.backend != "ray":
        return tune.PlacementGroupFactory([{"CPU": max(res.num_cpus, DRIVER_CPUS)}])
    bundles = [{"CPU": DRIVER_CPUS}] + [{"CPU": c, **({"GPU": g} if g else {})} for _, c, g in res.slots()]
    if res.server.num_cpus or res.server.num_gpus:
        bundles.append({"CPU": res.server.num_cpus, **({"GPU": res.server.num_gpus} if res.server.num_gpus else {})})
    return tune.PlacementGroupFactory(bundles, strategy="PACK")


def run_tune(path: str | Path, space_path: str | Path, overrides: list[str] = (), out: str | Path | None = None,
             resume: bool = False) -> dict[str, Any]:
    """Run the search; write ``tune.csv`` and ``best.yaml`` into ``out`` (default ``runs/<name>-tune``). Returns the
    best trial's row.

    Raises:
        ScenarioError: a bad scenario or space (before any trial); ``out`` holds a search already (without
            ``resume``) or none (with it). FedsimError: every trial failed.
    """
    import functools

    import ray
    from ray import tune

    from fedsim.runtime.ray.pool import init_ray

    spec = read_spec(space_path)
    base = check(path, list(overrides), spec)
    out_dir = Path(out) if out is not None else Path("runs") / f"{base.name}-tune"
    out_dir = out_dir.resolve()
    marker = out_dir / "tune.json"
    plan = {"scenario": str(Path(path).resolve()), "overrides": list(overrides), "space": spec.model_dump()}
    if resume:
        if not marker.is_file() or json.loads(marker.read_text(encoding="utf-8")) != plan:
            raise ScenarioError("--resume", f"{out_dir} holds no search of this scenario and space",
                                "repeat the search's own command line with --resume, or start a new one")
    elif marker.is_file():
        raise ScenarioError("--out", f"{out_dir} holds a search already", "continue it with --resume, or give "
                            "another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(plan, indent=1), encoding="utf-8")
    started = init_ray(base, runs=spec.concurrent or 1, pyarrow=True, driver_cpus=DRIVER_CPUS)
    try:
        trainable = tune.with_resources(
            functools.partial(_trial, base.to_dict(), spec.metric, str(out_dir / "trials")), _resources(base))
        store = out_dir / "tune"
        if resume and tune.Tuner.can_restore(str(store / "search")):
            tuner = tune.Tuner.restore(str(store / "search"), trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=_space(spec), tune_config=_tune_config(spec, base),
                               run_config=tune.RunConfig(storage_path=str(store), name="search", verbose=0))
        results = tuner.fit()
        rows = _rows(results, spec, out_dir)
    finally:
        if started:
            ray.shutdown()
    return _write(rows, spec, base, out_dir)


def _tune_config(spec: TuneSpec, base: Scenario) -> Any:
    """Tune's settings: ASHA's time is the round, and it never stops a trial at its last round (the run would lose
    its summary and adapter: a ``max_t`` of the run's rounds is taken as one more)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if spec.asha is not None:
        asha = {**spec.asha, "max_t": spec.asha.get("max_t", base.rounds + 1)}
        if asha["max_t"] == base.rounds:
            asha["max_t"] += 1
        scheduler = ASHAScheduler(time_attr="round", **asha)
    return tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.samples,
                           search_alg=_search(spec, base.seed), scheduler=scheduler,
                           max_concurrent_trials=None if spec.search == "random" else spec.concurrent)


def _rows(results: Any, spec: TuneSpec, out_dir: Path) -> list[dict[str, Any]]:
    """A row per trial: its keys, the metric's last and best values, the rounds it ran, whether it was stopped early,
    its run directory and error."""
    rows = []
    for r in results:
        history = r.metrics_dataframe
        values = [] if history is None or spec.metric not in history else history[spec.metric].dropna().tolist()
        rounds = int(r.metrics.get("round", 0) or 0) if r.metrics else 0
        trial = Path(r.path).name
        run_dir = out_dir / "trials" / (r.metrics.get("trial_id", "") if r.metrics else "")
        done = (run_dir / "summary.json").is_file()
        best = (max if spec.mode == "max" else min)(values) if values else math.nan
        rows.append({**{k: r.config.get(k) for k in spec.space}, "trial": trial,
                     f"last {spec.metric}": values[-1] if values else math.nan, f"best {spec.metric}": best,
                     "rounds": rounds, "stopped_early": bool(values) and not done and r.error is None,
                     "run_dir": str(run_dir), "error": str(r.error).strip().splitlines()[-1] if r.error else ""})
    return rows


def _write(rows: list[dict[str, Any]], spec: TuneSpec, base: Scenario, out_dir: Path) -> dict[str, Any]:
    """``tune.csv`` (best first) and ``best.yaml``; the best row."""
    import csv

    key = f"best {spec.metric}"
    ok = [r for r in rows if not r["error"] and r[key] == r[key]]
    if not ok:
        raise FedsimError(f"every trial of the search failed ({len(rows)}), e.g. {rows[0]['error'] if rows else '-'}; "
                          f"their run directories are in {out_dir / 'trials'}")
    ranked = sorted(ok, key=lambda r: r[key], reverse=spec.mode == "max") + [r for r in rows if r not in ok]
    with open(out_dir / "tune.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(ranked[0]))
        writer.writeheader()
        writer.writerows(ranked)
    best = ranked[0]
    chosen = {k: best[k] for k in spec.space}
    (out_dir / "best.yaml").write_text(f"# the best trial of {out_dir / 'tune.csv'}: {spec.metric} {best[key]:.4f}\n"
                                       + dump_scenario(scenario_from_dict(base.to_dict(), overrides_of(chosen))),
                                       encoding="utf-8")
    return best
