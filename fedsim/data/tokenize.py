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
from collections.abc import Sequence
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


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens ``tokenizer(text)`` puts in front of a text ([BOS] for Llama, [CLS] for BERT, [] for GPT-2
    and the byte-level tokenizer)."""
    from fedsim.models.tokenizer import special_ends

    return special_ends(tokenizer)[0]


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


def encode_texts(tokenizer: Any, texts: Sequence[str], progress: _Progress | None = None) -> Flat:
    """Each text's ids without special tokens, by batched calls of :data:`CHUNK` texts."""
    parts = []
    for s in range(0, len(texts), CHUNK):
        chunk = list(texts[s : s + CHUNK])
        parts.append(Flat.of_lists(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]))
        if progress is not None:
            progress.advance(len(chunk))
    return Flat.join(parts)


def encode_inputs(tokenizer: Any, firsts: Sequence[str], pairs: Sequence[str] | None, max_len: int | None = None,
                  progress: _Progress | None = None) -> Flat:
    """A classifier's inputs as the tokenizer encodes them (special tokens, a pair's separator and segment ids),
    truncated to ``max_len`` (``longest_first``) when given; segment ids kept when the tokenizer gives them."""
    parts = []
    trunc = {"truncation": True, "max_length": max_len} if max_len is not None else {}
    for s in range(0, len(firsts), CHUNK):
        a = list(firsts[s : s + CHUNK])
        b = list(pairs[s : s + CHUNK]) if pairs is not None else None
        enc = tokenizer(a, b, verbose=False, **trunc) if b is not None else tokenizer(a, verbose=False, **trunc)
        types = enc.get("token_type_ids") if pairs is not None else None
        parts.append(Flat.of_lists(enc["input_ids"], types))
        if progress is not None:
            progress.advance(len(a))
    return Flat.join(parts)


def gather(flat: Flat, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``flat.ids[starts[i] : starts[i] + lengths[i]]`` over rows i (vectorized)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int32)
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return flat.ids[np.arange(total, dtype=np.int64) + shift]


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
    p, r, p_kept, r_kept = p[idx], r[idx], p_kept[idx], r_kept[idx]
    body = gather(prompts, prompts.offsets[idx] + (p - p_kept), p_kept)  # the prompt loses its start
    resp = gather(responses, responses.offsets[idx], r_kept)  # the response loses its end
    lengths = lead + p_kept + r_kept
    offsets = _offsets(lengths)
    ids = np.empty(int(offsets[-1]), dtype=np.int32)
    row_of = np.repeat(np.arange(len(idx)), lengths)  # which row each output token belongs to
    pos = np.arange(len(ids), dtype=np.int64) - offsets[:-1][row_of]  # its position within the row
    in_lead = pos < lead
    in_body = ~in_lead & (pos < lead + p_kept[row_of])
    ids[in_lead] = np.asarray(prefix, dtype=np.int32)[pos[in_lead]] if lead else 0
    ids[in_body] = body
    ids[~in_lead & ~in_body] = resp
    stats.kept = len(idx)
    m = meta[idx]
    return TokenizedSplit(
        ids=ids, offsets=offsets, prompt_len=(lead + p_kept).astype(np.int32), label=m[:, 0].astype(np.int32),
        task=m[:, 1].astype(np.int32), group=m[:, 2].astype(np.int32),
    ), stats


def fit_inputs(tokenizer: Any, firsts: Sequence[str], pairs: Sequence[str] | None, inputs: Flat, max_len: int,
               drop: bool, meta: np.ndarray) -> tuple[TokenizedSplit, SplitStats]:
    """A classifier's split: rows that fit as encoded; a longer row encoded again truncated by the tokenizer
    (``longest_first``: a pair keeps both texts' starts and its separators), or dropped. The whole input is the
    prompt."""
    lengths = inputs.lengths
    stats = SplitStats(rows=len(lengths), longest=int(lengths.max()) if len(lengths) else 0)
    over = lengths > max_len
    keep_rows = ~over if drop else np.ones(len(lengths), dtype=bool)
    stats.dropped = int((~keep_rows).sum())
    stats.truncated = int((over & keep_rows).sum())
    starts, lens = inputs.offsets[:-1].copy(), lengths.copy()
    source = inputs
    long_rows = np.flatnonzero(over & keep_rows)
    if len(long_rows):  # the few rows over the length, encoded again as the tokenizer truncates them
        cut = encode_inputs(tokenizer, [firsts[i] for i in long_rows],
                            [pairs[i] for i in long_rows] if pairs is not None else None, max_len)
        types = (np.concatenate([inputs.types, cut.types])
                 if inputs.types is not None and cut.types is not None else None)
        source = Flat(np.concatenate([inputs.ids, cut.ids]), inputs.offsets, types)
        starts[long_rows], lens[long_rows] = cut.offsets[:-1] + len(inputs.ids), cut.lengths
    idx = np.flatnonzero(keep_rows)
    starts, lens = starts[idx], lens[idx]
    types = gather(Flat(source.types, source.offsets), starts, lens) if source.types is not None else None
    flat = Flat(gather(source, starts, lens), _offsets(lens), types)
    stats.kept = len(idx)
    m = meta[idx]
    token_type = flat.types if flat.types is not None and flat.types.any() else None
    return TokenizedSplit(
        ids=flat.ids.astype(np.int32, copy=False), offsets=flat.offsets, prompt_len=flat.lengths.astype(np.int32),
        label=m[:, 0].astype(np.int32), task=m[:, 1].astype(np.int32), group=m[:, 2].astype(np.int32),
        token_type=token_type,
    ), stats
