"""What scoring a batch gives the metrics (:mod:`fedsim.eval.metrics` reads it, :mod:`fedsim.eval.scoring` makes it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedsim.data.tokenized import TokenizedSplit


@dataclass
class EvalOutputs:
    """What one batch's scoring gives the metrics.

    Attributes:
        logp: log-likelihood of each scored token (B, P), 0 where a row has no label.
        valid: which of those positions are scored (B, P).
        correct: whether each sample is answered correctly (B,): exact match of the response, or the most likely
            label option being the right one.
        tasks: each sample's task index (-1: none), numpy (B,); ``task_names`` the names they index.
        indices: the samples (rows of ``split``).
        predicted, label: classification only (the data has label options): the most likely option and the right
            one per sample, numpy (B,) of option indices; None otherwise.
    """

    logp: torch.Tensor
    valid: torch.Tensor
    correct: torch.Tensor
    tasks: np.ndarray
    task_names: list[str]
    indices: np.ndarray
    split: TokenizedSplit
    predicted: np.ndarray | None = None
    label: np.ndarray | None = None
