"""A callback that cuts a run at a round's end, before that round's checkpoint (the checkpoint callback runs last):
the resume tests' interruption."""

from __future__ import annotations

from fedsim.federation.callbacks import RoundCallback


class StopAt(RoundCallback):
    """Raises ``RuntimeError(message)`` at the end of round ``server_round``."""

    def __init__(self, server_round: int, message: str = "stopped"):
        self.server_round, self.message = server_round, message

    def on_round_end(self, server_round, row):
        if server_round == self.server_round:
            raise RuntimeError(self.message)
