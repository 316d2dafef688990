"""Backends that run client jobs: in-process (local.py) or on a pool of Ray actors (ray_backend.py)."""

from fedsim.runtime.backend import Backend, make_backend

__all__ = ["Backend", "make_backend"]
