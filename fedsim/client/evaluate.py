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
from fedsim.client.lm_loss import labelled_logits
from fedsim.data.datasets import TokenizedData, TokenizedSplit


def _token_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-likelihood of the labels and whether the argmax hit them, at the positions where some row has a
    label (B, P), masked where a row has none. The LM head runs at those positions only (:func:`labelled_logits`):
    the logits of a whole batch, (B, T, vocabulary) in float32, are most of an evaluation's memory, and a prompt's
    positions have no label to score."""
    logits, target = labelled_logits(model, batch["input_ids"], batch["labels"])
    logits = logits.float()
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


@torch.no_grad()
def prompt_embeddings(model: torch.nn.Module, split: TokenizedSplit, indices: Sequence[int] | np.ndarray,
                      pad_id: int, device: torch.device, kind: str = "last", batch_size: int = 32) -> torch.Tensor:
    """The last layer's hidden state of each sample's prompt (``last``: at its last token; ``mean``: averaged over
    its tokens), (N, hidden), float32. Prompts are right-padded, so no prompt token sees a pad."""
    out = []
    idx = [int(i) for i in indices]
    for s in range(0, len(idx), batch_size):
        chunk = idx[s: s + batch_size]
        prompts = [split.sample(i)[: max(1, int(split.prompt_len[i]))] for i in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        hidden = model(input_ids=ids.to(device), output_hidden_states=True).hidden_states[-1].float()
        lengths = torch.as_tensor([len(p) for p in prompts], device=hidden.device)
        if kind == "last":
            out.append(hidden[torch.arange(len(chunk), device=hidden.device), lengths - 1])
        else:
            mask = (torch.arange(width, device=hidden.device)[None, :] < lengths[:, None]).float()
            out.append((hidden * mask[..., None]).sum(1) / lengths[:, None])
    return torch.cat(out).cpu()


def similarity_weights(test_emb: torch.Tensor, ref_emb: torch.Tensor, refs: list[np.ndarray],
                       max_weight: float) -> torch.Tensor:
    """FedDPA-D's instance-wise weight of each test instance: ``max_weight`` × the mean cosine similarity of its
    embedding to those of its reference instances (``refs[i]``: rows of ``ref_emb``), (N,)."""
    weights = []
    for i, rows in enumerate(refs):
        sims = torch.nn.functional.cosine_similarity(test_emb[i][None, :], ref_emb[torch.as_tensor(rows)], dim=1)
        weights.append(max_weight * sims.mean())
    return torch.stack(weights) if weights else torch.zeros(0)
