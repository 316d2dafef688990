"""The run's lifecycle: prepare, start or resume, the rounds (:mod:`fedsim.federation.rounds`) with evaluation,
logging and checkpoints as callbacks, then the run's artifacts. No Ray imports here: the backend decides where the
server and the workers run, and the driver only ever holds their handles."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from fedsim import checkpoint
from fedsim.client.store import ClientStateStore
from fedsim.components import AggregationPath, Components, aggregation_path, resolve
from fedsim.config import Scenario, dump_scenario
from fedsim.data.report import warnings as data_warnings
from fedsim.env import environment
from fedsim.errors import (
    BackendError,
    FedsimError,
    ScenarioError,
    ServerLostError,
    is_write_failure,
    write_failure,
)
from fedsim.eval.personal import personal_metrics  # noqa: F401  # re-exported (fedsim.driver.personal_metrics)
from fedsim.federation.artifacts import run_summary, write_artifacts
from fedsim.federation.buffered import ASYNC_KEY, Buffered
from fedsim.federation.callbacks import (
    CallbackList,
    CheckpointCallback,
    ProgressCallback,
    RoundCallback,
    StopRun,
    TrackerCallback,
)
from fedsim.federation.evaluation import GENERATIONS, Evaluation, keep_rounds_until
from fedsim.federation.failures import FailurePolicy
from fedsim.federation.prepare import Prepared, partition_table, prepare, split_local_test  # noqa: F401
from fedsim.federation.rounds import Federation, RoundResult, eval_batches, run_round
from fedsim.federation.rows import round_row, totals_from
from fedsim.federation.rundir import (  # noqa: F401  # re-exported: RunLock, write_csv
    RunLock,
    append_text,
    check_no_links,
    client_state_dir,
    describe_missing,
    describe_unreadable,
    dumps,
    missing_rounds,
    new_run_dir,
    rows_until,
    write_csv,
    write_text,
)
from fedsim.memory import estimate, node_memory
from fedsim.progress import Progress, stage
from fedsim.runtime.factory import make_backend
from fedsim.runtime.interfaces import Backend, ServerHandle
from fedsim.tracking import Tracker


class Driver:
    """Runs a scenario end to end and writes the run directory.

    Args:
        scenario: the validated scenario.
        run_dir: where outputs go: a new or empty directory (``runs/<name>`` if None); with ``resume``, the run
            directory to continue.
        backend: a backend instance (default: the one the scenario names).
        resume: continue ``run_dir`` from its last checkpoint (``previous``: from the one before it), letting the
            ``allow_changed`` keys differ from the checkpoint's scenario.
        callbacks: the user's round callbacks (after the built-in log and progress, before the checkpoint).
        components: the run's components (default: resolved from the scenario's names).
    """

    def __init__(self, scenario: Scenario, run_dir: Path | None = None, backend: Backend | None = None,
                 resume: bool = False, previous: bool = False, allow_changed: tuple[str, ...] = (),
                 callbacks: Sequence[RoundCallback] = (), components: Components | None = None):
        self.scenario = scenario
        self.allow_changed = tuple(allow_changed)  # keys a resume may see changed (checkpoint.CHANGEABLE)
        self.run_dir = Path(run_dir) if resume else new_run_dir(scenario, run_dir)
        self.previous = previous  # resume from the checkpoint before the newest one
        self.backend = backend or make_backend(scenario)
        self.resume = resume
        self.callbacks = list(callbacks)
        self.components = components
        self.rows: list[dict[str, Any]] = []
        self.notes: set[str] = set()  # what the run's log has said once (e.g. why clients were not packed)
        self.missing: list[int] = []  # on resume: rounds done whose rows metrics.jsonl no longer holds
        self.unreadable: list[str] = []  # on resume: the lines of metrics.jsonl that could not be read
        self.stopped: dict[str, Any] = {}  # a callback's StopRun: the round it ended after, and why
        self.buffered: Buffered | None = None  # an asynchronous run's schedule (scenario.asynchronous)

    def run(self) -> dict[str, Any]:
        """Run every round; return the summary (also written to ``summary.json``).

        Raises:
            ScenarioError: another run holds the run directory (its pid is named), or the checkpoint is unusable.
            BackendError: the runtime failed, e.g. the server actor died (saying which checkpoint to resume from).
        """
        lock = self.lock = RunLock(self.run_dir)
        try:
            check_no_links(self.run_dir)
            t_start = time.perf_counter()
            self.backend.launch(self.scenario)  # Ray's workers start up while the data is prepared
            if (note := self.backend.launch_note()) is not None:
                stage(self.scenario.logging, note)
            t_start = min(t_start, getattr(self.backend, "launched_at", t_start))  # started early by `fedsim run`
            return self._run(t_start)
        except FedsimError as e:
            if not isinstance(e, ServerLostError):
                raise
            last = checkpoint.last_round(self.run_dir)
            then = (f"the checkpoint of round {last} is intact in {self.run_dir / checkpoint.DIRNAME}: continue with "
                    f"`fedsim run --resume {self.run_dir}`" if last else
                    f"no checkpoint was written yet: run the scenario again (the metrics so far are in "
                    f"{self.run_dir / 'metrics.jsonl'})")
            raise BackendError(f"{e}. {then[0].upper()}{then[1:]} (if it was killed for memory, sample fewer clients "
                               "per round or give the node more memory)") from None
        except Exception as e:
            if not is_write_failure(e):
                raise
            raise FedsimError(self._write_failed(e)) from None
        finally:
            self.backend.shutdown()
            lock.release()

    def _write_failed(self, e: BaseException) -> str:
        """What a refused write (a full disk, say) cost: where the results so far are, and how to go on."""
        last = checkpoint.last_round(self.run_dir)
        then = (f"the checkpoint of round {last} is intact: free space, then `fedsim run --resume {self.run_dir}`"
                if last else "no checkpoint was written yet: free space and run the scenario again")
        return (f"a write to {self.run_dir} failed: {write_failure(e)}; the metrics so far are in "
                f"{self.run_dir / 'metrics.jsonl'} and {then}")

    # -- the lifecycle -------------------------------------------------------------------------------------------
    def _run(self, t_start: float) -> dict[str, Any]:
        sc = self.scenario
        components = self.components or resolve(sc)
        stage(sc.logging, f"preparing the data: reading, tokenizing (cached for the next run) and splitting it over "
              f"{sc.clients.num_clients} clients")
        prep = prepare(sc, components)
        provenance = checkpoint.provenance(sc)
        start_round, restored, used, heatmap_done = self._begin(prep)
        store = self._open_store(components, used)
        progress = Progress(sc.logging.progress if sc.logging.console else "off", sc.rounds)
        tracker = Tracker(sc, self.run_dir, resume=self.resume)
        try:
            stage(sc.logging, self.backend.start_note(sc))
            server = self.backend.start(sc, prep.data, prep.spec, components)
            if heatmap_done is not None:
                heatmap_done()
                tracker.image("partition", self.run_dir / "partition.png")
            path = aggregation_path(sc, components.strategy, components.stages)
            fed = Federation(sc, prep, store, folds=path.folds, feeds=path.feeds)
            events_list = [TrackerCallback(tracker), ProgressCallback(progress), *self.callbacks]
            self.buffered = Buffered(fed, server, self.backend, CallbackList(events_list)) if sc.asynchronous else None
            evaluation = Evaluation(fed, eval_batches(len(prep.data.test), sc.eval.batch_size), components.metrics)
            events = CallbackList(events_list, closing=[  # after the others, every round: the failure policy, then
                FailurePolicy(sc.resources.max_failed_rounds, self.run_dir / "metrics.jsonl"),  # the checkpoint
                CheckpointCallback(lambda r: self._checkpoint(r, server, store, provenance), sc.checkpoint.every,
                                   sc.rounds)])
            self._announce(prep, progress, components, path)
            if self.resume:
                tracker.replay(self.rows)  # what W&B lost (or never got) before the interruption
            if restored is not None:
                self._restore(server, fed, restored)
                progress.message(f"resumed {self.run_dir} after round {start_round}")
            elif sc.eval.at_start:
                stage(sc.logging, "evaluating the initial model (round 0)")
                self._log({"round": 0, "time_s": 0.0, **evaluation.global_model(server, self.backend)}, events)
            totals = totals_from(self.rows)
            for r in range(start_round + 1, sc.rounds + 1):
                if self.stopped:
                    break
                t0 = time.perf_counter()
                result = (self.buffered.step(r) if self.buffered is not None else
                          run_round(r, fed, server, self.backend, events))
                row = self._row(result, totals, progress, t0)
                if evaluation.due(r):
                    t_eval = time.perf_counter()
                    row.update(evaluation(server, self.backend, r))
                    if evaluation.samples:
                        self._generations(evaluation.samples, tracker)
                    row["time/eval_s"] = time.perf_counter() - t_eval
                row["time_s"] = time.perf_counter() - t0
                self._log(row, events)  # the callbacks, closed by the failure policy and the checkpoint
            summary = self._finish(server, prep, evaluation, tracker, totals, t_start, components.task)
            events.on_run_end(summary)
            return summary
        finally:
            progress.close()
            tracker.close()

    def _announce(self, prep: Prepared, progress: Progress, components: Components, path: AggregationPath) -> None:
        """Say, on the console and in the run's notes, what the run should know before round 1: truncated rows, a
        large δ, metrics rows a resume could not read or found missing, the aggregation path ``auto`` chose; and
        the memory the run is estimated to need (a note only when this node has less)."""
        sc = self.scenario
        privacy = sc.privacy.delta_warning(sc.clients.num_clients) if sc.privacy is not None else None
        chose = [path.note] if sc.resources.worker_partials == "auto" else []
        memory = estimate(sc, prep, components, path)
        stage(sc.logging, "memory (estimated peak): " + "; ".join(memory.lines()))
        short = memory.warning(node_memory()) if sc.resources.address is None else None
        for said in [*chose, *([short] if short else []), *data_warnings(prep.data.stats), *([privacy] if privacy else []),
                     *([describe_unreadable(self.unreadable)] if self.unreadable else []),
                     *([describe_missing(self.missing)] if self.missing else [])]:
            self.notes.add(said)
            progress.message(said)

    def _begin(self, prep: Prepared) -> tuple[int, tuple | None, Path | None, Any]:
        """A new run writes its scenario and starts drawing the partition heatmap; a resume reads its checkpoint
        (refusing one computed from another scenario or data) and the metrics rows up to it.

        Returns (the last round done, the checkpointed server state or None, the checkpoint directory read, a
        function that waits for the heatmap or None)."""
        sc = self.scenario
        if self.resume and checkpoint.exists(self.run_dir):
            start_round, state, strategy_state, used = checkpoint.load(self.run_dir, previous=self.previous)
            checkpoint.check_resume(used, sc, self.allow_changed)
            if self.previous:  # the damaged newest must not rotate into the place of the one resumed from
                checkpoint.set_aside_newest(self.run_dir)
            if not 1 <= start_round <= sc.rounds:
                raise ScenarioError("--resume", f"{used / 'meta.json'} says round "
                                    f"{start_round}, but the run has rounds 1..{sc.rounds}: the checkpoint does not "
                                    "belong to this run", "resume the run directory that wrote it, or start anew")
            self.rows, self.unreadable = rows_until(self.run_dir, start_round)
            self.missing = missing_rounds(self.rows, start_round)
            keep_rounds_until(self.run_dir / GENERATIONS, start_round)  # the rounds after it generate again
            self.notes = {n for row in self.rows if isinstance(row.get("notes"), list) for n in row["notes"]
                          if isinstance(n, str)}
            return start_round, (state, strategy_state), used, None
        if self.resume:  # killed before its first checkpoint: nothing to keep but the scenario
            _, self.unreadable = rows_until(self.run_dir, -1)
            return 0, None, None, None
        write_text(self.run_dir / "scenario.yaml", dump_scenario(sc))
        hist, names = partition_table(prep)
        from fedsim.plots import partition_heatmap_in_background

        heatmap_done = partition_heatmap_in_background(  # drawn while the workers start, outside the driver
            hist, names, self.run_dir / "partition.png",
            f"{sc.name}: {sc.partition.method} split over {len(prep.parts)} clients")
        return 0, None, None, heatmap_done

    def _open_store(self, components: Components, used: Path | None) -> ClientStateStore | None:
        """The client state store of a run whose clients keep state (restored from the checkpoint on resume)."""
        if not components.keeps_client_state:
            return None
        sc = self.scenario
        store_dir = client_state_dir(sc, self.run_dir)
        if self.resume:
            checkpoint.restore_client_state(used, store_dir)
        else:  # this run's own directory: nothing in it can belong to anything else
            shutil.rmtree(store_dir, ignore_errors=True)
        return ClientStateStore.open(store_dir, int(sc.clients.state_budget_mb * 2**20))

    def _checkpoint(self, server_round: int, server: ServerHandle, store: ClientStateStore | None,
                    provenance: dict[str, Any]) -> Path:
        """The server's state (and the client state store, flushed) as the checkpoint of ``server_round``."""
        self.lock.check()
        if store is not None:
            store.flush()
        state, extra = server.get_state()
        if self.buffered is not None:  # the asynchronous schedule: the clients in flight, the clock
            extra = {**extra, ASYNC_KEY: self.buffered.state_dict()}
        return checkpoint.save(self.run_dir, server_round, state, extra, provenance=provenance,
                               client_state=store.directory if store is not None else None)

    def _restore(self, server: ServerHandle, fed: Federation, restored: tuple) -> None:
        """The checkpointed state into the server; fresh workers rebuild the merged base."""
        state, extra = restored
        schedule = extra.pop(ASYNC_KEY, None) if isinstance(extra, dict) else None
        server.set_state(state, extra)
        if self.buffered is not None and schedule is not None:
            self.buffered.load_state_dict(schedule)
        deltas = server.base_deltas(since=0)
        if deltas:
            self.backend.sync_base(deltas)
            fed.base_version = deltas[-1][0]

    # -- each round ------------------------------------------------------------------------------------------------
    def _row(self, result: RoundResult, totals: dict[str, float], progress: Progress, t0: float) -> dict[str, Any]:
        """The round's row before evaluation (:func:`~fedsim.federation.rows.round_row`), with the notes the run has
        not said yet (each once per run)."""
        sim_before = next((r["time/sim_total_s"] for r in reversed(self.rows) if "time/sim_total_s" in r), 0.0)
        row = round_row(result, totals, sim_before, t0)
        for note in sorted({res.note for res, _ in result.ok if res.note} - self.notes):
            self.notes.add(note)
            row.setdefault("notes", []).append(note)
            progress.message(f"note: {note}")
        return row

    def _generations(self, samples: list[dict[str, Any]], tracker: Tracker) -> None:
        """A round's kept generations: appended to ``generations.jsonl``, and a W&B table with the round's row."""
        self.lock.check()
        append_text(self.run_dir / GENERATIONS, "".join(dumps(s) + "\n" for s in samples))
        tracker.table("eval/generations", samples)

    def _log(self, row: dict[str, Any], events: CallbackList) -> None:
        """The round's row to the callbacks (the log and W&B first); a callback's :class:`StopRun` ends the run after
        this round (checkpointed, artifacts written, ``stopped`` in the summary)."""
        self.lock.check()  # the run directory is still this run's
        self.rows.append(row)
        try:
            events.on_round_end(int(row["round"]), row)
        except StopRun as e:
            self.stopped = {"round": int(row["round"]), "reason": str(e) or type(e).__name__}

    # -- the end -----------------------------------------------------------------------------------------------------
    def _finish(self, server: ServerHandle, prep: Prepared, evaluation: Evaluation, tracker: Tracker,
                totals: dict[str, float], t_start: float, task: Any) -> dict[str, Any]:
        """The run's artifacts (:mod:`fedsim.federation.artifacts`); returns the summary."""
        adapter = server.global_adapter()
        summary = run_summary(self.scenario, self.run_dir, self.rows, time.perf_counter() - t_start, totals,
                              self.backend.worker_stats())
        self.backend.shutdown()  # their memory is freed before PEFT is imported here to write the adapter
        self.lock.check()
        summary["data"] = prep.data.stats
        summary["environment"] = environment()
        if self.stopped:
            summary["stopped"] = self.stopped
        if self.notes:
            summary["notes"] = sorted(self.notes)
        write_artifacts(self.scenario, self.run_dir, summary, adapter, prep.clients, evaluation.table, tracker,
                        task)
        return summary


def run_scenario(scenario: Scenario, out: str | Path | None = None, backend: Backend | None = None,
                 callbacks: Sequence[RoundCallback] = (), components: Components | None = None) -> dict[str, Any]:
    """Run ``scenario`` and write its run directory (``runs/<name>`` or ``out``). Returns the summary.

    ``callbacks``: :class:`~fedsim.federation.callbacks.RoundCallback` objects called around every round;
    ``components``: the run's components, e.g. with a strategy instance of your own
    (:func:`fedsim.components.resolve`)."""
    return Driver(scenario, out, backend, callbacks=callbacks, components=components).run()


def resume_run(run_dir: str | Path, backend: Backend | None = None, previous: bool = False,
               allow_changed: tuple[str, ...] = (), callbacks: Sequence[RoundCallback] = (),
               components: Components | None = None) -> dict[str, Any]:
    """Continue an interrupted run from its last checkpoint, with the scenario saved in ``run_dir`` (refused when it
    or the data files differ from those the checkpoint was computed from, but for the ``allow_changed`` keys).

    Raises:
        ScenarioError: ``run_dir`` holds no scenario or no checkpoint.
    """
    from fedsim.config import load_scenario

    path = Path(run_dir)
    if not (path / "scenario.yaml").is_file():
        raise ScenarioError("--resume", f"{path} holds no scenario.yaml", "give a run directory written by `fedsim run`")
    finished = finished_summary(path)
    if finished is not None and not previous:  # nothing to continue: its summary (times, worker counters) stays
        import logging

        logging.getLogger(__name__).warning("%s finished already (summary.json); nothing to resume, nothing "
                                            "rewritten", path)
        return finished
    # a scenario.yaml of before paths were resolved holds them relative to where the run was started
    return Driver(load_scenario(path / "scenario.yaml", relative_to=Path.cwd()), path, backend, resume=True,
                  previous=previous, allow_changed=allow_changed, callbacks=callbacks, components=components).run()


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that finished (``summary.json``, written last, readable, with every round done), else
    None."""
    import json

    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        rounds, last = int(summary["rounds"]), checkpoint.last_round(run_dir)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return summary if last is not None and last >= rounds else None


class RunResult(NamedTuple):
    """What :func:`run` returns: the summary (``summary.json``) and the run directory."""

    summary: dict[str, Any]
    run_dir: Path


def run(scenario: Scenario | str | Path | dict[str, Any], overrides: Sequence[str] = (),
        callbacks: Sequence[RoundCallback] = (), out: str | Path | None = None,
        components: Components | None = None) -> RunResult:
    """Run a scenario from Python (a notebook, a script): a :class:`~fedsim.config.Scenario`, a YAML file's path or a
    mapping, with ``overrides`` as ``fedsim run --set`` takes them (``["rounds=5", "strategy.name=ffa"]``).

    ``callbacks``: :class:`~fedsim.federation.callbacks.RoundCallback` objects (``on_round_end(round, row)``,
    ``on_run_end(summary)``, ...); raise :class:`~fedsim.federation.callbacks.StopRun` from ``on_round_end`` to stop
    early. Returns ``(summary, run_dir)``.

    Raises:
        ScenarioError, DataError: bad input, in one line; FedsimError: the run failed (what was kept, and how to go on).
    """
    from fedsim.config import load_scenario, scenario_from_dict

    if isinstance(scenario, Scenario):
        sc = scenario_from_dict(scenario.to_dict(), list(overrides)) if overrides else scenario
    elif isinstance(scenario, dict):
        sc = scenario_from_dict(scenario, list(overrides))
    else:
        sc = load_scenario(str(scenario), list(overrides))
    driver = Driver(sc, out, callbacks=callbacks, components=components)
    return RunResult(driver.run(), driver.run_dir)
