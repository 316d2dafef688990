"""Collate tokenized samples into padded tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedsim.data.tokenized import TokenizedSplit
from fedsim.models.lm_loss import IGNORE


def collate(split: TokenizedSplit, indices: Sequence[int] | np.ndarray, pad_id: int,
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
