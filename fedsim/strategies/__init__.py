"""Aggregation strategies, registered by name in :mod:`fedsim.registry`.

Every module in this package registers its strategy when imported (the registry imports them all on the first
lookup), so adding a strategy means adding one file. Third-party strategies register through the ``fedsim.strategies``
entry-point group, or by being defined with :func:`register` in the user's own code.
"""

from __future__ import annotations

from pydantic import BaseModel

from fedsim import registry as _registry
from fedsim.strategies.base import NoParams, Strategy, StrategySpec, register, registry

__all__ = ["NoParams", "Strategy", "StrategySpec", "available_strategies", "get_strategy_class", "make_strategy",
           "register", "registry"]


def available_strategies() -> dict[str, type[Strategy]]:
    """Registered strategy classes by name."""
    return _registry.entries("strategy")


def get_strategy_class(name: str) -> type[Strategy]:
    """The class registered under ``name``.

    Raises:
        ScenarioError: no such strategy (the message lists the registered ones).
    """
    return _registry.get("strategy", name)


def make_strategy(name: str, params: BaseModel | dict | None = None) -> Strategy:
    """Instantiate a registered strategy with validated params."""
    return get_strategy_class(name)(params)
