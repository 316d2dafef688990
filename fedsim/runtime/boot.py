"""Imported first by every Ray worker process of a local Ray head that fedsim starts (Ray's
``preload_python_modules``), before the worker deserializes anything.

Ray's serialization context imports pyarrow whenever it is installed (``datasets`` brings it), to register Ray Data's
Arrow serializers: ~36 MB and 0.1 s in every process, for objects fedsim never sends. Marking pyarrow absent here
keeps it out of the workers; :func:`allow_pyarrow` lifts the mark where ``datasets`` is needed after all (a sweep's
driver runs as a Ray task and may tokenize a data set). Torch-free, like everything a worker imports before its
actor's ``__init__``.
"""

from __future__ import annotations

import sys


def hide_pyarrow() -> bool:
    """Mark pyarrow absent unless it is imported already; True if this call marked it."""
    if "pyarrow" in sys.modules:
        return False
    sys.modules["pyarrow"] = None  # type: ignore[assignment]  # import → ModuleNotFoundError
    return True


def allow_pyarrow() -> None:
    """Lift :func:`hide_pyarrow`'s mark (no-op without one)."""
    if "pyarrow" in sys.modules and sys.modules["pyarrow"] is None:
        del sys.modules["pyarrow"]


def _in_ray_worker() -> bool:
    try:
        from ray._private.worker import WORKER_MODE, global_worker

        return global_worker.mode == WORKER_MODE
    except Exception:  # not under Ray, or a Ray without these names: leave the process as it is
        return False


if _in_ray_worker():  # the preload: never in a driver or a user's process that merely imports this module
    hide_pyarrow()
