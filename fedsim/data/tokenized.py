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

    def __len__(self) -> int:
        return len(self.prompt_len)

    def sample(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]


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
