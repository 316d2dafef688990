"""The failure policy: a run stops, with the most common reason, after ``resources.max_failed_rounds`` consecutive
rounds in which every sampled client that was trained failed (simulated absences — unavailable, dropped out, late —
do not count)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.errors import BackendError
from fedsim.federation.callbacks import ClosingCallback
from fedsim.federation.rounds import DROPPED
from fedsim.types import ClientFailure


class FailurePolicy(ClosingCallback):
    """Counts consecutive all-failed rounds, from each round's row (a callback closing every round, before the
    checkpoint: a run it ends keeps the checkpoint of the round before).

    Args:
        max_failed_rounds: how many in a row end the run (0: never).
        metrics_path: where the metrics so far are (named in the error).
    """

    def __init__(self, max_failed_rounds: int, metrics_path: Path):
        self.max_failed_rounds, self.metrics_path = max_failed_rounds, metrics_path
        self.all_failed = 0

    def on_round_end(self, server_round: int, row: dict[str, Any], stopping: bool = False) -> None:
        """A round's row: the clients trained (sampled, less those that dropped out), aggregated, late, and why each
        failed (``clients/failures``: ``"<client>: <reason>"``)."""
        if server_round < 1:
            return
        failed = [ClientFailure(int(cid), reason) for cid, reason in
                  (f.split(": ", 1) for f in row.get("clients/failures", []))]
        self.observe(server_round, row["clients/sampled"] - row.get("clients/dropped", 0), row["clients/succeeded"],
                     row.get("clients/late", 0), [f for f in failed if f.reason != DROPPED])

    def observe(self, server_round: int, attempted: int, succeeded: int, late: int,
                failed: Sequence[ClientFailure]) -> None:
        """Record a round: ``attempted`` clients trained, ``succeeded`` of them aggregated, ``late`` dropped by the
        deadline, ``failed`` (the simulated dropouts left out).

        Raises:
            BackendError: the limit is reached, naming the most common reason and an example client.
        """
        self.all_failed = self.all_failed + 1 if attempted and not succeeded and not late else 0
        if not self.max_failed_rounds or self.all_failed < self.max_failed_rounds:
            return
        reasons = Counter(f.reason.split(":", 1)[0] for f in failed).most_common(1)
        example = next(f for f in failed if f.reason.startswith(reasons[0][0]))
        raise BackendError(
            f"every sampled client failed in {self.all_failed} consecutive rounds (up to round {server_round}), "
            f"e.g. client {example.client_id}: {example.reason}; the metrics so far are in {self.metrics_path}. "
            "Fix the cause, or raise resources.max_failed_rounds (0 never stops)")
