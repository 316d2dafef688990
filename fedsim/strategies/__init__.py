"""Aggregation strategies, registered by name.

Every module in this package is imported on first use, so adding a strategy means adding one file. Third-party
strategies register through the ``fedsim.strategies`` entry-point group.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from fedsim.errors import ScenarioError
from fedsim.strategies.base import NoParams, Strategy, StrategySpec, register, registry

__all__ = ["NoParams", "Strategy", "StrategySpec", "available_strategies", "get_strategy_class", "make_strategy",
           "register"]

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    for ep in entry_points(group="fedsim.strategies"):
        ep.load()
    _loaded = True


def available_strategies() -> dict[str, type[Strategy]]:
    """Registered strategy classes by name."""
    _load_all()
    return dict(sorted(registry().items()))


def get_strategy_class(name: str) -> type[Strategy]:
    """The class registered under ``name``.

    Raises:
        ScenarioError: no such strategy (the message lists the registered ones).
    """
    strategies = available_strategies()
    key = str(name).lower()
    if key not in strategies:
        raise ScenarioError("strategy.name", f"unknown strategy {name!r}",
                            f"use one of {', '.join(strategies)} (see `fedsim strategies`)")
    return strategies[key]


def make_strategy(name: str, params: dict | None = None) -> Strategy:
    """Instantiate a registered strategy with validated params."""
    return get_strategy_class(name)(params)
