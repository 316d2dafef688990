"""Command line: ``fedsim run | validate | partition | sweep | plot | submit | export | strategies``.

Errors that come from bad input (:class:`~fedsim.errors.FedsimError`) are printed as one line, without a traceback,
and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from fedsim.env import version_line
from fedsim.errors import FedsimError


def _add_scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set rounds=3 --set clients.lora.rank=4 (repeatable)")
    p.add_argument("--verbose", action="store_true", help="show libraries' progress bars and warnings")


class _Version(argparse.Action):
    """``--version``: one line, unwrapped (argparse's own version action wraps it at the terminal's width)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(version_line())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description="Simulate federated LoRA fine-tuning of LLMs.")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="fedsim's version and what it runs on (Python, torch, transformers, peft, ray)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario and write a run directory")
    run.add_argument("scenario", nargs="?", help="scenario YAML file (omit with --resume)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario key, e.g. --set rounds=3 --set clients.lora.rank=4 (repeatable)")
    run.add_argument("--out", help="run directory (default: runs/<name>, suffixed if it exists)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    run.add_argument("--previous-checkpoint", action="store_true",
                     help="with --resume: continue from the checkpoint before the newest (when the newest is damaged)")
    run.add_argument("--verbose", action="store_true", help="show libraries' progress bars and warnings")
    run.add_argument("--allow-changed", nargs="+", default=[], metavar="KEY",
                     help="with --resume: keys of RUN_DIR/scenario.yaml that may differ from the checkpoint's "
                          "(only logging, checkpoint, resources, name, eval.batch_size: they cannot change results)")
    val = sub.add_parser("validate", help="check a scenario (schema, data, partition) without training")
    _add_scenario_args(val)
    part = sub.add_parser("partition", help="print the per-client split and write a PNG heatmap")
    _add_scenario_args(part)
    part.add_argument("--png", help="where to write the heatmap (default: <name>_partition.png)")
    sweep = sub.add_parser("sweep", help="run a scenario over a grid of values; write sweep.csv and sweep.png")
    _add_scenario_args(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a swept key and its values, e.g. --grid clients.num_clients=10,100,1000 (repeatable)")
    sweep.add_argument("--out", help="sweep directory (default: runs/<name>-sweep)")
    sweep.add_argument("--parallel", type=int, default=1, metavar="N",
                       help="run N points at once (Ray tasks on the cluster with the ray backend, else processes)")
    sweep.add_argument("--seeds", type=int, default=1, metavar="N",
                       help="run every point with N seeds (the scenario's and the next ones); sweep.csv gives mean "
                            "and std")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the sweep in --out (default runs/<name>-sweep): finished points are kept, "
                            "interrupted ones resumed, the rest run")
    _add_tune(sub)
    sub_job = sub.add_parser("submit", help="run a scenario as a Ray job on a cluster (the working directory travels)")
    _add_scenario_args(sub_job)
    sub_job.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    sub_job.add_argument("--out", help="the run directory, on storage the cluster can write (default: "
                                       "./runs/<name>, made absolute)")
    sub_job.add_argument("--python", default=None,
                         help="the cluster's Python interpreter, with fedsim's dependencies (default: this one for a "
                              "cluster on this machine, else python on the head's PATH; checked first in the job)")
    sub_job.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    plot = sub.add_parser("plot", help="draw runs (curves per round, overlaid) or a sweep into a PNG")
    plot.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, or one sweep directory")
    plot.add_argument("--out", help="the PNG (default: RUN_DIR/curves.png for one run, compare.png for several, "
                                    "SWEEP_DIR/sweep.png)")
    exp = sub.add_parser("export", help="write a client's (or the global) model at the end of a run, for PEFT")
    exp.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by fedsim run")
    exp.add_argument("--client", type=int, metavar="K", help="the client whose model to write (default: the global one)")
    exp.add_argument("--out", help="a new directory (default: RUN_DIR/export/client-K, or RUN_DIR/export/global)")
    exp.add_argument("--merged", action="store_true", help="a full model with the adapter merged in (save_pretrained)")
    exp.add_argument("--previous-checkpoint", action="store_true",
                     help="export from the checkpoint before the newest (when the newest is damaged)")
    exp.add_argument("--verbose", action="store_true", help="show libraries' progress bars and warnings")
    sub.add_parser("strategies", help="list the registered aggregation strategies")
    sub.add_parser("schema", help="print the scenario's JSON Schema (for an editor's completion and checking)")
    return parser


def _add_tune(sub: Any) -> None:
    tune = sub.add_parser("tune", help="a Ray Tune search over scenario keys (random/Optuna/HyperOpt, ASHA); write "
                                       "tune.csv and best.yaml")
    _add_scenario_args(tune)
    tune.add_argument("--space", required=True, help="the search: a YAML file with space:, metric:, mode:, samples:, "
                                                     "search:, asha:, concurrent: (docs/tuning.md)")
    tune.add_argument("--out", help="search directory (default: runs/<name>-tune)")
    tune.add_argument("--resume", action="store_true", help="continue the search in --out: finished trials are kept, "
                                                            "interrupted ones resume from their checkpoints")


def _cmd_tune(args: argparse.Namespace) -> int:
    from fedsim.tune import run_tune

    best = run_tune(args.scenario, args.space, args.overrides, args.out, resume=args.resume)
    where = Path(best["run_dir"]).parent.parent
    shown = ", ".join(f"{k}={v}" for k, v in best.items() if k not in ("trial", "run_dir", "error", "rounds",
                                                                        "stopped_early"))
    print(f"done: best trial {best['trial']}: {shown}; table in {where / 'tune.csv'}, its scenario in "
          f"{where / 'best.yaml'}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        from fedsim.driver import resume_run

        if args.scenario or args.overrides or args.out:
            raise FedsimError("--resume continues a run with its own saved scenario; "
                              "give only the run directory (no scenario file, --set or --out)")
        summary = resume_run(args.resume, previous=args.previous_checkpoint, allow_changed=tuple(args.allow_changed))
    elif args.previous_checkpoint or args.allow_changed:
        raise FedsimError("--previous-checkpoint and --allow-changed go with --resume RUN_DIR")
    elif not args.scenario:
        raise FedsimError("fedsim run needs a scenario file (or --resume RUN_DIR)")
    else:
        summary = _run_new(args.scenario, args.overrides, args.out)
    from fedsim.progress import headline

    print(f"done: {summary['run_dir']}  ({summary['time_s']:.1f}s){headline(summary)}")
    return 0


def _run_new(path: str, overrides: list[str], out: str | None) -> dict[str, Any]:
    """Validate, start the Ray pool before torch is imported here (the workers import theirs meanwhile), then run.

    Everything but the strategy checks is validated without torch; on the Ray backend the worker actors are created
    then, and the run's backend adopts them once the scenario has passed the strategy checks too (else they are shut
    down and the error reported as ever).
    """
    from fedsim.boot import import_transformers_lean, skip_unused_backends
    from fedsim.config import load_scenario

    early = load_scenario(path, overrides, check_strategy=False)
    skip_unused_backends(early.clients.quant.backends())  # this process is ours: keep unused imports out
    if early.resources.backend != "ray":
        import_transformers_lean()
        from fedsim.driver import run_scenario

        return run_scenario(load_scenario(path, overrides), out)
    from fedsim.progress import stage
    from fedsim.runtime.ray.pool import discard_early, launch_early

    stage(early.logging, "starting Ray" if early.resources.address is None else
          f"joining the Ray cluster at {early.resources.address}")
    launch_early(early)
    try:
        stage(early.logging, "loading torch and the strategies")
        import_transformers_lean()
        scenario = load_scenario(path, overrides)  # the strategy checks: torch and every strategy are imported
        from fedsim.driver import run_scenario

        return run_scenario(scenario, out)
    finally:
        discard_early()  # a pool no run adopted


def _cmd_validate(args: argparse.Namespace) -> int:
    from fedsim.components import resolve
    from fedsim.config import load_scenario
    from fedsim.federation.prepare import prepare

    scenario = load_scenario(args.scenario, args.overrides)
    components = resolve(scenario)  # what the components refuse (a model task's limits, worker partials with a stage)
    prep = prepare(scenario, components)
    sizes = [len(p) for p in prep.parts]
    print(f"ok: {args.scenario} — {scenario.strategy.name}, {len(prep.parts)} clients "
          f"({min(sizes)}–{max(sizes)} samples), {len(prep.data.train)} train / {len(prep.data.test)} test samples, "
          f"{scenario.rounds} rounds on the {scenario.resources.backend} backend")
    from fedsim.data.report import length_line, warnings

    print(f"  {length_line(prep.data.stats)}")
    if (reads := _reads_line(scenario)) is not None:
        print(f"  {reads}")
    print(f"  {version_line()}")
    if scenario.privacy is not None:
        from fedsim.components import privacy_line

        print(f"  {privacy_line(scenario, components.strategy)}")
        if (w := scenario.privacy.delta_warning(scenario.clients.num_clients)) is not None:
            print(f"  warning: {w}")
    if (a := scenario.asynchronous) is not None:
        weight = {"constant": "1", "polynomial": f"(1 + s)^-{a.exponent:g}",
                  "hinge": f"1 to s = {a.hinge_after}, then 1/({a.hinge_slope:g}(s - {a.hinge_after}) + 1)"}[a.staleness]
        print(f"  asynchronous: {a.concurrency} clients in flight, a server step every {a.buffer} arrivals "
              f"(η = {a.server_lr:g}, an update s versions stale weighs {weight}); rounds count server steps")
    if scenario.compression is not None:
        from fedsim.components import compression_line

        print(f"  {compression_line(scenario, components.strategy, prep.spec.shapes, prep.spec.lora.rank)}")
    for w in warnings(prep.data.stats):
        print(f"  warning: {w}")
    from fedsim.components import aggregation_path
    from fedsim.memory import estimate, node_memory

    path = aggregation_path(scenario, components.strategy, components.stages)
    print(f"  {path.note}")
    memory = estimate(scenario, prep, components, path)
    print("  memory (estimated peak): " + "; ".join(memory.lines()))
    if scenario.resources.address is None and (w := memory.warning(node_memory())) is not None:
        print(f"  warning: {w}")
    return 0


def _reads_line(scenario: Any) -> str | None:
    """The local files and directories the scenario reads, as resolved (relative paths in a scenario file resolve
    against its directory): the first three data files, then how many more."""
    from fedsim.data.sources import data_files

    files = data_files(scenario.data)
    shown = files[:3] + ([f"and {len(files) - 3} more"] if len(files) > 3 else [])
    local = [f"{what} {p}" for what, p in (("model", scenario.model.name), ("tokenizer", scenario.model.tokenizer))
             if p is not None and os.path.isabs(p)]
    return "reads " + "; ".join(([f"data {', '.join(shown)}"] if shown else []) + local) if shown or local else None


def _cmd_partition(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedsim.config import load_scenario
    from fedsim.federation.prepare import partition_table, prepare
    from fedsim.plots import partition_heatmap

    scenario = load_scenario(args.scenario, args.overrides)
    prep = prepare(scenario)
    hist, names = partition_table(prep)
    table = Table(title=f"{scenario.name}: {scenario.partition.method} split, {len(prep.parts)} clients")
    table.add_column("client", justify="right")
    table.add_column("samples", justify="right")
    show = names[:12]
    for n in show:
        table.add_column(n, justify="right")
    for c, row in enumerate(hist):
        table.add_row(str(c), str(int(row.sum())), *[str(int(v)) for v in row[: len(show)]])
    Console(width=200).print(table)
    png = _png_path(args.png, Path(f"{scenario.name}_partition.png"), "--png")
    try:
        partition_heatmap(hist, names, png, f"{scenario.name}: {scenario.partition.method} split")
    except OSError as e:
        raise FedsimError(f"--png: cannot write {png}: {e.strerror or e} (fix: give a writable path)") from None
    print(f"heatmap written to {png}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.sweep import run_sweep

    if args.seeds < 1:
        raise FedsimError("--seeds must be at least 1")
    rows = run_sweep(args.scenario, args.grid, args.overrides, args.out, args.parallel, seeds=args.seeds,
                     resume=args.resume)
    print(f"done: {len(rows)} runs; table in {Path(rows[0]['run_dir']).parent / 'sweep.csv'}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from fedsim.runtime.ray.submit import submit

    return submit(args.scenario, args.address, args.overrides, args.out, python=args.python, wait=not args.no_wait)


def _cmd_plot(args: argparse.Namespace) -> int:
    from fedsim.plots import draw_runs, read_rows
    from fedsim.sweep import plot_sweep

    dirs = [Path(d) for d in args.dirs]
    kinds = []
    for d in dirs:
        if (d / "metrics.jsonl").is_file():
            kinds.append("run")
        elif (d / "sweep_runs.csv").is_file() or (d / "sweep.csv").is_file():
            kinds.append("sweep")
        else:
            raise FedsimError(f"{d} is neither a run directory (no metrics.jsonl) nor a sweep directory (no "
                              "sweep.csv): give what fedsim run or fedsim sweep wrote")
    if "sweep" in kinds and len(dirs) > 1:
        raise FedsimError("give one sweep directory at a time (or run directories to overlay)")
    default = dirs[0] / ("sweep.png" if "sweep" in kinds else "curves.png") if len(dirs) == 1 else Path("compare.png")
    out = _png_path(args.out, default, "--out")
    try:
        if "sweep" in kinds:
            out = plot_sweep(dirs[0], out)
        else:
            names = [d.resolve().name for d in dirs]
            labels = names if len(set(names)) == len(names) else [str(d) for d in dirs]
            draw_runs([(label, read_rows(d)) for label, d in zip(labels, dirs)], out,
                      title=" vs ".join(labels) if len(labels) <= 4 else f"{len(labels)} runs")
    except OSError as e:
        raise FedsimError(f"--out: cannot write {out}: {e.strerror or e} (fix: give a writable path)") from None
    print(f"wrote {out}")
    return 0


def _png_path(given: str | None, default: Path, flag: str) -> Path:
    """Where a figure goes: ``given`` (a folder: inside it, under the default's name), else ``default``.

    Raises:
        FedsimError: a path that does not end in .png (matplotlib would write another format, or fail).
    """
    png = Path(given) if given else default
    if png.is_dir():
        png = png / default.name
    if png.suffix.lower() != ".png":
        raise FedsimError(f"{flag}: {png} does not end in .png (fix: give a .png file or a folder)")
    return png


def _cmd_export(args: argparse.Namespace) -> int:
    from fedsim.export import export_client

    who = f"client-{args.client}" if args.client is not None else "global"
    out = Path(args.out) if args.out else Path(args.run_dir) / "export" / (who + ("-merged" if args.merged else ""))
    info = export_client(Path(args.run_dir), args.client, out, merged=args.merged, previous=args.previous_checkpoint)
    kind = "full model" if args.merged else "PEFT adapter"
    base = f" on a {info['base_backend']} base" if info["base_bits"] < 16 and not args.merged else ""
    print(f"{kind} of {who.replace('-', ' ')} (round {info['round']}){base} written to {out}")
    if "note" in info:
        print(f"note: {info['note']}")
    return 0


def _cmd_strategies(args: argparse.Namespace) -> int:
    from fedsim.strategies import available_strategies

    for name, cls in available_strategies().items():
        print(f"{name:<12} {cls.summary}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    import json

    from fedsim.config.reference import json_schema

    try:
        print(json.dumps(json_schema(), indent=1, ensure_ascii=False), flush=True)
    except BrokenPipeError:  # `fedsim schema | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler, `kill`): the same orderly stop as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedsim`` console script."""
    import signal
    import threading

    args = _parser().parse_args(argv)
    # A W&B service inherited from the parent process (wandb exports WANDB_SERVICE to its children) would hold this
    # command's W&B run: killed with `kill -9`, the run would stay open there, and its resume be refused ("run ID ...
    # is in use"). The command starts a service of its own, which ends with it.
    os.environ.pop("WANDB_SERVICE", None)
    if getattr(args, "verbose", False):
        os.environ["FEDSIM_VERBOSE"] = "1"
    from fedsim.quiet import silence_libraries

    silence_libraries(mark=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    handler = {"run": _cmd_run, "validate": _cmd_validate, "partition": _cmd_partition, "sweep": _cmd_sweep,
               "export": _cmd_export, "strategies": _cmd_strategies, "plot": _cmd_plot,
               "submit": _cmd_submit, "tune": _cmd_tune, "schema": _cmd_schema}[args.command]
    try:
        return handler(args)
    except FedsimError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``fedsim`` console script: :func:`main`, then a quick exit.

    Once the command is done, its non-daemon threads are joined and the exit handlers run (Ray's, W&B's,
    logging's flush), as at a normal exit; then the process ends without the interpreter's own teardown — tearing
    down torch, transformers and Ray's ~1,800 modules takes ~0.7 s on two cores and changes nothing on disk.
    """
    import atexit
    import threading

    rc = main()
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to say
            pass
    os._exit(rc)


if __name__ == "__main__":
    entry()
