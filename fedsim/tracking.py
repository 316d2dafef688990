"""Logging of round metrics: console, ``metrics.jsonl`` and Weights & Biases (offline by default, files inside the
run directory, imported lazily). The W&B API key is only ever read from the environment by wandb itself."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from fedsim.config import Scenario
from fedsim.env import environment
from fedsim.errors import FedsimError
from fedsim.federation.rundir import finite_json, write_text


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/Inf
    return v


def run_name(scenario: Scenario) -> str:
    """The run's W&B name (``logging.wandb.name`` filled in)."""
    return scenario.logging.wandb.run_name(scenario.name, scenario.seed, scenario.strategy.name, scenario.rounds)


def check_wandb_dirs() -> None:
    """Fail before round 1, not after the last, when W&B could not write where it keeps its data: its data, cache
    and config directories (an unwritable ``HOME`` makes all three unwritable).

    Raises:
        FedsimError: naming the directory and the variable that moves it.
    """
    from wandb import env

    home = Path.home()
    dirs = [("WANDB_DATA_DIR", Path(env.get_data_dir())), ("WANDB_CACHE_DIR", Path(env.get_cache_dir())),
            ("WANDB_CONFIG_DIR", Path(os.environ.get("WANDB_CONFIG_DIR", home / ".config" / "wandb")))]
    for var, path in dirs:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".fedsim-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise FedsimError(f"Weights & Biases would write to {path}, which is not writable ({e.strerror}); set "
                              f"{var} to a writable directory, or logging.wandb.mode=disabled") from None


class Tracker:
    """Writes one JSON object per round to ``metrics.jsonl`` and mirrors it to W&B.

    Args:
        scenario: the resolved scenario (its ``logging`` section decides what is on).
        run_dir: the run directory.
    """

    ID_FILE = ".wandb_run_id"  # the W&B run id, so that a resume continues the same run
    STEP_FILE = ".wandb_last_step"  # the last step sent to W&B: a resume never sends a step twice

    def __init__(self, scenario: Scenario, run_dir: Path, resume: bool = False):
        self.cfg = scenario.logging
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8") if self.cfg.jsonl else None
        self._wandb = None
        self._sent = -1  # the last W&B step logged (by this run or, when resuming, by the one before)
        self._pending: dict[str, Any] = {}  # logged with the next row (e.g. the partition heatmap)
        self._images: list[tuple[str, Path]] = []  # the other trackers': logged with the next row's step
        if self.cfg.wandb.mode != "disabled":
            self._start_wandb(scenario, resume)
        from fedsim.trackers import sinks

        self.sinks: list[Any] = []
        try:
            self.sinks = sinks(scenario, run_dir, resume, run_name(scenario))  # TensorBoard, MLflow
        except BaseException:
            self.close()  # the W&B run started above ends with the error
            raise

    def _each(self, call: Any) -> None:
        """``call(sink)`` for every other tracker; a failure names the tracker (:class:`~fedsim.trackers.SinkFailed`)."""
        from fedsim.trackers import SinkFailed

        for sink in self.sinks:
            try:
                call(sink)
            except Exception as e:  # noqa: BLE001 - each tracker raises its own types
                raise SinkFailed(sink.name, e) from e

    def _start_wandb(self, scenario: Scenario, resume: bool) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        check_wandb_dirs()
        w = self.cfg.wandb
        id_file, step_file = self.run_dir / self.ID_FILE, self.run_dir / self.STEP_FILE
        run_id = id_file.read_text(encoding="utf-8").strip() if resume and id_file.is_file() else None
        self._wandb = self._init_with_retries(wandb, scenario, w, run_id)
        if run_id is not None and w.mode == "offline":
            # what the offline files hold, not what was logged: a kill -9 can lose what wandb had not yet written.
            # Read once the run is ours again: the killed run's W&B service has then written all it ever will.
            from fedsim.wandb_files import durable_step

            self._sent = durable_step(self.run_dir)
        elif run_id is not None and step_file.is_file():
            try:
                self._sent = int(step_file.read_text(encoding="utf-8").strip())
            except ValueError:
                self._sent = -1
        write_text(self.run_dir / self.ID_FILE, self._wandb.id)

    def _init_with_retries(self, wandb: Any, scenario: Scenario, w: Any, run_id: str | None,
                           wait_s: float = 30.0) -> Any:
        """``wandb.init``; on resume after a kill, the killed process's W&B service may still hold the run ("run ID
        ... is in use") for a few seconds until it notices and exits: wait for it (up to ``wait_s``). A service that
        outlives the kill — one shared through ``WANDB_SERVICE``, which the ``fedsim`` command never inherits — holds
        it for good: the error says so.

        Raises:
            FedsimError: W&B could not start (naming why and what to check).
        """
        deadline, pause = time.monotonic() + wait_s, 0.5
        while True:
            try:
                return self._init_wandb(wandb, scenario, w, run_id)
            except Exception as e:  # noqa: BLE001 - wandb raises many types (bad env, network, auth)
                first = str(e).splitlines()[0] if str(e) else ""
                if run_id is not None and "in use" in first:
                    if time.monotonic() < deadline:
                        time.sleep(pause)
                        pause = min(2 * pause, 5.0)
                        continue
                    raise FedsimError(f"Weights & Biases run {run_id} is still held by the W&B service of the run "
                                      "that was stopped (a service shared through WANDB_SERVICE outlives it): unset "
                                      "WANDB_SERVICE, or stop that service (`wandb beta core stop`), then resume") \
                        from None
                raise FedsimError(f"Weights & Biases could not start ({e.__class__.__name__}: {first}); check the "
                                  "WANDB_* environment variables, or set logging.wandb.mode=disabled") from None

    def _init_wandb(self, wandb: Any, scenario: Scenario, w: Any, run_id: str | None) -> Any:
        return wandb.init(
            project=w.project, group=w.group, entity=w.entity, name=run_name(scenario),
            tags=list(dict.fromkeys([scenario.strategy.name, *w.tags])),
            dir=str(self.run_dir), mode=w.mode, config={**scenario.to_dict(), "environment": environment()},
            reinit="finish_previous",
            id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def log(self, row: dict[str, Any]) -> None:
        row = finite_json(row)  # NaN/inf as null, named under not_finite
        if self._file is not None:
            self._file.write(json.dumps(row, allow_nan=False) + "\n")
            self._file.flush()
        self._send(row)

    def replay(self, rows: list[dict[str, Any]]) -> None:
        """On resume: send W&B the rows it does not hold yet (the metrics log has them already)."""
        for row in rows:
            self._send({k: _clean(v) for k, v in row.items()})

    def _send(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "round"}
        if self.sinks:
            numbers = {k: v for k, v in numeric.items() if not isinstance(v, bool) and v == v}  # NaN: nothing to draw
            images, self._images = self._images, []
            self._each(lambda sink: sink.log(step, numbers))
            for key, path in images:
                self._each(lambda sink, key=key, path=path: sink.image(key, path, step))
        if self._wandb is not None and step > self._sent:  # a round re-run after a resume was already sent
            self._wandb.log({**numeric, **self._pending}, step=step)
            self._pending = {}
            self._sent = step
            write_text(self.run_dir / self.STEP_FILE, str(step))

    def image(self, key: str, path: Path) -> None:
        """An image (e.g. the partition heatmap), logged with the next row."""
        if not Path(path).is_file():
            return
        if self.sinks:
            self._images.append((key, Path(path)))
        if self._wandb is not None:
            import wandb

            self._pending = {**self._pending, key: wandb.Image(str(path))}

    def table(self, key: str, rows: list[dict[str, Any]]) -> None:
        """A table (e.g. a round's generations), logged with the next row."""
        if self._wandb is not None and rows:
            import wandb

            columns = list(rows[0])
            self._pending = {**self._pending, key: wandb.Table(
                columns=columns, data=[[_clean(r.get(c)) for c in columns] for r in rows])}

    def tables(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        """Tables (e.g. clients.csv, personalized.csv) in the run's summary."""
        self._each(lambda sink: sink.tables(tables))
        if self._wandb is None:
            return
        import wandb

        for key, rows in tables.items():
            if rows:
                columns = list(rows[0])
                self._wandb.summary[key] = wandb.Table(columns=columns, data=[[_clean(r.get(c)) for c in columns]
                                                                              for r in rows])

    def artifact(self, name: str, kind: str, directory: Path, metadata: dict[str, Any] | None = None) -> None:
        """A directory (e.g. the final adapter) as a W&B artifact of type ``kind`` (and the other trackers')."""
        self._each(lambda sink: sink.artifact(name, kind, directory, metadata or {}))
        if self._wandb is None:
            return
        import wandb

        art = wandb.Artifact(name, type=kind, metadata=metadata or {})
        art.add_dir(str(directory))
        self._wandb.log_artifact(art)

    def summary(self, values: dict[str, Any]) -> None:
        self._each(lambda sink: sink.summary(values))
        if self._wandb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, str)):
                    self._wandb.summary[k] = v

    def close(self) -> None:
        """Close the log and finish the W&B run. Never raises: every row was flushed when it was logged, and a
        failure here (a full disk, W&B's own) must not hide why the run ended; it is logged instead."""
        import logging

        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                logging.getLogger(__name__).warning("closing %s failed: %s", self.path, e)
            self._file = None
        for sink in self.sinks:
            try:
                sink.close(self.run_dir)
            except Exception as e:  # noqa: BLE001 - each tracker raises its own types
                logging.getLogger(__name__).warning("closing the %s run failed: %s", sink.name, e)
        self.sinks = []
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:  # noqa: BLE001 - wandb raises many types
                logging.getLogger(__name__).warning("finishing the W&B run failed: %s", e)
            self._wandb = None
