"""Trackers beside Weights & Biases: TensorBoard (``logging.tensorboard``) and MLflow (``logging.mlflow``).

Each is a :class:`Sink` the run's :class:`~fedsim.tracking.Tracker` fans out to: every round's row (its numbers at the
round's step), the partition heatmap, tables, the adapter, the summary; at the end the curves image and
``summary.json``. Their packages are imported only when the scenario turns them on (extras ``tensorboard`` and
``mlflow``). A resume continues what the interrupted run wrote: TensorBoard's events from the resumed round on are
written again (older ones of those steps purged), and MLflow continues the same run without logging a step twice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fedsim.config import Scenario, dump_scenario
from fedsim.errors import FedsimError
from fedsim.federation.rundir import write_text


class SinkFailed(Exception):  # noqa: N818 - names the tracker that failed
    """A tracker could not record something (``who``: its name)."""

    def __init__(self, who: str, error: BaseException):
        super().__init__(f"{error.__class__.__name__}: {error}".splitlines()[0])
        self.who = who


class Sink:
    """A tracker: every method optional (the defaults record nothing)."""

    name = ""

    def log(self, step: int, numbers: dict[str, float]) -> None:
        """A round's numbers, at its step."""

    def image(self, key: str, path: Path, step: int) -> None:
        """A PNG (the partition heatmap), at ``step``."""

    def tables(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        """Tables of the run (clients, personalized)."""

    def artifact(self, name: str, kind: str, directory: Path, metadata: dict[str, Any]) -> None:
        """A directory (the adapter)."""

    def summary(self, values: dict[str, Any]) -> None:
        """The run's summary numbers."""

    def close(self, run_dir: Path) -> None:
        """The run ended: what it wrote last (``curves.png``, ``summary.json``) is recorded, the tracker closed."""


def flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``a.b.c`` keys (lists as their JSON text)."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
    return out


def _png(path: Path) -> Any:
    """A PNG as an H × W × 3 uint8 array."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class TensorBoardSink(Sink):
    """TensorBoard event files in ``logging.tensorboard.dir`` (default ``RUN_DIR/tensorboard``)."""

    name = "TensorBoard"

    def __init__(self, scenario: Scenario, run_dir: Path, resume: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FedsimError("logging.tensorboard needs the tensorboard package: pip install 'fedsim[tensorboard]'"
                              ) from None
        self.dir = Path(scenario.logging.tensorboard.dir or run_dir / "tensorboard")  # type: ignore[union-attr]
        self._writer_class, self._writer = SummaryWriter, None
        self._resume = resume
        self._scenario = scenario
        self._hparams = {k: v for k, v in flat(scenario.to_dict()).items() if isinstance(v, (int, float, str, bool))}

    def _w(self, step: int) -> Any:
        if self._writer is None:
            # a resume writes its steps again: events of those steps an earlier process wrote are purged
            self._writer = self._writer_class(str(self.dir), purge_step=step if self._resume else None)
            self._writer.add_text("scenario", "    " + dump_scenario(self._scenario).replace("\n", "\n    "), step)
        return self._writer

    def log(self, step: int, numbers: dict[str, float]) -> None:
        w = self._w(step)
        for k, v in numbers.items():
            w.add_scalar(k, v, step)
        w.flush()

    def image(self, key: str, path: Path, step: int) -> None:
        self._w(step).add_image(key, _png(path), step, dataformats="HWC")

    def summary(self, values: dict[str, Any]) -> None:
        metrics = {k: v for k, v in values.items() if k.startswith(("final/", "best/")) and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        step = int(self._scenario.rounds)
        self._w(step).add_hparams(self._hparams, metrics, run_name=".", global_step=step)

    def close(self, run_dir: Path) -> None:
        if self._writer is None:
            return
        curves = run_dir / "curves.png"
        if curves.is_file():
            self._writer.add_image("curves", _png(curves), int(self._scenario.rounds), dataformats="HWC")
        self._writer.close()
        self._writer = None


DEFAULT_STORE = "mlruns"  # under the directory a run is started from: mlflow.db and artifacts/


class MlflowSink(Sink):
    """An MLflow run: the scenario as params, the rows as metrics by step, images, tables and directories as
    artifacts. Its id, store and last step are kept in the run directory, so that ``--resume`` continues it."""

    name = "MLflow"
    ID_FILE, URI_FILE, STEP_FILE = ".mlflow_run_id", ".mlflow_tracking_uri", ".mlflow_last_step"

    def __init__(self, scenario: Scenario, run_dir: Path, resume: bool, run_name: str):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise FedsimError("logging.mlflow needs the mlflow package: pip install 'fedsim[mlflow]'") from None
        for quiet in ("mlflow", "alembic"):  # its store's set-up speaks at INFO
            logging.getLogger(quiet).setLevel(logging.WARNING)
        cfg = scenario.logging.mlflow
        assert cfg is not None
        self.run_dir = run_dir
        uri_file, id_file = run_dir / self.URI_FILE, run_dir / self.ID_FILE
        previous = id_file.read_text(encoding="utf-8").strip() if resume and id_file.is_file() else None
        uri = (uri_file.read_text(encoding="utf-8").strip() if previous and uri_file.is_file() else
               cfg.tracking_uri or self.default_uri())
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = previous or self._new_run(cfg.experiment, uri, run_name, scenario)
            if previous:
                self.client.update_run(previous, status="RUNNING")
        except Exception as e:  # noqa: BLE001 - mlflow raises many types (a bad URI, an unreachable server)
            raise FedsimError(f"MLflow could not start at {uri!r} ({e.__class__.__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); check logging.mlflow.tracking_uri, or "
                              "remove logging.mlflow") from None
        write_text(id_file, self.run_id)
        write_text(uri_file, uri)
        step_file = run_dir / self.STEP_FILE
        self.sent = int(step_file.read_text(encoding="utf-8").strip() or -1) if previous and step_file.is_file() \
            else -1

    @staticmethod
    def default_uri() -> str:
        """``sqlite:///<cwd>/mlruns/mlflow.db`` (MLflow 3's file store is in maintenance: a database is its own)."""
        store = Path.cwd() / DEFAULT_STORE
        store.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store / 'mlflow.db'}"

    def _new_run(self, experiment: str, uri: str, run_name: str, scenario: Scenario) -> str:
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            eid = found.experiment_id
        else:  # a local database keeps its artifacts beside it
            where = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri() \
                if uri.startswith("sqlite:///") else None
            eid = self.client.create_experiment(experiment, artifact_location=where)
        run = self.client.create_run(eid, run_name=run_name, tags={"strategy": scenario.strategy.name,
                                                                   "fedsim.run_dir": str(self.run_dir)})
        params = [Param(k[:250], str(v)[:6000]) for k, v in flat(scenario.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow takes 100 params a batch
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id

    def _metrics(self, step: int, numbers: dict[str, float]) -> None:
        """``numbers`` at ``step``, now (MLflow takes 1000 metrics a batch)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in numbers.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log(self, step: int, numbers: dict[str, float]) -> None:
        if step <= self.sent:  # a round re-run after a resume: MLflow has it
            return
        self._metrics(step, numbers)
        self.sent = step
        write_text(self.run_dir / self.STEP_FILE, str(step))

    def image(self, key: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="images")

    def tables(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        for key, rows in tables.items():
            if rows:
                self.client.log_dict(self.run_id, rows, f"tables/{key}.json")

    def artifact(self, name: str, kind: str, directory: Path, metadata: dict[str, Any]) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path=kind)

    def summary(self, values: dict[str, Any]) -> None:
        self._metrics(max(self.sent, 0), {k: v for k, v in values.items()
                                          if k.startswith(("final/", "best/", "initial/"))
                                          and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v})

    def close(self, run_dir: Path) -> None:
        for name in ("curves.png", "summary.json"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name),
                                         artifact_path="images" if name.endswith(".png") else None)
        done = (run_dir / "summary.json").is_file()
        self.client.set_terminated(self.run_id, status="FINISHED" if done else "KILLED")


def sinks(scenario: Scenario, run_dir: Path, resume: bool, run_name: str) -> list[Sink]:
    """The trackers the scenario turns on, besides W&B."""
    out: list[Sink] = []
    if scenario.logging.tensorboard is not None:
        out.append(TensorBoardSink(scenario, run_dir, resume))
    if scenario.logging.mlflow is not None:
        out.append(MlflowSink(scenario, run_dir, resume, run_name))
    return out

