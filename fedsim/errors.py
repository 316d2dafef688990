"""Typed, actionable errors. Every error names what is wrong and how to fix it; the CLI prints them without a
traceback."""

from __future__ import annotations


class FedsimError(Exception):
    """Base class of every error fedsim raises on purpose."""


class ScenarioError(FedsimError):
    """A scenario file (or an override) is invalid.

    Args:
        field: dotted path of the offending key, e.g. ``clients.lora.alpha``.
        problem: what is wrong.
        fix: what the user should do instead.
    """

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{field}: {problem}" if field else problem
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


class DataError(FedsimError):
    """Data could not be loaded, formatted or partitioned."""


class AggregationError(FedsimError):
    """Client updates cannot be aggregated (shape or key mismatch, no updates...)."""


class BackendError(FedsimError):
    """The runtime (Ray or local) could not run the requested work."""


class ServerLostError(BackendError):
    """The process holding the server (the global model and the strategy's state) died mid-run."""
