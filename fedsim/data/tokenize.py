"""Tokenization: formatted examples → flat token arrays, the prompt's length marking where the loss starts."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsim.data.tokenized import TokenizedSplit


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the caller adds BOS and EOS where they belong)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_split(formatted: list[tuple[str, str, str | None, str]], groups: list[str | None], tokenizer: Any,
                    max_len: int, task_index: dict[str, int], group_index: dict[str, int],
                    label_index: dict[str, int]) -> TokenizedSplit:
    """Tokenize (prompt, response, task, label) tuples: BOS + prompt, then response + EOS, at most ``max_len``
    tokens, the prompt truncated from the left so that the response survives."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    offsets = [0]
    prompt_len, labels, tasks, grp = [], [], [], []
    for (prompt, response, task, label), g in zip(formatted, groups):
        p = bos + encode(tokenizer, prompt)
        r = encode(tokenizer, response) + [eos]
        r = r[: max_len - 1]  # keep at least one prompt token
        p = p[-(max_len - len(r)) :]  # truncate the prompt from the left so the answer survives
        ids.extend(p + r)
        offsets.append(len(ids))
        prompt_len.append(len(p))
        labels.append(label_index.get(label, -1))
        tasks.append(task_index[task] if task is not None else -1)
        grp.append(group_index[g] if g is not None else -1)
    return TokenizedSplit(
        ids=np.asarray(ids, dtype=np.int32), offsets=np.asarray(offsets, dtype=np.int64),
        prompt_len=np.asarray(prompt_len, dtype=np.int32), label=np.asarray(labels, dtype=np.int32),
        task=np.asarray(tasks, dtype=np.int32), group=np.asarray(grp, dtype=np.int32),
    )
