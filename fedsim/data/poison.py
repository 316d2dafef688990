"""Data poisoning by malicious clients (``clients.malicious.attack: label_flip``): each malicious client trains on
its rows with every label l replaced by (l + 1) mod K (K label options; with two labels, a swap) — Tolpegin et al.,
"Data Poisoning Attacks Against Federated Learning Systems", ESORICS 2020, flip every class.

The flipped rows are copies appended to the training split; the malicious clients' shards point at the copies, so the
test split, the other clients and every client's local test split stay clean.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import numpy as np

from fedsim.data.tokenized import TokenizedData, TokenizedSplit


def flipped(data: TokenizedData, i: int) -> np.ndarray | None:
    """Training row ``i`` with its label option replaced by the next one; None when the row's response is not its
    whole label option (cut by truncation) — that row stays as it is."""
    split, k = data.train, len(data.options)
    label = int(split.label[i])
    if label < 0 or k < 2:
        return None
    s, p = split.sample(i), int(split.prompt_len[i])
    if p == len(s):  # a classifier's input: the tokens stay, the label array carries the flip
        return s.copy()
    if not np.array_equal(s[p:], data.options[label]):
        return None
    return np.concatenate([s[:p], data.options[(label + 1) % k]])


def flip_labels(data: TokenizedData, shards: list[np.ndarray], clients: Iterable[int]
                ) -> tuple[TokenizedData, list[np.ndarray], int]:
    """``data`` with flipped copies of ``clients``' training rows appended, the shards with those clients pointing at
    the copies, and how many rows were flipped."""
    split, k = data.train, len(data.options)
    pieces, labels, source, new_index = [split.ids], [], [], {}
    end = int(split.offsets[-1])
    offsets = list(split.offsets)
    shards = list(shards)
    for c in sorted(clients):
        for i in shards[c]:
            row = flipped(data, int(i))
            if row is None or int(i) in new_index:
                continue
            new_index[int(i)] = len(split) + len(source)
            source.append(int(i))
            labels.append((int(split.label[i]) + 1) % k)
            pieces.append(row.astype(split.ids.dtype))
            end += len(row)
            offsets.append(end)
        shards[c] = np.asarray([new_index.get(int(i), int(i)) for i in shards[c]], dtype=np.int64)
    if not source:
        return data, shards, 0
    src = np.asarray(source, dtype=np.int64)
    train = TokenizedSplit(
        ids=np.concatenate(pieces), offsets=np.asarray(offsets, dtype=np.int64),
        prompt_len=np.concatenate([split.prompt_len, split.prompt_len[src]]),
        label=np.concatenate([split.label, np.asarray(labels, dtype=split.label.dtype)]),
        task=np.concatenate([split.task, split.task[src]]), group=np.concatenate([split.group, split.group[src]]),
        # the flipped rows train on their response only (label data never has earlier trained turns)
        loss_mask=None if split.loss_mask is None else np.concatenate(
            [split.loss_mask, np.zeros(end - int(split.offsets[-1]), dtype=bool)]),
        token_type=None if split.token_type is None else np.concatenate(
            [split.token_type, *(split.token_type[split.offsets[i]: split.offsets[i + 1]] for i in src)]))
    return replace(data, train=train), shards, len(source)
