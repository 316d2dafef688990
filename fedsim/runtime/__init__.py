"""Backends that run client jobs: in-process (local.py) or on a pool of Ray actors (ray_backend.py); ray_pool.py
starts Ray and the worker actors without importing torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Backend", "make_backend"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedsim.runtime import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'fedsim.runtime' has no attribute {name!r}")


if TYPE_CHECKING:
    from fedsim.runtime.backend import Backend, make_backend
