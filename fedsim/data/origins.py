"""Where each data row came from — the file (or hub split) and its row there — so that an error about a row names
what a user can open, not the row's place in a shuffled train/test split.

Rows are read source by source into one list (:mod:`fedsim.data.sources`); an :class:`Origins` keeps, for each row of
a list derived from it (cut, split, shuffled), its position in what was read, and turns a position into words only
when an error needs them (:meth:`Origins.name`): a file read together with others is then counted on its own.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Part:
    """One source as read: ``count`` rows from position ``start`` of the rows read.

    Attributes:
        setting: the scenario key that names it (``data.source``, ``data.sources.mr.test_source``).
        source: what the key gives: a hub id, ``synthetic``.
        files: the local files read, in order (empty for hub or synthetic data).
        split: a hub data set's split.
    """

    setting: str
    source: str
    count: int
    files: tuple[str, ...] = ()
    split: str | None = None
    count_file: Callable[[str], int] | None = field(default=None, repr=False)  # a file's rows, read on its own
    start: int = 0
    _per_file: list[int] | None = field(default=None, repr=False)

    def name(self, k: int) -> str:
        """Row ``k`` (from 0) of this source, in words."""
        if not self.files:
            if self.source in ("synthetic", ""):
                return f"{self.setting}{' (synthetic)' if self.source else ''} row {k + 1}"
            split = f", split {self.split!r}" if self.split else ""
            return f"{self.setting} (hub data set {self.source!r}{split}) row {k + 1}"
        path, n = self.files[0], k
        if len(self.files) > 1:
            counts = self.per_file()
            i = 0
            while i < len(counts) - 1 and n >= counts[i]:
                n -= counts[i]
                i += 1
            path = self.files[i]
        line = _jsonl_line(path, n) if path.lower().endswith(".jsonl") else None
        return f"{path} row {n + 1}" + (f" (line {line})" if line is not None and line != n + 1 else "")

    def per_file(self) -> list[int]:
        """Rows in each file, each read on its own (only for an error's words: a multi-file source is read at once)."""
        if self._per_file is None:
            assert self.count_file is not None, "a source of several files counts each file's rows"
            self._per_file = [self.count_file(f) for f in self.files]
        return self._per_file


def _jsonl_line(path: str, k: int) -> int | None:
    """The line (from 1) of a JSON-lines file's row ``k`` (from 0): blank lines hold no row."""
    try:
        with open(path, encoding="utf-8") as f:
            seen = -1
            for n, line in enumerate(f, start=1):
                if line.strip():
                    seen += 1
                    if seen == k:
                        return n
    except OSError:
        return None
    return None


class Place:
    """A row's place in words, made only when shown (an f-string of it): rows checked by the thousand cost nothing."""

    __slots__ = ("origins", "i")

    def __init__(self, origins: Origins, i: int) -> None:
        self.origins, self.i = origins, i

    def __str__(self) -> str:
        return self.origins.name(self.i)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class Origins:
    """For each row of a list, the source it was read from and its row there.

    Args:
        parts: the sources read, in order (their ``start`` set by :meth:`of`).
        index: each row's position among the rows read (by default, the rows read in order).
    """

    def __init__(self, parts: Sequence[Part], index: np.ndarray | None = None) -> None:
        self.parts = list(parts)
        self._starts = [p.start for p in self.parts]
        total = sum(p.count for p in self.parts)
        self.index = np.arange(total, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)

    @classmethod
    def of(cls, parts: Sequence[Part]) -> Origins:
        """The origins of the parts' rows read one part after another."""
        start = 0
        for p in parts:
            p.start = start
            start += p.count
        return cls(parts)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows: Any) -> Origins:
        """The origins of the rows at positions ``rows`` (a slice, or indices) of this list."""
        return Origins(self.parts, self.index[rows])

    def name(self, i: int) -> str:
        """Row ``i`` of this list, in words: ``path row 4 (line 5)``, or the hub data set and split."""
        pos = int(self.index[i])
        part = self.parts[bisect.bisect_right(self._starts, pos) - 1]
        return part.name(pos - part.start)

    def at(self, i: int) -> Place:
        """Row ``i``'s place, put into words when shown."""
        return Place(self, i)


def numbered(where: str, n: int) -> Origins:
    """Origins for rows that were not read from a source (built in code): ``where`` row 1 … n."""
    return Origins.of([Part(setting=where, source="", count=n)])
