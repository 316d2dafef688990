"""The backend a scenario asks for."""

from __future__ import annotations

from fedsim.config import Scenario
from fedsim.runtime.interfaces import Backend


def make_backend(scenario: Scenario) -> Backend:
    """The backend the scenario asks for: in-process (``local``) or a Ray worker pool (``ray``)."""
    if scenario.resources.backend == "local":
        from fedsim.runtime.local import LocalBackend

        return LocalBackend()
    from fedsim.runtime.ray.backend import RayBackend

    return RayBackend()
