"""fedsim from Python, as in a notebook: run a scenario with round callbacks, stop early, read the results.

    python examples/early_stopping.py                       # the quickstart, stopping when accuracy stalls
    python examples/early_stopping.py rounds=4 clients.num_clients=8   # any overrides, as `fedsim run --set` takes

The callback prints each round's accuracy and raises ``fedsim.StopRun`` once it has not improved for ``patience``
evaluations: the run ends after that round — logged, checkpointed, its adapter and summary written as usual.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fedsim


class EarlyStopping(fedsim.RoundCallback):
    """Stop when ``eval/accuracy`` has not improved by ``min_delta`` for ``patience`` evaluations."""

    def __init__(self, patience: int = 2, min_delta: float = 0.005):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.stale = float("-inf"), 0

    def on_round_end(self, server_round: int, row: dict) -> None:
        acc = row.get("eval/accuracy")
        if acc is None:  # a round without evaluation
            return
        print(f"round {server_round}: accuracy {acc:.3f}")
        if acc > self.best + self.min_delta:
            self.best, self.stale = acc, 0
        else:
            self.stale += 1
        if self.stale >= self.patience:
            raise fedsim.StopRun(f"accuracy has not improved for {self.patience} evaluations (best {self.best:.3f})")

    def on_run_end(self, summary: dict) -> None:
        print(f"run ended: final accuracy {summary['final/eval/accuracy']:.3f}")


def main(overrides: list[str]) -> None:
    scenario = Path(__file__).resolve().parent.parent / "scenarios" / "quickstart.yaml"
    summary, run_dir = fedsim.run(scenario, overrides=["resources.backend=local", *overrides],
                                  callbacks=[EarlyStopping()])
    if "stopped" in summary:
        print(f"stopped after round {summary['stopped']['round']}: {summary['stopped']['reason']}")
    print(f"results in {run_dir}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except fedsim.FedsimError as e:  # bad input or a failed run: one line, as the fedsim command says it
        sys.exit(f"error: {e}")
