"""Tokenization: formatted examples → flat token arrays, the prompt's length marking where the loss starts.

What a row becomes is what the exported model sees at inference: the prompt as ``tokenizer(prompt)`` gives it —
with the special tokens that tokenizer puts in front (Llama's BOS; none for GPT-2) — then the response and the end
token (EOS, or the separator where a tokenizer has no EOS: :func:`fedsim.models.tokenizer.end_token`). Tokens a
tokenizer appends at the end (T5's EOS, BERT's SEP) are left out of the prompt: a causal model continues the prompt.
A chat template's rendering carries its own special tokens and is tokenized as it is (``apply_chat_template`` does the
same). A row longer than ``max_len`` loses the start of its prompt — never the special tokens in front, and the response
only when it alone does not fit — or is dropped (``data.too_long: drop``); :class:`SplitStats` counts both.

A classifier's input (``model.task: seq_cls``) is what the tokenizer gives for the text — or the pair of texts, with
its separator and segment ids, as transformers' GLUE examples encode it — special tokens at both ends; a longer one is
cut as the tokenizer truncates (``longest_first``), or dropped.

Rows are encoded by batched tokenizer calls of :data:`CHUNK` rows, each turned into flat numpy arrays at once, so the
memory a split takes is that of its arrays, and fitting to the length is array arithmetic (:func:`fit_rows`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedsim.data.formats import Example
from fedsim.data.tokenized import TokenizedSplit

AUTO_PERCENTILE = 99  # max_seq_len: auto covers this share of the training rows in full
CHUNK = 4096  # rows per batched tokenizer call
PROGRESS_AFTER_S = 2.0  # a progress bar shows once encoding has taken this long


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the caller adds BOS and EOS where they belong)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class Flat:
    """Variable-length rows of ids stored flat: row i is ``ids[offsets[i]:offsets[i+1]]``."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, types: np.ndarray | None = None) -> None:
        self.ids, self.offsets, self.types = ids, offsets, types

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def with_end(self, token: int) -> Flat:
        """Every row with ``token`` appended."""
        return Flat(np.insert(self.ids, self.offsets[1:], np.int32(token)), _offsets(self.lengths + 1))

    @classmethod
    def join(cls, parts: Sequence[Flat]) -> Flat:
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(1, np.int64))
        ids = np.concatenate([p.ids for p in parts])
        lengths = np.concatenate([p.lengths for p in parts])
        types = np.concatenate([p.types for p in parts]) if all(p.types is not None for p in parts) else None
        return cls(ids, _offsets(lengths), types)

    @classmethod
    def of_lists(cls, rows: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None = None) -> Flat:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        total = int(lengths.sum())
        ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=total)
        tt = (np.fromiter(itertools.chain.from_iterable(types), dtype=np.int8, count=total)
              if types is not None else None)
        return cls(ids, _offsets(lengths), tt)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


class _Progress:
    """A progress bar on the terminal, shown only once the work has taken :data:`PROGRESS_AFTER_S` (``console``: a
    rich console; default stderr, when it is a terminal)."""

    def __init__(self, total: int, what: str, console: Any = None, after_s: float = PROGRESS_AFTER_S) -> None:
        self.total, self.what, self.console, self.after_s = total, what, console, after_s
        self.start, self.done, self.bar, self.task = time.monotonic(), 0, None, None

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is None and time.monotonic() - self.start >= self.after_s and self.done < self.total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            console = self.console or Console(stderr=True)
            if not console.is_terminal:
                self.after_s = math.inf
                return
            self.bar = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=self.total)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def batch_ids(tokenizer: Any, firsts: list[str], pairs: list[str] | None = None, special: bool = True,
              max_len: int | None = None) -> tuple[list[list[int]], list[list[int]] | None]:
    """(ids, segment ids or None) of a batch of texts (or pairs), with or without the tokenizer's special tokens,
    truncated ``longest_first`` to ``max_len`` when given — what ``tokenizer(firsts, pairs, ...)`` gives.

    A fast tokenizer is called through its Rust backend, as transformers' own call does, without building the per-row
    dictionaries transformers adds (half of a plain call's time); its first rows are checked against the plain call,
    which serves whenever they differ or the tokenizer is a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    types = pairs is not None and "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    if backend is not None:
        if max_len is not None:
            backend.enable_truncation(max_len, strategy="longest_first",
                                      direction=getattr(tokenizer, "truncation_side", "right"))
        else:
            backend.no_truncation()
        backend.no_padding()
        batch = list(zip(firsts, pairs)) if pairs is not None else list(firsts)
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        encs = encode(batch, add_special_tokens=special)
        ids = [e.ids for e in encs]
        seg = [e.type_ids for e in encs] if types else None
        k = min(len(ids), 16)
        want_ids, want_seg = _plain_ids(tokenizer, firsts[:k], pairs[:k] if pairs is not None else None, special,
                                        max_len, types)
        if ids[:k] == want_ids and (seg is None or seg[:k] == want_seg):
            return ids, seg
    return _plain_ids(tokenizer, firsts, pairs, special, max_len, types)


def _plain_ids(tokenizer: Any, firsts: list[str], pairs: list[str] | None, special: bool, max_len: int | None,
               types: bool) -> tuple[list[list[int]], list[list[int]] | None]:
    trunc = {"truncation": True, "max_length": max_len} if max_len is not None else {}
    args = (firsts, pairs) if pairs is not None else (firsts,)
    enc = tokenizer(*args, add_special_tokens=special, verbose=False, **trunc)
    return list(enc["input_ids"]), (list(enc["token_type_ids"]) if types and "token_type_ids" in enc else None)


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> Flat:
    """Each text's ids without special tokens, by batched calls of :data:`CHUNK` texts."""
    return Flat.join([Flat.of_lists(batch_ids(tokenizer, list(texts[s : s + CHUNK]), special=False)[0])
                      for s in range(0, len(texts), CHUNK)])


def encode_inputs(tokenizer: Any, firsts: Sequence[str], pairs: Sequence[str] | None, max_len: int | None = None
                  ) -> Flat:
    """A classifier's inputs as the tokenizer encodes them (special tokens, a pair's separator and segment ids),
    truncated to ``max_len`` (``longest_first``) when given; segment ids kept when the tokenizer gives them."""
    parts = []
    for s in range(0, len(firsts), CHUNK):
        ids, seg = batch_ids(tokenizer, list(firsts[s : s + CHUNK]),
                             list(pairs[s : s + CHUNK]) if pairs is not None else None, max_len=max_len)
        parts.append(Flat.of_lists(ids, seg))
    return Flat.join(parts)


BLOCK = 16384  # rows per block of array arithmetic: its int64 index arrays stay small beside the split's arrays


def _within(lengths: np.ndarray) -> np.ndarray:
    """Each token's position within its row, for rows of ``lengths`` laid end to end (int64)."""
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _gather(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``ids[starts[i] : starts[i] + lengths[i]]`` over rows i (one block's worth)."""
    return ids[np.repeat(starts, lengths) + _within(lengths)]


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
    """The tokens of one example (``prefix``: the special tokens in front,
    :func:`fedsim.models.tokenizer.special_ends`)."""
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


def auto_length(lengths: Sequence[int] | np.ndarray, cap: int | None) -> int:
    """``max_seq_len: auto``: the :data:`AUTO_PERCENTILE` th percentile of the training rows' lengths (the shortest
    length that at least that share of rows fits in), rounded up to a multiple of 8, at least 8, at most ``cap`` (the
    model's maximum)."""
    p = float(np.percentile(np.asarray(lengths), AUTO_PERCENTILE, method="inverted_cdf")) if len(lengths) else 8.0
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


def fit_rows(prefix: Sequence[int], prompts: Flat, responses: Flat, max_len: int, drop: bool,
             meta: np.ndarray) -> tuple[TokenizedSplit, SplitStats]:
    """:func:`fit` of every row of a split, as array arithmetic: each row is ``prefix`` + its prompt + its response
    (ending with the end token), cut to ``max_len`` the way :func:`fit` cuts one. ``meta``: (n, 3) each row's
    (label, task, group) codes."""
    lead = len(prefix)
    p, r = prompts.lengths, responses.lengths
    total = lead + p + r
    stats = SplitStats(rows=len(p), longest=int(total.max()) if len(p) else 0)
    keep_rows = total <= max_len if drop else np.ones(len(p), dtype=bool)
    stats.dropped = int((~keep_rows).sum())
    room = max_len - lead - 1  # keep at least one prompt token
    r_kept = np.where(r > room, max(room, 1), r)
    p_kept = np.minimum(p, np.maximum(max_len - lead - r_kept, 1))
    over = total > max_len
    cut_response = r > room
    stats.truncated = int((over & ~cut_response & keep_rows).sum())
    stats.response_cut = int((cut_response & keep_rows).sum())
    idx = np.flatnonzero(keep_rows)
    p, p_kept, r_kept = p[idx], p_kept[idx], r_kept[idx]
    ids = np.concatenate([np.zeros(0, np.int32)] + [
        _assemble(prefix, prompts, responses, idx[b : b + BLOCK], p[b : b + BLOCK], p_kept[b : b + BLOCK],
                  r_kept[b : b + BLOCK]) for b in range(0, len(idx), BLOCK)])
    offsets = _offsets(lead + p_kept + r_kept)
    stats.kept = len(idx)
    m = meta[idx]
    return TokenizedSplit(
        ids=ids, offsets=offsets, prompt_len=(lead + p_kept).astype(np.int32), label=m[:, 0].astype(np.int32),
        task=m[:, 1].astype(np.int32), group=m[:, 2].astype(np.int32),
    ), stats


def _copy_rows(dst: np.ndarray, dst_starts: np.ndarray, src: np.ndarray, src_starts: np.ndarray,
               lengths: np.ndarray) -> None:
    """``dst[dst_starts[i] : +lengths[i]] = src[src_starts[i] : +lengths[i]]`` for every row i, by blocks of
    :data:`BLOCK` rows."""
    for b in range(0, len(lengths), BLOCK):
        n = lengths[b : b + BLOCK]
        within = _within(n)
        dst[np.repeat(dst_starts[b : b + BLOCK], n) + within] = src[np.repeat(src_starts[b : b + BLOCK], n) + within]


def _assemble(prefix: Sequence[int], prompts: Flat, responses: Flat, idx: np.ndarray, p: np.ndarray,
              p_kept: np.ndarray, r_kept: np.ndarray) -> np.ndarray:
    """Rows ``idx`` laid out flat: ``prefix``, the last ``p_kept`` of each prompt's ``p`` tokens, the first ``r_kept``
    of its response's."""
    lead = len(prefix)
    body = _gather(prompts.ids, prompts.offsets[idx] + (p - p_kept), p_kept)  # the prompt loses its start
    resp = _gather(responses.ids, responses.offsets[idx], r_kept)  # the response loses its end
    lengths = lead + p_kept + r_kept
    offsets = _offsets(lengths)
    ids = np.empty(int(offsets[-1]), dtype=np.int32)
    row_of = np.repeat(np.arange(len(idx)), lengths)  # which row each output token belongs to
    pos = np.arange(len(ids), dtype=np.int64) - offsets[:-1][row_of]  # its position within the row
    in_lead = pos < lead
    in_body = ~in_lead & (pos < lead + p_kept[row_of])
    if lead:
        ids[in_lead] = np.asarray(prefix, dtype=np.int32)[pos[in_lead]]
    ids[in_body] = body
    ids[~in_lead & ~in_body] = resp
    return ids


def fit_inputs(tokenizer: Any, texts: Callable[[np.ndarray], tuple[list[str], list[str] | None]], inputs: Flat,
               max_len: int, drop: bool, meta: np.ndarray) -> tuple[TokenizedSplit, SplitStats]:
    """A classifier's split: rows that fit as encoded; a longer row encoded again truncated by the tokenizer
    (``longest_first``: a pair keeps both texts' starts and its separators), or dropped. The whole input is the
    prompt. ``texts``: the (first texts, second texts or None) of the rows at the given indices."""
    lengths = inputs.lengths
    stats = SplitStats(rows=len(lengths), longest=int(lengths.max()) if len(lengths) else 0)
    over = lengths > max_len
    keep_rows = ~over if drop else np.ones(len(lengths), dtype=bool)
    stats.dropped = int((~keep_rows).sum())
    stats.truncated = int((over & keep_rows).sum())
    long_rows = np.flatnonzero(over & keep_rows)
    idx = np.flatnonzero(keep_rows)
    if len(idx) == len(lengths) and not len(long_rows):  # every row as encoded: the arrays as they are
        flat = inputs
    else:  # the kept rows copied into place; the few over the length encoded again as the tokenizer truncates them
        cut = encode_inputs(tokenizer, *texts(long_rows), max_len) if len(long_rows) else None
        lens = lengths.copy()
        if cut is not None:
            lens[long_rows] = cut.lengths
        offsets = _offsets(lens[idx])
        at = np.full(len(lengths), -1, dtype=np.int64)
        at[idx] = offsets[:-1]  # where each kept row starts in the output
        plain = idx[~np.isin(idx, long_rows)]
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        types = np.zeros(len(ids), dtype=np.int8) if inputs.types is not None else None
        _copy_rows(ids, at[plain], inputs.ids, inputs.offsets[plain], lengths[plain])
        if types is not None:
            _copy_rows(types, at[plain], inputs.types, inputs.offsets[plain], lengths[plain])
        if cut is not None:
            _copy_rows(ids, at[long_rows], cut.ids, cut.offsets[:-1], cut.lengths)
            if types is not None and cut.types is not None:
                _copy_rows(types, at[long_rows], cut.types, cut.offsets[:-1], cut.lengths)
        flat = Flat(ids, offsets, types)
    stats.kept = len(idx)
    m = meta[idx]
    token_type = flat.types if flat.types is not None and flat.types.any() else None
    return TokenizedSplit(
        ids=flat.ids.astype(np.int32, copy=False), offsets=flat.offsets, prompt_len=flat.lengths.astype(np.int32),
        label=m[:, 0].astype(np.int32), task=m[:, 1].astype(np.int32), group=m[:, 2].astype(np.int32),
        token_type=token_type,
    ), stats
