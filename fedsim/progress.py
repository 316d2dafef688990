"""Progress display: a rich live bar on a terminal, plain lines elsewhere (CI, logs, pipes)."""

from __future__ import annotations

import sys
import time
from typing import Any


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
        for key, label in (("train/loss", "train_loss"), ("eval/loss", "eval_loss"), ("eval/accuracy", "acc")):
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
