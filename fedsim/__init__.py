"""fedsim: simulate federated LoRA fine-tuning of LLMs on one machine or a Ray cluster.

Public API::

    import fedsim
    summary, run_dir = fedsim.run("scenarios/quickstart.yaml", overrides=["rounds=3"], callbacks=[...])

The names below are imported on first use, so that ``import fedsim`` (and the ``fedsim`` command, which starts Ray
before it imports torch) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "Scenario": "fedsim.config", "load_scenario": "fedsim.config", "scenario_from_dict": "fedsim.config",
    "run_scenario": "fedsim.driver", "resume_run": "fedsim.driver", "RoundCallback": "fedsim.federation.callbacks",
    "run": "fedsim.driver", "RunResult": "fedsim.driver", "StopRun": "fedsim.federation.callbacks",
    "Components": "fedsim.components", "resolve_components": "fedsim.components",
    "AggregationError": "fedsim.errors", "BackendError": "fedsim.errors", "DataError": "fedsim.errors",
    "FedsimError": "fedsim.errors", "ScenarioError": "fedsim.errors",
    "Strategy": "fedsim.strategies", "available_strategies": "fedsim.strategies", "make_strategy": "fedsim.strategies",
    "register": "fedsim.strategies",
    "ClientPayload": "fedsim.types", "ClientSpec": "fedsim.types", "ClientUpdate": "fedsim.types",
    "GlobalState": "fedsim.types", "LoraSpec": "fedsim.types", "RoundContext": "fedsim.types",
}

__all__ = sorted(_WHERE)


_RENAMED = {"resolve_components": "resolve"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # for type checkers and IDEs only (the layering contracts exclude these imports)
    from fedsim.components import Components  # noqa: F401
    from fedsim.components import resolve as resolve_components  # noqa: F401
    from fedsim.config import Scenario, load_scenario, scenario_from_dict  # noqa: F401
    from fedsim.driver import RunResult, resume_run, run, run_scenario  # noqa: F401
    from fedsim.errors import AggregationError, BackendError, DataError, FedsimError, ScenarioError  # noqa: F401
    from fedsim.federation.callbacks import RoundCallback, StopRun  # noqa: F401
    from fedsim.strategies import Strategy, available_strategies, make_strategy, register  # noqa: F401
    from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, LoraSpec, RoundContext  # noqa: F401
