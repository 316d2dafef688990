"""Progress display: a rich live bar on a terminal, plain lines elsewhere (CI, logs, pipes)."""

from __future__ import annotations

import sys
import time
from typing import Any


def stage(logging_cfg: Any, text: str, stream: Any = None) -> None:
    """Say what a run is doing before its first round (starting Ray, reading and tokenizing the data, building the
    workers): one line each, ``fedsim: <text>…``, unless ``logging.console`` is off or ``logging.progress`` is ``off``.
    A start-up takes from seconds to minutes (Ray, torch, a large data set, a model loaded by every worker)."""
    if not logging_cfg.console or logging_cfg.progress == "off":
        return
    print(f"fedsim: {text}…", file=stream or sys.stderr, flush=True)


class Progress:
    """Per-round progress: clients done / sampled, and an ETA for the run.

    Args:
        mode: ``auto`` (rich on a terminal, plain otherwise), ``rich``, ``plain`` or ``off``.
        num_rounds: rounds in the run.
    """

    def __init__(self, mode: str, num_rounds: int, stream: Any = None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "rich" if self.stream.isatty() else "plain"
        self.mode = mode
        self.num_rounds = num_rounds
        self._t0 = time.perf_counter()
        self._rich = None
        self._task = None
        self._round = 0
        self._first = 1
        self._sampled = 0
        self._done = 0
        self._failed = 0
        if mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                      console=Console(file=self.stream), transient=False)
            self._rich.start()

    def _eta(self) -> float:
        elapsed = time.perf_counter() - self._t0
        done = self._round - self._first + (self._done / self._sampled if self._sampled else 0.0)
        left = self.num_rounds - self._round + 1 - (self._done / self._sampled if self._sampled else 0.0)
        return elapsed / done * left if done > 0 else float("nan")

    def start_round(self, server_round: int, num_sampled: int) -> None:
        if self._round == 0:
            self._t0 = time.perf_counter()  # the ETA counts from round 1, not from start-up
            self._first = server_round
        self._round, self._sampled, self._done, self._failed = server_round, num_sampled, 0, 0
        if self._rich is not None:
            if self._task is not None:
                self._rich.remove_task(self._task)
            self._task = self._rich.add_task(f"round {server_round}/{self.num_rounds}", total=num_sampled, info="")

    def client_done(self, failed: bool = False) -> None:
        self._done += 1
        self._failed += int(failed)
        if self._rich is not None:
            info = f"failed {self._failed}" if self._failed else ""
            self._rich.update(self._task, advance=1, info=info)

    def end_round(self, row: dict[str, Any]) -> None:
        line = f"round {row['round']}/{self.num_rounds}"
        if "clients/sampled" in row:  # as recorded: rejected updates and stragglers count as failed
            line += f"  clients {row.get('clients/succeeded', self._done - self._failed)}/{row['clients/sampled']}"
        for key, label in (("train/loss", "train_loss"), ("eval/loss", "eval_loss"), ("eval/accuracy", "acc"),
                           *shown_metrics(row)):
            if row.get(key) is not None:
                line += f"  {label} {row[key]:.4f}"
        line += f"  {row.get('time_s', 0.0):.1f}s"
        eta = self._eta()
        if eta == eta and self._round < self.num_rounds:
            line += f"  eta {eta:.0f}s"
        if self._rich is not None:
            self._rich.console.print(line)
        elif self.mode == "plain":
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self._rich is not None:
            self._rich.console.print(text)
        elif self.mode == "plain":
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


def shown_metrics(row: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """(key, label) of the metrics a scenario is about, beside loss and accuracy, in the order shown: each client's
    own model's accuracy (personalized runs: the global model's accuracy can stay at 0), macro-F1 and Matthews'
    correlation, the metrics of generated text (overall, not per task), and the harness's scores of the global
    model. ``prefix``: ``final/`` for a summary."""
    out = []
    for name, label in (("eval/personal/accuracy", "personal_acc"), ("eval/macro_f1", "macro_f1"),
                        ("eval/mcc", "mcc")):
        if row.get(prefix + name) is not None:
            out.append((prefix + name, label))
    for key in row:
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name is None or row.get(key) is None or not isinstance(row[key], (int, float)):
            continue
        if name.startswith("eval/gen/") and name.count("/") == 2:
            out.append((key, name.removeprefix("eval/gen/")))
        elif name.startswith("harness/") and name.count("/") == 2:
            out.append((key, name.removeprefix("harness/")))
    return out


def headline(summary: dict[str, Any]) -> str:
    """The end of a run in one line's worth: the metric the scenario is about, from its first evaluation to its last
    (each client's own model for personalized runs, the first metric of generated text for generating ones, else
    accuracy), then the others it reports."""
    others = shown_metrics(summary, "final/")
    keys = [k for k, _ in others]
    main = ("final/eval/personal/accuracy" if "final/eval/personal/accuracy" in keys else
            next((k for k in keys if k.startswith("final/eval/gen/")), "final/eval/accuracy"))
    label = dict(others).get(main, "accuracy").replace("personal_acc", "personal accuracy")
    final, first = summary.get(main), summary.get(main.replace("final/", "initial/", 1))
    line = ""
    if final is not None:
        line = f"  eval {label} {first:.3f} → {final:.3f}" if first is not None else f"  eval {label} {final:.3f}"
    if main != "final/eval/accuracy" and summary.get("final/eval/accuracy") is not None:
        line += f"  accuracy {summary['final/eval/accuracy']:.3f}"
    line += "".join(f"  {lab} {summary[k]:.3f}" for k, lab in others if k != main)
    return line
