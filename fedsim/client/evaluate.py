"""Evaluation: loss and exact-match accuracy.

Exact match under greedy decoding is computed in one teacher-forced forward pass: greedy decoding reproduces the
reference answer (and stops with EOS) if and only if, at every answer position, the argmax given the reference prefix
is the reference token. So the check is exact, not an approximation, and costs one forward pass instead of a
generation loop. Classification data is scored over the label options (highest total log-likelihood wins).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedsim.client.batching import IGNORE, collate
from fedsim.data.datasets import TokenizedData, TokenizedSplit


def _token_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-likelihood of the labels and whether the argmax hit them; both (B, T-1), masked where ignored."""
    logits = model(input_ids=batch["input_ids"]).logits.float()  # right padding: see collate()
    logits = logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    target = batch["labels"][:, 1:]  # (B, T-1)
    valid = target != IGNORE
    safe = target.clamp(min=0)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    hit = logits.argmax(dim=-1) == safe
    return logp.masked_fill(~valid, 0.0), hit | ~valid


@torch.no_grad()
def evaluate_batch(model: torch.nn.Module, data: TokenizedData, indices: Sequence[int] | np.ndarray,
                   device: torch.device, split: TokenizedSplit | None = None) -> dict[str, float]:
    """Sums over one batch of samples of ``split`` (default: the global test set): ``loss_sum``, ``tokens``,
    ``correct``, ``count`` and per task ``task/<name>/correct`` / ``task/<name>/count`` (sums, so that batches
    combine exactly)."""
    split = data.test if split is None else split
    was_training = model.training
    if was_training:
        model.eval()
    batch = collate(split, indices, data.pad_id, device)
    logp, hit = _token_logprobs(model, batch)
    valid = batch["labels"][:, 1:] != IGNORE
    out = {"loss_sum": float(-logp.sum().double()), "tokens": float(valid.sum()), "count": float(len(indices))}
    if data.options:
        correct = _score_options(model, data, split, indices, device) == torch.as_tensor(split.label[np.asarray(indices)])
    else:
        correct = hit.all(dim=1).cpu()
    out["correct"] = float(correct.sum())
    if data.task_names:
        tasks = split.task[np.asarray(indices)]
        for t in np.unique(tasks[tasks >= 0]):
            sel = torch.as_tensor(tasks == t)
            name = data.task_names[int(t)]
            out[f"task/{name}/correct"] = float(correct[sel].sum())
            out[f"task/{name}/count"] = float(sel.sum())
    if was_training:
        model.train()
    return out


def _score_options(model: torch.nn.Module, data: TokenizedData, split: TokenizedSplit,
                   indices: Sequence[int] | np.ndarray, device: torch.device) -> torch.Tensor:
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
    logp, _ = _token_logprobs(model, batch)
    scores = logp.sum(dim=1).view(len(indices), len(data.options))
    return scores.argmax(dim=1).cpu()


def reduce_eval(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Combine per-batch sums (in the given order) into ``eval/loss``, ``eval/accuracy`` and ``eval/task/<t>/accuracy``."""
    sums: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            sums[k] = sums.get(k, 0.0) + v
    out = {"eval/loss": sums["loss_sum"] / max(sums["tokens"], 1.0),
           "eval/accuracy": sums["correct"] / max(sums["count"], 1.0), "eval/num_samples": sums["count"]}
    for k in sorted(sums):
        if k.startswith("task/") and k.endswith("/correct"):
            name = k[len("task/") : -len("/correct")]
            out[f"eval/task/{name}/accuracy"] = sums[k] / max(sums[f"task/{name}/count"], 1.0)
    return out
