"""Metrics of generated text: ROUGE-1/2/L (``rouge-score``), BLEU and chrF (``sacrebleu``), normalized exact match,
and your own functions — overall and per task.

Each is a :class:`GenerativeMetric`: on a worker it turns every generated sample into a row of additive statistics
(ROUGE: the sample's F-measure and 1; BLEU: n-gram matches and totals and the two lengths, as sacrebleu sums them
over a corpus; chrF: its character and word n-gram counts), and the driver adds the rows of every batch and worker
and computes the score once — so BLEU and chrF are the corpus scores sacrebleu computes over the whole generated set,
not a mean of sentence scores, whatever the split of the work. Scales: ROUGE and exact match in [0, 1], BLEU and chrF
in [0, 100] as sacrebleu reports them. Keys: ``eval/gen/<name>`` and ``eval/gen/task/<task>/<name>``.

A function of your own, named by import path in ``eval.metrics`` (``my_pkg.metrics:score``), is called as
``score(prediction: str, reference: str) -> float`` for every generated sample on the workers and averaged
(``eval/gen/score``); a :class:`~fedsim.eval.metrics.Metric` subclass at an import path is used as it is.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedsim import registry
from fedsim.eval.metrics import Metric, metric

log = logging.getLogger(__name__)


@dataclass
class GenerationOutputs:
    """What generating one batch gives the metrics: the decoded generations and references (whitespace stripped),
    each sample's task index (numpy, -1: none) and the task names."""

    predictions: list[str]
    references: list[str]
    tasks: np.ndarray
    task_names: list[str]


class GenerativeMetric(Metric):
    """A metric of generated text: :meth:`stats` per sample (additive columns), :meth:`score` of their sum.

    Attributes:
        requires: modules it needs (checked when the scenario names it, with the install command in the error).
    """

    generative: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()

    def stats(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """(n, k) additive statistics, one row per sample."""
        raise NotImplementedError

    def score(self, total: np.ndarray) -> float:
        """The metric from the column sums over every sample."""
        raise NotImplementedError

    def sums(self, out: GenerationOutputs) -> dict[str, float]:
        if not out.predictions:
            return {}
        rows = np.asarray(self.stats(out.predictions, out.references), dtype=np.float64).reshape(len(out.predictions), -1)
        sums = {f"gen/{self.name}/{j}": float(v) for j, v in enumerate(rows.sum(axis=0))}
        for t in sorted({int(x) for x in out.tasks if x >= 0}):
            part = rows[np.asarray(out.tasks) == t].sum(axis=0)
            sums.update({f"gen/task/{out.task_names[t]}/{self.name}/{j}": float(v) for j, v in enumerate(part)})
        return sums

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        out = {}
        groups: dict[str, dict[int, float]] = {}
        for k, v in sums.items():
            head, _, col = k.rpartition("/")
            if head == f"gen/{self.name}":
                groups.setdefault("", {})[int(col)] = v
            elif head.startswith("gen/task/") and head.endswith(f"/{self.name}"):
                task = head[len("gen/task/") : -len(self.name) - 1]
                groups.setdefault(task, {})[int(col)] = v
        for task, cols in sorted(groups.items()):
            total = np.asarray([cols[j] for j in range(len(cols))])
            key = f"eval/gen/{self.name}" if not task else f"eval/gen/task/{task}/{self.name}"
            out[key] = float(self.score(total))
        return out


class _Mean(GenerativeMetric):
    """The mean over samples of a per-sample score: statistics (score, 1)."""

    def sample_scores(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def stats(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        s = np.asarray(self.sample_scores(predictions, references), dtype=np.float64)
        return np.stack([s, np.ones_like(s)], axis=1)

    def score(self, total: np.ndarray) -> float:
        return float(total[0] / max(total[1], 1.0))


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@metric("exact_match")
class ExactMatch(_Mean):
    """Share of generations equal to the reference after :func:`normalize_answer` (``eval/gen/exact_match``)."""

    name = "exact_match"
    keys = ("eval/gen/exact_match", "eval/gen/task/*/exact_match")

    def sample_scores(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        return [float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references)]


class _Rouge(_Mean):
    """ROUGE F-measure per sample (``rouge-score``, with its Porter stemmer), averaged: as rouge-score's own
    ``BootstrapAggregator`` mid value without resampling, and as Hugging Face ``evaluate``'s ``rouge`` reports."""

    rouge_type: ClassVar[str] = ""
    requires = ("rouge_score",)

    def sample_scores(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer([self.rouge_type], use_stemmer=True)
        return [scorer.score(r, p)[self.rouge_type].fmeasure for p, r in zip(predictions, references)]


@metric("rouge1")
class Rouge1(_Rouge):
    name, rouge_type = "rouge1", "rouge1"
    keys = ("eval/gen/rouge1", "eval/gen/task/*/rouge1")


@metric("rouge2")
class Rouge2(_Rouge):
    name, rouge_type = "rouge2", "rouge2"
    keys = ("eval/gen/rouge2", "eval/gen/task/*/rouge2")


@metric("rouge_l")
class RougeL(_Rouge):
    name, rouge_type = "rouge_l", "rougeL"
    keys = ("eval/gen/rouge_l", "eval/gen/task/*/rouge_l")


class _Sacre(GenerativeMetric):
    """A sacrebleu corpus metric from summed sentence statistics (sacrebleu's own ``_extract_corpus_statistics`` and
    ``_compute_score_from_stats``: exactly its ``corpus_score`` over the same sentences, one reference each)."""

    requires = ("sacrebleu",)
    sacrebleu_class: ClassVar[str] = ""  # in sacrebleu.metrics, built with its defaults

    def make(self) -> Any:
        import sacrebleu.metrics

        return getattr(sacrebleu.metrics, self.sacrebleu_class)()

    def stats(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        return np.asarray(self.make()._extract_corpus_statistics(list(predictions), [list(references)]),
                          dtype=np.float64)

    def score(self, total: np.ndarray) -> float:
        m = self.make()
        return float(m._compute_score_from_stats([int(round(v)) for v in total]).score)


@metric("bleu")
class Bleu(_Sacre):
    """Corpus BLEU (sacrebleu's defaults: 13a tokenization, exponential smoothing), ``eval/gen/bleu``."""

    name, sacrebleu_class = "bleu", "BLEU"
    keys = ("eval/gen/bleu", "eval/gen/task/*/bleu")


@metric("chrf")
class ChrF(_Sacre):
    """Corpus chrF (sacrebleu's defaults: character 6-grams, β = 2), ``eval/gen/chrf``."""

    name, sacrebleu_class = "chrf", "CHRF"
    keys = ("eval/gen/chrf", "eval/gen/task/*/chrf")


class FunctionMetric(_Mean):
    """A user's ``score(prediction, reference) -> float`` named by import path, averaged over generated samples
    (``eval/gen/<function name>``). Only the path travels to the workers; each imports it there."""

    def __init__(self, path: str):
        self.path = path
        self.name = path.rpartition(":")[2]
        self.keys = (f"eval/gen/{self.name}", f"eval/gen/task/*/{self.name}")
        self._fn: Callable[[str, str], float] | None = None
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def sample_scores(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        if self._fn is None:
            self._fn = registry.load_object(self.path, "eval.metrics")
        out = []
        for p, r in zip(predictions, references):
            try:
                v = self._fn(p, r)
                if isinstance(v, (str, bytes)):
                    raise TypeError(f"returned {v!r:.60}, not a number")
                score = float(v)
            except Exception as e:  # noqa: BLE001 — the user's code: its failure costs this score, not the run
                score = float("nan")
                self._warn(e)
            out.append(score)
        return out

    def _warn(self, e: Exception) -> None:
        """One line per metric and process: the score of a sample it fails on is NaN (the round's value then is
        too, and metrics.jsonl names it under not_finite)."""
        if not self._warned:
            self._warned = True
            log.warning("eval.metrics: %s failed on a sample (%s: %s); its score there is NaN", self.path,
                        type(e).__name__, e)


def is_generative(m: Metric) -> bool:
    return bool(getattr(m, "generative", False))
