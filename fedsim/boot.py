"""Keeping libraries a process does not use out of it. Imported first by every Ray worker process of a local Ray
head that fedsim starts (Ray's ``preload_python_modules``), before the worker deserializes anything.

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
    """Whether this process is a Ray worker (read off Ray's own module if it is loaded: this module never imports Ray,
    which stays in :mod:`fedsim.runtime`)."""
    worker = sys.modules.get("ray._private.worker")
    try:
        return worker is not None and worker.global_worker.mode == worker.WORKER_MODE
    except Exception:  # a Ray without these names: leave the process as it is
        return False


BACKEND_MODULES = {"hqq": "hqq", "bnb": "bitsandbytes"}


def skip_unused_backends(backends_used: set[str]) -> list[str]:
    """Keep the quantization libraries a run does not use out of this process, and return the ones kept out.

    transformers and PEFT import HQQ and bitsandbytes whenever they are installed (HQQ's import alone compiles a
    torch function: 2.6 s and ~45 MB with bitsandbytes, in every process that trains). Marking them absent in
    ``sys.modules`` before transformers / PEFT are imported makes both see them as not installed. Only for processes
    fedsim owns (Ray workers, the ``fedsim`` command): in a user's own session it would hide a library they may
    import later. Does nothing once transformers or PEFT is imported (they would have cached the libraries as
    available).
    """
    if "transformers" in sys.modules or "peft" in sys.modules:
        return []
    skipped = []
    for backend, module in BACKEND_MODULES.items():
        if backend not in backends_used and module not in sys.modules:
            sys.modules[module] = None  # type: ignore[assignment]  # import → ImportError; find_spec → None
            skipped.append(module)
    return skipped


if _in_ray_worker():  # the preload: never in a driver or a user's process that merely imports this module
    hide_pyarrow()


# imported by transformers whenever installed, for what fedsim never runs: the object-detection and segmentation
# losses (scipy.optimize's linear_sum_assignment) and some vision processors — ~34 MB and ~0.35 s in every process
TRANSFORMERS_EXTRAS = ("scipy",)


def import_transformers_lean() -> list[str]:
    """Import transformers with :data:`TRANSFORMERS_EXTRAS` marked absent, then lift the mark, and return the ones
    kept out. transformers decides once, as it is imported, whether those libraries are available; afterwards nothing
    of it imports them, while the process's own code (a user's metric using ``scipy.stats``) still can. Only for
    processes fedsim owns, like :func:`skip_unused_backends`; a no-op once transformers is imported."""
    if "transformers" in sys.modules:
        return []
    hidden = [m for m in TRANSFORMERS_EXTRAS if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]
    try:
        import transformers  # noqa: F401  # the availability checks run now, with the mark in place
    finally:
        for m in hidden:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]
    return hidden
