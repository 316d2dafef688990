"""The metric extension point: what evaluation reports, computed from additive sums.

A metric reads a batch's :class:`~fedsim.eval.outputs.EvalOutputs` on a worker and returns sums (additive across
batches and workers, so that the driver combines them exactly whatever the split of the work); the driver adds the
sums of every batch and calls :meth:`Metric.reduce` once. Each metric declares the keys it reports (``keys``;
``*`` stands for a task name). Built-ins: ``loss`` (mean token negative log-likelihood), ``accuracy`` (exact match
of the response under greedy decoding, or the most likely label option for classification) and ``task_accuracy``
(the same per task); for classification, ``macro_f1`` and ``mcc`` (Matthews' correlation) from confusion counts,
added with the scenario's ``eval.metrics``. A new metric is a subclass registered with ``@metric("name")``
(docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from fedsim import registry
from fedsim.eval.outputs import EvalOutputs

metric = registry.decorator("metric")


class Metric:
    """A metric: per-batch sums on the workers, one reduction in the driver.

    Attributes:
        keys: the keys :meth:`reduce` returns (``*``: any task name).
    """

    name: ClassVar[str] = ""
    keys: ClassVar[tuple[str, ...]] = ()

    def sums(self, out: EvalOutputs) -> dict[str, float]:
        """Additive sums over one batch."""
        raise NotImplementedError

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        """The metric's values from the sums of every batch."""
        raise NotImplementedError


@metric("loss")
class Loss(Metric):
    """Mean negative log-likelihood per scored token (``eval/loss``)."""

    name = "loss"
    keys = ("eval/loss",)

    def sums(self, out: EvalOutputs) -> dict[str, float]:
        return {"loss_sum": float(-out.logp.sum().double()), "tokens": float(out.valid.sum())}

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        return {"eval/loss": sums["loss_sum"] / max(sums["tokens"], 1.0)}


@metric("accuracy")
class Accuracy(Metric):
    """Share of samples answered correctly (``eval/accuracy``) and how many were scored (``eval/num_samples``).

    Exact match under greedy decoding is computed in the one teacher-forced pass: greedy decoding reproduces the
    reference answer (and stops with EOS) if and only if, at every answer position, the argmax given the reference
    prefix is the reference token — so the check is exact, not an approximation."""

    name = "accuracy"
    keys = ("eval/accuracy", "eval/num_samples")

    def sums(self, out: EvalOutputs) -> dict[str, float]:
        return {"count": float(len(out.correct)), "correct": float(out.correct.sum())}

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        return {"eval/accuracy": sums["correct"] / max(sums["count"], 1.0), "eval/num_samples": sums["count"]}


@metric("task_accuracy")
class TaskAccuracy(Metric):
    """Accuracy per task of the data's task field (``eval/task/<task>/accuracy``)."""

    name = "task_accuracy"
    keys = ("eval/task/*/accuracy",)

    def sums(self, out: EvalOutputs) -> dict[str, float]:
        sums: dict[str, float] = {}
        if not out.task_names:
            return sums
        tasks = out.tasks
        for t in sorted({int(x) for x in tasks if x >= 0}):
            sel = torch.as_tensor(tasks == t)
            name = out.task_names[t]
            sums[f"task/{name}/correct"] = float(out.correct[sel].sum())
            sums[f"task/{name}/count"] = float(sel.sum())
        return sums

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        out = {}
        for k in sorted(sums):
            if k.startswith("task/") and k.endswith("/correct"):
                name = k[len("task/") : -len("/correct")]
                out[f"eval/task/{name}/accuracy"] = sums[k] / max(sums[f"task/{name}/count"], 1.0)
        return out


class _Confusion(Metric):
    """Confusion counts of a classification (``confusion/<label>/<predicted>``, option indices; and per task of the
    data's task field, ``task/<task>/confusion/<label>/<predicted>``): additive across batches and workers, so
    macro-F1 and Matthews' correlation come out exactly as over the whole test set (and over each task's rows)."""

    needs_options: ClassVar[bool] = True

    def sums(self, out: EvalOutputs) -> dict[str, float]:
        if out.predicted is None or out.label is None:
            return {}
        sums: dict[str, float] = {}
        tasks = out.tasks.tolist() if out.task_names and out.tasks is not None else None
        for i, (y, p) in enumerate(zip(out.label.tolist(), out.predicted.tolist())):
            keys = [f"confusion/{int(y)}/{int(p)}"]
            if tasks is not None and tasks[i] >= 0:
                keys.append(f"task/{out.task_names[int(tasks[i])]}/confusion/{int(y)}/{int(p)}")
            for key in keys:
                sums[key] = sums.get(key, 0.0) + 1.0
        return sums

    @staticmethod
    def matrix(sums: dict[str, float], prefix: str = "") -> np.ndarray:
        """The confusion matrix C[label, predicted] over the classes seen, float64 (``prefix``: a task's,
        ``task/<task>/``)."""
        head = prefix + "confusion/"
        cells = {tuple(int(x) for x in k[len(head):].split("/")): v for k, v in sums.items() if k.startswith(head)}
        n = 1 + max((max(c) for c in cells), default=-1)
        c = np.zeros((n, n))
        for (y, p), v in cells.items():
            c[y, p] = v
        return c

    def value(self, c: np.ndarray) -> float:
        """The metric of one confusion matrix (not empty)."""
        raise NotImplementedError

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        out = {}
        c = self.matrix(sums)
        if c.size:
            out[f"eval/{self.name}"] = self.value(c)
        tasks = sorted({k.split("/")[1] for k in sums if k.startswith("task/") and "/confusion/" in k})
        for t in tasks:
            out[f"eval/task/{t}/{self.name}"] = self.value(self.matrix(sums, f"task/{t}/"))
        return out


@metric("macro_f1")
class MacroF1(_Confusion):
    """Macro-averaged F1 over the classes that occur as a label or a prediction (``eval/macro_f1``, and per task
    ``eval/task/<task>/macro_f1``; a class without true or predicted samples scores 0, as scikit-learn's
    ``f1_score(average="macro", zero_division=0)``)."""

    name = "macro_f1"
    keys = ("eval/macro_f1", "eval/task/*/macro_f1")

    def value(self, c: np.ndarray) -> float:
        tp, support, predicted = np.diag(c), c.sum(axis=1), c.sum(axis=0)
        present = (support + predicted) > 0
        denom = support + predicted
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
        return float(f1[present].mean())


@metric("mcc")
class Matthews(_Confusion):
    """Matthews' correlation coefficient, multiclass (Gorodkin's R_K, as scikit-learn's ``matthews_corrcoef``;
    ``eval/mcc``, and per task ``eval/task/<task>/mcc``): (c·s − Σ p_k t_k) / √((s² − Σ p_k²)(s² − Σ t_k²)), 0 when a
    factor is 0. CoLA's metric."""

    name = "mcc"
    keys = ("eval/mcc", "eval/task/*/mcc")

    def value(self, c: np.ndarray) -> float:
        t, p = c.sum(axis=1), c.sum(axis=0)
        s, correct = c.sum(), np.trace(c)
        denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
        return float((correct * s - p @ t) / denom) if denom > 0 else 0.0


DEFAULT_METRICS = ("loss", "accuracy", "task_accuracy")
CLASSIFICATION_METRICS = ("macro_f1", "mcc")


def default_metrics(extra: Sequence[str] = ()) -> tuple[Metric, ...]:
    """The metrics every run reports (the per-client tables read ``loss`` and ``accuracy``'s sums), then ``extra``
    registered names (a scenario's ``eval.metrics``, import paths too: :func:`fedsim.eval.catalog.run_metrics`)."""
    names = [*DEFAULT_METRICS, *(n for n in extra if n not in DEFAULT_METRICS)]
    return tuple(registry.get("metric", name)() for name in names)


def scored(metrics: Sequence[Metric]) -> tuple[Metric, ...]:
    """The metrics of the teacher-forced pass (the others read generated text)."""
    return tuple(m for m in metrics if not getattr(m, "generative", False))


def combine(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-batch sums added up, in the given order."""
    sums: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            sums[k] = sums.get(k, 0.0) + v
    return sums


def reduce_eval(parts: Sequence[dict[str, float]], metrics: Sequence[Metric] | None = None) -> dict[str, float]:
    """Combine per-batch sums (in the given order) and reduce them with each metric: ``eval/loss``,
    ``eval/accuracy``, ``eval/num_samples``, ``eval/task/<t>/accuracy`` with the defaults."""
    sums = combine(parts)
    out: dict[str, float] = {}
    for m in metrics if metrics is not None else default_metrics():
        out.update(m.reduce(sums))
    return out

