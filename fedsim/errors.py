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

    def __reduce__(self):  # pickled across processes (multiprocessing, Ray) with its three fields, not its message
        return type(self), (self.field, self.problem, self.fix)


class DataError(FedsimError):
    """Data could not be loaded, formatted or partitioned."""


class AggregationError(FedsimError):
    """Client updates cannot be aggregated (shape or key mismatch, no updates...)."""


class BackendError(FedsimError):
    """The runtime (Ray or local) could not run the requested work."""


class ServerLostError(BackendError):
    """The process holding the server (the global model and the strategy's state) died mid-run."""


_DISK_MARKERS = (("os error 28", "No space left on device"), ("StorageFull", "No space left on device"),
                 ("No space left", "No space left on device"), ("os error 122", "Disk quota exceeded"),
                 ("QuotaExceeded", "Disk quota exceeded"), ("Read-only file system", "Read-only file system"))


def _disk_reason(text: str) -> str | None:
    return next((reason for marker, reason in _DISK_MARKERS if marker in text), None)


def write_failure(e: BaseException) -> str:
    """What a failed write says, in a few words: the OS's reason (``No space left on device``), also when a library
    wraps it in its own exception (safetensors' ``SafetensorError``: ``... StorageFull ... os error 28``)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    return _disk_reason(text) or (text.splitlines()[0] if text else e.__class__.__name__)


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` is a write the disk refused (full, over quota, read-only, an I/O error), however it is raised."""
    import errno

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
    return _disk_reason(str(e)) is not None
