"""Collate tokenized samples into padded tensors. ``split`` is a :class:`fedsim.data.tokenized.TokenizedSplit` (its
``sample``, ``prompt_len``, ``label`` and ``label_row``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedsim.models.lm_loss import IGNORE


def collate(split: Any, indices: Sequence[int] | np.ndarray, pad_id: int,
            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` and ``labels`` that cover only response tokens.

    With right padding a causal model never lets a real token attend to a pad (pads come after it), and pad positions
    carry no label, so callers may leave ``attention_mask`` out of the forward pass: same result, and the model can
    take its faster pure-causal attention path.

    Returns:
        ``input_ids`` (B, T) int64, ``attention_mask`` (B, T), ``labels`` (B, T) with -100 on prompt and padding.
    """
    seqs = [split.sample(int(i)) for i in indices]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    labels = np.full((len(seqs), width), IGNORE, dtype=np.int64)
    for row, (i, s) in enumerate(zip(indices, seqs)):
        n = len(s)
        ids[row, :n] = s
        mask[row, :n] = 1
        split.label_row(int(i), labels[row])
    return {k: torch.from_numpy(v).to(device) for k, v in
            (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


def collate_prompts(split: Any, indices: Sequence[int] | np.ndarray, pad_id: int,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Sequence classification's batch: each row's prompt alone (its text as the format rendered it, without the
    answer), right-padded, with ``attention_mask`` (an encoder attends both ways: it must not see the pads) and
    ``labels`` (B,) the rows' class indices — a packed batch of one client (:func:`collate_prompts_pack`)."""
    return collate_prompts_pack(split, [np.asarray(indices, dtype=np.int64)], pad_id, device)


def collate_pack(split: Any, client_batches: Sequence[np.ndarray], pad_id: int, device: torch.device | str = "cpu"
                 ) -> dict[str, torch.Tensor]:
    """A packed pass's causal-LM batch (:mod:`fedsim.client.packed`): the clients' batches one after another, each
    padded to the same number of rows with empty rows (all pad, no label), right-padded to the longest sequence of
    the pack. No attention mask: right padding puts every pad after the real tokens of a causal model.

    Returns:
        ``input_ids`` (n·rows, T) and ``labels`` (n·rows, T) with -100 on prompt and padding.
    """
    rows = max(len(b) for b in client_batches)
    seqs = [[split.sample(int(i)) for i in b] for b in client_batches]
    width = max(len(s) for client in seqs for s in client)
    ids = np.full((len(client_batches) * rows, width), pad_id, dtype=np.int64)
    labels = np.full((len(client_batches) * rows, width), IGNORE, dtype=np.int64)
    for c, (b, client) in enumerate(zip(client_batches, seqs)):
        for j, (i, s) in enumerate(zip(b, client)):
            ids[c * rows + j, : len(s)] = s
            split.label_row(int(i), labels[c * rows + j])
    return {"input_ids": torch.from_numpy(ids).to(device), "labels": torch.from_numpy(labels).to(device)}


def collate_prompts_pack(split: Any, client_batches: Sequence[np.ndarray], pad_id: int,
                         device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A packed pass's classification batch: each client's :func:`collate_prompts` rows one block after another,
    each block filled up to the pack's row count with filler rows (one attended pad token, label -100, which no loss
    reads), right-padded to the pack's longest prompt. The attention mask keeps every real row's result what it is
    in a batch of its own."""
    rows = max(len(b) for b in client_batches)
    n = len(client_batches)
    seqs = [[split.sample(int(i))[: int(split.prompt_len[int(i)])] for i in b] for b in client_batches]
    width = max(1, max(len(s) for client in seqs for s in client))
    ids = np.full((n * rows, width), pad_id, dtype=np.int64)
    mask = np.zeros((n * rows, width), dtype=np.int64)
    labels = np.full(n * rows, IGNORE, dtype=np.int64)
    types = getattr(split, "token_type", None)
    segments = np.zeros((n * rows, width), dtype=np.int64) if types is not None else None
    for c, (b, client) in enumerate(zip(client_batches, seqs)):
        labels[c * rows: c * rows + len(b)] = split.label[np.asarray(b, dtype=np.int64)]
        mask[c * rows + len(b): (c + 1) * rows, 0] = 1  # a filler row attends to its one pad: finite, never read
        for j, s in enumerate(client):
            ids[c * rows + j, : len(s)] = s
            mask[c * rows + j, : len(s)] = 1
            if segments is not None:  # a sentence pair's segment ids (BERT's token_type_ids)
                start = int(split.offsets[int(b[j])])
                segments[c * rows + j, : len(s)] = types[start : start + len(s)]
    out = [("input_ids", ids), ("attention_mask", mask), ("labels", labels)]
    if segments is not None:
        out.append(("token_type_ids", segments))
    return {k: torch.from_numpy(v).to(device) for k, v in out}
