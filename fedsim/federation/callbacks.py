"""Round callbacks: what happens around each round besides the round itself.

The built-ins — the metrics log and W&B (:class:`TrackerCallback`), the progress display (:class:`ProgressCallback`),
and, closing every round after the others, the failure policy (:class:`fedsim.federation.failures.FailurePolicy`)
and checkpoints (:class:`CheckpointCallback`) — use the same interface as a user's callback:
``run_scenario(scenario, callbacks=[MyCallback()])``. Subclass :class:`RoundCallback` and override what you need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class StopRun(Exception):  # noqa: N818 - a signal, not an error
    """Raise it from :meth:`RoundCallback.on_round_end` to end the run after this round (early stopping): the round
    is logged and checkpointed, the run's artifacts are written as after its last round, and the summary says
    ``stopped: {round, reason}`` (the message is the reason). Callbacks after the one that raised are not called for
    that round."""


class RoundCallback:
    """Hooks of a run, called in the driver process. Every method is optional (the defaults do nothing)."""

    def on_round_start(self, server_round: int, num_clients: int) -> None:
        """A round begins: ``num_clients`` clients are about to train."""

    def on_client_done(self, failed: bool) -> None:
        """One client of the round finished (or failed)."""

    def on_round_end(self, server_round: int, row: dict[str, Any]) -> None:
        """A round ended (round 0: the evaluation before training); ``row`` is its line of ``metrics.jsonl``
        (read it, do not change it)."""

    def on_run_end(self, summary: dict[str, Any]) -> None:
        """The run ended; ``summary`` is what ``summary.json`` holds."""


class ClosingCallback(RoundCallback):
    """A callback that closes every round after the others (the failure policy, checkpoints): it is called even when
    one of them ended the run (:class:`StopRun`), and told so."""

    def on_round_end(self, server_round: int, row: dict[str, Any], stopping: bool = False) -> None:
        """The round ended; ``stopping``: a callback before this one ended the run after this round."""


class CallbackList(RoundCallback):
    """Several callbacks, called in order; then the ``closing`` ones (:class:`ClosingCallback`), whatever the others
    did — a :class:`StopRun` from one of them reaches the caller after the closing callbacks ran."""

    def __init__(self, callbacks: Sequence[RoundCallback] = (), closing: Sequence[ClosingCallback] = ()):
        self.callbacks = list(callbacks)
        self.closing = list(closing)

    def on_round_start(self, server_round: int, num_clients: int) -> None:
        for cb in self.callbacks:
            cb.on_round_start(server_round, num_clients)

    def on_client_done(self, failed: bool) -> None:
        for cb in self.callbacks:
            cb.on_client_done(failed)

    def on_round_end(self, server_round: int, row: dict[str, Any]) -> None:
        stop = None
        for cb in self.callbacks:
            try:
                cb.on_round_end(server_round, row)
            except StopRun as e:  # the callbacks after it are not called for this round; the closing ones are
                stop = e
                break
        for closing in self.closing:
            closing.on_round_end(server_round, row, stopping=stop is not None)
        if stop is not None:
            raise stop

    def on_run_end(self, summary: dict[str, Any]) -> None:
        for cb in (*self.callbacks, *self.closing):
            cb.on_run_end(summary)


class TrackerCallback(RoundCallback):
    """Each round's row to ``metrics.jsonl`` and Weights & Biases (:class:`fedsim.tracking.Tracker`)."""

    def __init__(self, tracker: Any):
        self.tracker = tracker

    def on_round_end(self, server_round: int, row: dict[str, Any]) -> None:
        self.tracker.log(row)


class ProgressCallback(RoundCallback):
    """The console's progress: clients done per round, a line per round (:class:`fedsim.progress.Progress`)."""

    def __init__(self, progress: Any):
        self.progress = progress

    def on_round_start(self, server_round: int, num_clients: int) -> None:
        self.progress.start_round(server_round, num_clients)

    def on_client_done(self, failed: bool) -> None:
        self.progress.client_done(failed)

    def on_round_end(self, server_round: int, row: dict[str, Any]) -> None:
        self.progress.end_round(row)


class CheckpointCallback(ClosingCallback):
    """The server's state (and the client state store) to ``RUN_DIR/checkpoint`` after every ``checkpoint.every``
    rounds and after the last one (:mod:`fedsim.checkpoint`).

    Args:
        save: writes one checkpoint for a round (the driver binds the run directory, the server and the store).
        every: rounds between checkpoints.
        num_rounds: the run's last round (always checkpointed).
    """

    def __init__(self, save: Callable[[int], Path], every: int, num_rounds: int):
        self.save, self.every, self.num_rounds = save, every, num_rounds

    def on_round_end(self, server_round: int, row: dict[str, Any], stopping: bool = False) -> None:
        """Save after every ``every`` rounds, the last round, and the round a callback ended the run after."""
        if server_round >= 1 and (server_round % self.every == 0 or server_round == self.num_rounds or stopping):
            self.save(server_round)
