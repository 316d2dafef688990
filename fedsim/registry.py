"""Named components, found by the names a scenario file uses: strategies, model tasks, row formats, metrics, client
objectives, local training procedures and synthetic tasks.

A component registers under (kind, name) when its module is imported — ``@register("metric", "exact_match")``, or a
kind's own decorator such as :func:`fedsim.strategies.register`. Each kind has a home: the package (or module) whose
import registers the built-ins. On the first lookup of a kind the registry imports its home by name and loads the
kind's entry-point group (third-party plugins), in the same way, so that this module — at the bottom of the layers —
depends on none of the components it names. A component registered in a user's script or notebook is found like any
other; the driver resolves every name once (:mod:`fedsim.components`) and ships the objects to the server and the
workers, so a process that never saw the user's registration never has to look the name up.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from fedsim.errors import ScenarioError


@dataclass(frozen=True)
class Kind:
    """A kind of component: where its built-ins live, which scenario key names one, what to call it in errors."""

    home: str  # the package (each of its modules is imported) or module that registers the built-ins
    field: str  # the scenario key that names a component of this kind
    noun: str
    group: str  # entry-point group of third-party components
    hint: str = ""


KINDS: dict[str, Kind] = {
    "strategy": Kind("fedsim.strategies", "strategy.name", "strategy", "fedsim.strategies",
                     " (see `fedsim strategies`)"),
    "model_task": Kind("fedsim.models.tasks", "model.task", "model task", "fedsim.model_tasks"),
    "row_format": Kind("fedsim.data.formats", "data.format", "data format", "fedsim.row_formats"),
    "metric": Kind("fedsim.eval.catalog", "eval.metrics", "metric", "fedsim.metrics"),
    "objective": Kind("fedsim.objectives", "strategy.params", "client objective", "fedsim.objectives"),
    "procedure": Kind("fedsim.client.procedures", "strategy", "local training procedure", "fedsim.procedures"),
    "synthetic_task": Kind("fedsim.data.synthetic", "data.synthetic.tasks", "synthetic task",
                           "fedsim.synthetic_tasks"),
}

_ENTRIES: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_LOADED: set[str] = set()


def _kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise KeyError(f"unknown component kind {kind!r}; kinds: {sorted(KINDS)}")
    return KINDS[kind]


def _same(a: Any, b: Any) -> bool:
    """The same component defined again (a module reloaded, a notebook cell run twice)."""
    where = (getattr(a, "__module__", None), getattr(a, "__qualname__", None))
    return where[1] is not None and where == (getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def register(kind: str, name: str, obj: Any = None) -> Any:
    """Register ``obj`` as the ``kind`` component ``name`` (lower-cased); without ``obj``, a decorator.

    Raises:
        ValueError: another component already holds the name.
    """
    _kind(kind)
    key = str(name).lower()

    def put(o: Any) -> Any:
        held = _ENTRIES[kind].get(key)
        if held is not None and held is not o and not _same(held, o):
            raise ValueError(f"{KINDS[kind].noun} {key!r} is registered twice "
                             f"({getattr(held, '__module__', held)}, {getattr(o, '__module__', o)})")
        _ENTRIES[kind][key] = o
        return o

    return put if obj is None else put(obj)


def _load(kind: str) -> None:
    """Import the kind's home (every module of it, for a package) and its entry points, once."""
    if kind in _LOADED:
        return
    _LOADED.add(kind)
    spec = _kind(kind)
    home = importlib.import_module(spec.home)
    for info in pkgutil.iter_modules(getattr(home, "__path__", [])):
        if not info.name.startswith("_"):
            importlib.import_module(f"{spec.home}.{info.name}")
    for ep in entry_points(group=spec.group):
        ep.load()


def entries(kind: str) -> dict[str, Any]:
    """Every registered ``kind`` component by name, sorted."""
    _load(kind)
    return dict(sorted(_ENTRIES[kind].items()))


def names(kind: str) -> list[str]:
    return list(entries(kind))


def get(kind: str, name: str) -> Any:
    """The ``kind`` component registered as ``name``.

    Raises:
        ScenarioError: none is (naming the scenario key and the registered names).
    """
    spec = _kind(kind)
    known = entries(kind)
    key = str(name).lower()
    if key not in known:
        import difflib

        alias = ALIASES.get((kind, key))
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        guess = f"did you mean {close[0]}? " if close and not alias else ""
        raise ScenarioError(spec.field, f"unknown {spec.noun} {name!r}{f': {alias}' if alias else ''}",
                            f"{guess}use one of {', '.join(known) or '(none registered)'}{spec.hint}")
    return known[key]


# names users bring from elsewhere, and what they are called here
ALIASES = {
    ("strategy", "fedavg"): "FedAvg of the LoRA factors is fedit (FedIT, Zhang et al. 2024: FedAvg on LoRA adapters)",
    ("strategy", "homlora"): "one shared adapter (PF2LoRA's HOMLoRA baseline) is fedit",
}


def decorator(kind: str) -> Callable[[str], Callable[[Any], Any]]:
    """A kind's own registering decorator: ``metric = decorator("metric")`` then ``@metric("exact_match")``."""
    return lambda name: register(kind, name)


def load_object(path: str, key: str) -> Any:
    """The object at ``module:attribute``.

    Raises:
        ScenarioError: the module cannot be imported, or has no such attribute (naming both and the fix).
    """
    module, _, attr = path.partition(":")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - ImportError, or the module's own error while importing
        raise ScenarioError(key, f"cannot import {module!r} for {path!r}: {e.__class__.__name__}: {e}",
                            "check the module name, and that it is importable where fedsim runs (installed, or on "
                            "PYTHONPATH for every Ray worker)") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ScenarioError(key, f"{module!r} has no {attr!r}", f"name an attribute of {module}")
        obj = getattr(obj, part)
    return obj
