"""Scoring a batch: one teacher-forced forward pass (plus one over the label options for classification), whose
outputs the metrics turn into additive sums (:mod:`fedsim.eval.metrics`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedsim.data.tokenized import TokenizedData, TokenizedSplit
from fedsim.eval.metrics import default_metrics, scored
from fedsim.eval.outputs import EvalOutputs
from fedsim.models.base import set_training
from fedsim.models.lm_loss import IGNORE


@torch.no_grad()
def score_batch(model: torch.nn.Module, data: TokenizedData, indices: Sequence[int] | np.ndarray,
                device: torch.device, task: Any, split: TokenizedSplit | None = None) -> EvalOutputs:
    """Score one batch of samples of ``split`` (default: the global test set) with the model task's token scores."""
    split = data.test if split is None else split
    set_training(model, False)  # training sets its own mode when it starts
    batch = task.collate(split, indices, data.pad_id, device)
    logp, valid, hit, classes = task.score(model, batch)
    predicted = label = None
    if classes is not None:  # the task predicts classes itself (a sequence classifier's head)
        predicted = classes.cpu().numpy()
        label = np.asarray(split.label[np.asarray(indices)])
        correct = torch.as_tensor(predicted == label)
    elif data.options:
        predicted = _score_options(model, data, split, indices, device, task).numpy()
        label = np.asarray(split.label[np.asarray(indices)])
        correct = torch.as_tensor(predicted == label)
    else:
        correct = hit.all(dim=1).cpu()
    idx = np.asarray(indices)
    return EvalOutputs(logp=logp, valid=valid, correct=correct, tasks=split.task[idx], task_names=data.task_names,
                       indices=idx, split=split, predicted=predicted, label=label)


def evaluate_batch(model: torch.nn.Module, data: TokenizedData, indices: Sequence[int] | np.ndarray,
                   device: torch.device, split: TokenizedSplit | None = None, task: Any = None,
                   metrics: Sequence[Any] | None = None) -> dict[str, float]:
    """Every metric's sums over one batch (default metrics: ``loss_sum``, ``tokens``, ``count``, ``correct`` and per
    task ``task/<name>/correct`` / ``task/<name>/count``: sums, so that batches combine exactly)."""
    if task is None:
        from fedsim.models.tasks.causal_lm import CausalLM

        task = CausalLM()
    metrics = scored(default_metrics() if metrics is None else metrics)
    out = score_batch(model, data, indices, device, task, split)
    sums: dict[str, float] = {}
    for m in metrics:
        sums.update(m.sums(out))
    return sums


def _score_options(model: torch.nn.Module, data: TokenizedData, split: TokenizedSplit,
                   indices: Sequence[int] | np.ndarray, device: torch.device, task: Any) -> torch.Tensor:
    """Index of the label option with the highest total log-likelihood for each sample, (B,)."""
    seqs, prompt_lens = [], []
    for i in indices:
        prompt = split.sample(int(i))[: int(split.prompt_len[int(i)])]
        for opt in data.options:
            seqs.append(np.concatenate([prompt, opt]))
            prompt_lens.append(len(prompt))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), data.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for row, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[row, : len(s)] = torch.from_numpy(s.astype(np.int64))
        mask[row, : len(s)] = 1
        labels[row, p : len(s)] = ids[row, p : len(s)]
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    logp, _ = task.token_scores(model, batch)
    scores = logp.sum(dim=1).view(len(indices), len(data.options))
    return scores.argmax(dim=1).cpu()
