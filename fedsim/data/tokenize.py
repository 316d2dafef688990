"""Tokenization: formatted examples → flat token arrays, the prompt's length marking where the loss starts.

What a row becomes is what the exported model sees at inference: the prompt as ``tokenizer(prompt)`` gives it —
with the special tokens that tokenizer puts in front (Llama's BOS; none for GPT-2) — then the response and EOS. Tokens a
tokenizer appends at the end (T5's EOS, BERT's SEP) are left out of the prompt: a causal model continues the prompt.
A chat template's rendering carries its own special tokens and is tokenized as it is (``apply_chat_template`` does the
same). A row longer than ``max_len`` loses the start of its prompt — never the special tokens in front, and the response
only when it alone does not fit — or is dropped (``data.too_long: drop``); :class:`SplitStats` counts both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedsim.data.formats import Example
from fedsim.data.tokenized import TokenizedSplit

AUTO_PERCENTILE = 99  # max_seq_len: auto covers this share of the training rows in full


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the caller adds BOS and EOS where they belong)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens ``tokenizer(text)`` puts in front of a text ([BOS] for Llama, [] for GPT-2 and ByT5)."""
    probe = "a b"
    plain = encode(tokenizer, probe)
    full = list(tokenizer(probe)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    bos = getattr(tokenizer, "bos_token_id", None)  # a tokenizer that merges across the boundary: its flag decides
    return [bos] if bos is not None and getattr(tokenizer, "add_bos_token", False) else []


@dataclass
class Encoded:
    """One example's tokens before fitting: the special tokens in front (kept whatever is cut), the prompt (with a
    conversation's earlier turns, trained where ``body_mask`` says) and the last response with EOS."""

    lead: list[int]
    body: list[int]
    body_mask: list[bool] | None
    response: list[int]

    def __len__(self) -> int:
        return len(self.lead) + len(self.body) + len(self.response)


def encode_example(ex: Example, tokenizer: Any, prefix: list[int], eos: int) -> Encoded:
    """The tokens of one example (``prefix``: :func:`special_prefix`)."""
    if not ex.rendered:
        return Encoded(list(prefix), encode(tokenizer, ex.prompt), None, encode(tokenizer, ex.response) + [eos])
    specials = set(getattr(tokenizer, "all_special_ids", ()))
    body: list[int] = []
    mask: list[bool] = []
    for text, reply in ex.context:
        ctx, rep = encode(tokenizer, text), _with_eos(encode(tokenizer, reply), eos)
        body += ctx + rep
        mask += [False] * len(ctx) + [True] * len(rep)
    prompt = encode(tokenizer, ex.prompt)
    body += prompt
    mask += [False] * len(prompt)
    n = 0
    while n < len(body) and body[n] in specials and not mask[n]:
        n += 1
    return Encoded(body[:n], body[n:], mask[n:] if any(mask) else None,
                   _with_eos(encode(tokenizer, ex.response), eos))


def _with_eos(ids: list[int], eos: int) -> list[int]:
    """A chat reply ends with EOS: the template's own, else one appended (so that generation learns to stop)."""
    return ids if eos in ids else ids + [eos]


@dataclass
class SplitStats:
    """What fitting a split to ``max_seq_len`` did: rows read and kept, rows whose prompt lost its start, rows whose
    response was cut (it alone did not fit), rows dropped (``too_long: drop``), and the longest row, in tokens."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    response_cut: int = 0
    dropped: int = 0
    longest: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def auto_length(lengths: list[int], cap: int | None) -> int:
    """``max_seq_len: auto``: the :data:`AUTO_PERCENTILE` th percentile of the training rows' lengths (the shortest
    length that at least that share of rows fits in), rounded up to a multiple of 8, at least 8, at most ``cap`` (the
    model's maximum)."""
    p = float(np.percentile(np.asarray(lengths), AUTO_PERCENTILE, method="inverted_cdf")) if lengths else 8.0
    n = max(8, 8 * math.ceil(p / 8))
    return min(n, cap) if cap else n


def fit(enc: Encoded, max_len: int) -> tuple[list[int], list[bool] | None, int, int]:
    """The example cut to ``max_len`` tokens: (ids, loss mask before the prompt's end or None, prompt length,
    0 = whole | 1 = prompt cut | 2 = response cut)."""
    lead, body, r = enc.lead, enc.body, enc.response
    status = 0 if len(enc) <= max_len else 1
    room = max_len - len(lead) - 1  # keep at least one prompt token
    if len(r) > room:
        r, status = r[: max(room, 1)], 2
    keep = max(max_len - len(lead) - len(r), 1)
    body_mask = enc.body_mask
    if len(body) > keep:  # the prompt loses its start; the special tokens in front stay
        body = body[-keep:]
        body_mask = body_mask[-keep:] if body_mask is not None else None
    ids = lead + body
    mask = [False] * len(lead) + body_mask if body_mask is not None else None
    return ids + r, mask, len(ids), status


def tokenize_split(encoded: list[Encoded], meta: list[tuple[int, int, int]], max_len: int, drop: bool
                   ) -> tuple[TokenizedSplit, SplitStats]:
    """Fit encoded examples to ``max_len`` and store them flat. ``meta``: each row's (label, task, group) codes."""
    ids: list[int] = []
    offsets = [0]
    prompt_len, labels, tasks, grp = [], [], [], []
    masks: list[list[bool] | None] = []
    stats = SplitStats(rows=len(encoded))
    for enc, (label, task, group) in zip(encoded, meta):
        stats.longest = max(stats.longest, len(enc))
        if drop and len(enc) > max_len:
            stats.dropped += 1
            continue
        seq, mask, p, status = fit(enc, max_len)
        stats.truncated += status == 1
        stats.response_cut += status == 2
        ids.extend(seq)
        offsets.append(len(ids))
        prompt_len.append(p)
        masks.append(mask)
        labels.append(label)
        tasks.append(task)
        grp.append(group)
    stats.kept = len(prompt_len)
    loss_mask = None
    if any(m is not None for m in masks):  # earlier turns of conversations are trained too
        loss_mask = np.zeros(len(ids), dtype=np.bool_)
        for i, m in enumerate(masks):
            if m is not None:
                loss_mask[offsets[i] : offsets[i] + len(m)] = m
    return TokenizedSplit(
        ids=np.asarray(ids, dtype=np.int32), offsets=np.asarray(offsets, dtype=np.int64),
        prompt_len=np.asarray(prompt_len, dtype=np.int32), label=np.asarray(labels, dtype=np.int32),
        task=np.asarray(tasks, dtype=np.int32), group=np.asarray(grp, dtype=np.int32), loss_mask=loss_mask,
    ), stats
