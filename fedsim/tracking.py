"""Logging of round metrics: console, ``metrics.jsonl`` and Weights & Biases (offline by default, files inside the
run directory, imported lazily). The W&B API key is only ever read from the environment by wandb itself."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fedsim.config import Scenario
from fedsim.errors import FedsimError


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/Inf
    return v


class Tracker:
    """Writes one JSON object per round to ``metrics.jsonl`` and mirrors it to W&B.

    Args:
        scenario: the resolved scenario (its ``logging`` section decides what is on).
        run_dir: the run directory.
    """

    def __init__(self, scenario: Scenario, run_dir: Path):
        self.cfg = scenario.logging
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8") if self.cfg.jsonl else None
        self._wandb = None
        if self.cfg.wandb.mode != "disabled":
            self._start_wandb(scenario)

    def _start_wandb(self, scenario: Scenario) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        w = self.cfg.wandb
        try:
            self._wandb = self._init_wandb(wandb, scenario, w)
        except Exception as e:  # wandb raises many types (bad env, network, auth)
            raise FedsimError(f"Weights & Biases could not start ({e.__class__.__name__}: {str(e).splitlines()[0]}); "
                              "check the WANDB_* environment variables, or set logging.wandb.mode=disabled") from None

    def _init_wandb(self, wandb: Any, scenario: Scenario, w: Any) -> Any:
        return wandb.init(
            project=w.project, group=w.group, entity=w.entity, name=scenario.name, tags=list(w.tags),
            dir=str(self.run_dir), mode=w.mode, config=scenario.to_dict(), reinit="finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._wandb is not None:
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "round"}
            self._wandb.log(numeric, step=int(row["round"]))

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, str)):
                    self._wandb.summary[k] = v

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
