"""Tokenized data as workers see it: flat numpy arrays, shared read-only through the object store."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenizedSplit:
    """One tokenized split, stored flat: sample i is ``ids[offsets[i]:offsets[i+1]]`` and its first
    ``prompt_len[i]`` tokens are the prompt."""

    ids: np.ndarray  # (total_tokens,) int32
    offsets: np.ndarray  # (n + 1,) int64
    prompt_len: np.ndarray  # (n,) int32
    label: np.ndarray  # (n,) int32: index into label options, -1 for instruction data
    task: np.ndarray  # (n,) int32: index into task_names, -1 where the data has no task field
    group: np.ndarray  # (n,) int32: index into group_names (the partition field), -1 if none
    loss_mask: np.ndarray | None = None  # (total_tokens,) bool: trained tokens before the prompt's end (a chat's
    # earlier assistant turns); None when only the response is trained
    token_type: np.ndarray | None = None  # (total_tokens,) int8: segment ids of a classifier's sentence pairs (BERT's
    # token_type_ids); None when every token is in the first segment

    def __len__(self) -> int:
        return len(self.prompt_len)

    def sample(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def label_row(self, i: int, out: np.ndarray) -> None:
        """Write sample ``i``'s labels into ``out`` (prefilled with the ignore index): its tokens from the prompt's end
        on, and the trained tokens before it (``loss_mask``)."""
        s, p = self.sample(i), int(self.prompt_len[i])
        out[p : len(s)] = s[p:]
        if self.loss_mask is not None:
            m = self.loss_mask[self.offsets[i] : self.offsets[i] + p]
            out[:p][m] = s[:p][m]


@dataclass
class TokenizedData:
    """Tokenized train and test splits plus the names their integer codes refer to."""

    train: TokenizedSplit
    test: TokenizedSplit
    task_names: list[str]
    group_names: list[str]
    label_names: list[str] = field(default_factory=list)
    options: list[np.ndarray] = field(default_factory=list)  # tokenized label options (classification)
    pad_id: int = 0
    eos_id: int = 1
    max_len: int = 0  # data.max_seq_len in force (``auto`` resolved)
    stats: dict = field(default_factory=dict)  # per split: SplitStats as a dict; "max_seq_len", "auto", "notes"
