"""The metrics of a run: the built-ins every run reports, then the scenario's ``eval.metrics`` — registered names
(:mod:`fedsim.eval.metrics`, :mod:`fedsim.eval.text_metrics`) or ``module:name`` import paths of your own. Importing
this module registers every built-in metric (it is the registry's home for metrics)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

import numpy as np

from fedsim import registry
from fedsim.errors import ScenarioError
from fedsim.eval.metrics import DEFAULT_METRICS, Metric, default_metrics
from fedsim.eval.text_metrics import FunctionMetric


def run_metrics(extra: Sequence[str] = ()) -> tuple[Metric, ...]:
    """The defaults, then each of ``extra``: a registered name, or an import path (:func:`user_metric`)."""
    named = [user_metric(n) if ":" in n else registry.get("metric", n)() for n in extra if n not in DEFAULT_METRICS]
    return (*default_metrics(), *named)


def user_metric(path: str) -> Metric:
    """``module:name`` → a Metric: a Metric subclass (instantiated) or a per-sample function.

    Raises:
        ScenarioError: not importable, or neither a Metric subclass nor a callable.
    """
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", path):
        raise ScenarioError("eval.metrics", f"{path!r} is not a metric name or an import path",
                            "give a built-in name or module.path:function")
    obj = registry.load_object(path, "eval.metrics")
    if isinstance(obj, type) and issubclass(obj, Metric):
        return obj()
    if callable(obj):
        check_function(path, obj)
        return FunctionMetric(path)
    raise ScenarioError("eval.metrics", f"{path} is a {type(obj).__name__}, not a function or a Metric subclass",
                        "point at score(prediction: str, reference: str) -> float, or a Metric subclass")


def check_function(path: str, fn: Callable) -> None:
    """Before round 1: a per-sample metric takes (prediction, reference) and returns a number for a first sample
    (``"a", "a"``) — not after all the training, in the first evaluation.

    Raises:
        ScenarioError: its signature takes other arguments, the call raises, or it returns no number.
    """
    fix = "a metric is score(prediction: str, reference: str) -> float"
    try:
        inspect.signature(fn).bind("a", "a")
    except TypeError:
        raise ScenarioError("eval.metrics", f"{path} takes {inspect.signature(fn)}, not (prediction, reference)",
                            fix) from None
    except ValueError:  # a builtin without a signature: the trial call says
        pass
    try:
        value = fn("a", "a")
    except Exception as e:  # noqa: BLE001 — the user's code may raise anything
        raise ScenarioError("eval.metrics", f"{path}('a', 'a') raised {type(e).__name__}: {e}", fix) from None
    if isinstance(value, (str, bytes)) or not isinstance(value, (int, float, np.number)):
        raise ScenarioError("eval.metrics", f"{path}('a', 'a') returned {value!r:.60}, not a number", fix)
