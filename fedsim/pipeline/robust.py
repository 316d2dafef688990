"""Robust aggregation (``strategy.robust``): server-side stages that bound what a few malicious clients can do to the
global adapter of an averaging strategy (FedIT, FFA-LoRA, FedSA-LoRA, HETLoRA at one rank).

- ``median``: the coordinate-wise median of the clients' shared tensors (the mean of the two middle values for an even
  count, as ``numpy.median``) — Yin et al., ICML 2018.
- ``trimmed_mean``: per coordinate, the mean after dropping the ``⌊trim·n⌋`` largest and smallest values — Yin et al.
- ``krum`` / ``multi_krum``: each update scored by the sum of squared distances to its ``n − f − 2`` nearest
  neighbours (``f``: the Byzantine clients tolerated); Krum keeps the best one, Multi-Krum the ``select`` best and
  averages them uniformly — Blanchard et al., NeurIPS 2017.
- ``norm_bound``: each update's change of the shared tensors (what it uploads minus the global value) clipped to
  ``max_norm`` before the strategy's own weighted average — Sun et al., 2019 ("Can you really backdoor FL?").

The reductions run in float64 on the flattened shared tensors and replace the strategy's average of those tensors in
the new state; what the strategy keeps besides them (FFA-LoRA's frozen A, a personal part) is untouched. Every update
still counts as uploaded and aggregated; Krum reports how many it selected (``robust/selected``), norm bounding how many
it clipped (``robust/clipped``). A round with too few updates for Krum's ``f`` (after failures) leaves the global
adapter unchanged and says so (``robust/skipped``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import ClassVar

import numpy as np
import torch

from fedsim.pipeline.stages import ServerStage, StageResult, with_shared
from fedsim.types import ClientUpdate, GlobalState, RoundContext, Tensors

METHODS = ("median", "trimmed_mean", "krum", "multi_krum", "norm_bound")


def rows(updates: Sequence[ClientUpdate], key: str) -> torch.Tensor:
    """The clients' values of one tensor as (n, numel) float32, one update per row."""
    return torch.stack([u.tensors[key].detach().flatten() for u in updates])


def columns(updates: Sequence[ClientUpdate], key: str) -> torch.Tensor:
    """The clients' values of one tensor as (numel, n) float32, each coordinate's n values contiguous — the layout in
    which per-coordinate selection (median, top-k) reads memory in order."""
    return torch.stack([u.tensors[key].detach().flatten() for u in updates], dim=1)


def partitioned(x: torch.Tensor, kth: Sequence[int]) -> np.ndarray:
    """``numpy.partition(x, kth, axis=-1)`` of a (d, n) float32 tensor: each row's values at the ``kth`` positions are
    those a sort would put there, smaller ones before, larger after — selection, not a sort. Rows are split over
    torch's thread count (numpy's selection releases the GIL)."""
    a = x.numpy()
    threads = max(1, min(torch.get_num_threads(), len(a) // 4096))
    if threads == 1:
        return np.partition(a, kth, axis=-1)
    with ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(lambda part: np.partition(part, kth, axis=-1),
                                            np.array_split(a, threads))))


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Median over the last dim of (d, n); the mean of the two middle values when n is even (``numpy.median``), in
    float64."""
    n = x.shape[-1]
    mid = [n // 2] if n % 2 else [n // 2 - 1, n // 2]
    p = partitioned(x, mid)
    return torch.from_numpy(p[:, mid].astype(np.float64).mean(axis=-1))


def trimmed_mean(x: torch.Tensor, trim: float) -> torch.Tensor:
    """Mean over the last dim of (d, n) of what is left after dropping the ⌊trim·n⌋ largest and smallest values per
    coordinate, in float64 (by selection of the two cut points, not a sort)."""
    n = x.shape[-1]
    k = int(trim * n)
    if not k:
        return x.sum(dim=-1, dtype=torch.float64) / n
    p = partitioned(x, [k, n - k - 1])
    return torch.from_numpy(p[:, k : n - k].sum(axis=-1, dtype=np.float64) / (n - 2 * k))


def krum_scores(blocks: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """Each update's Krum score — the sum of squared distances to its n − f − 2 nearest others — from its flattened
    tensors ``blocks`` (each (n, d_k)): squared distances ‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩ from Gram matrices summed
    over the blocks in float64 (no (n, Σd) copy of every update). Distances do not change when every update moves by
    the same vector, so each block is centred on its mean first: the float32 products then carry the differences
    between updates, not their common part. Returns (n,)."""
    n = blocks[0].shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for b in blocks:
        b = b - b.mean(dim=0)
        gram += (b @ b.T).to(torch.float64)
    sq = gram.diagonal()
    d = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    d.fill_diagonal_(float("inf"))
    return d.sort(dim=1).values[:, : n - f - 2].sum(dim=1)


def change_norms(updates: Sequence[ClientUpdate], start: Tensors, keys: Sequence[str]
                 ) -> Iterator[tuple[list[torch.Tensor], float]]:
    """Per update, one at a time: its changes of ``keys`` from ``start`` (float32, in ``keys`` order) and the norm of
    them all together (per-tensor norms by fused multi-tensor kernels, combined in float64)."""
    base = [start[k] for k in keys]
    for u in updates:
        delta = torch._foreach_sub([u.tensors[k].to(torch.float32) for k in keys], base)
        yield delta, float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(delta)).to(torch.float64)))


class RobustAggregation(ServerStage):
    """One of :data:`METHODS` around an averaging strategy's aggregation (see the module's docstring).

    Args:
        method: the rule; trim: the share cut at each end (``trimmed_mean``); byzantine: ``f`` (Krum);
        select: how many Multi-Krum averages; max_norm: the bound on each update's change (``norm_bound``).
    """

    metric_keys: ClassVar[tuple[str, ...]] = ("robust/selected", "robust/clipped", "robust/skipped")

    def __init__(self, method: str, trim: float = 0.1, byzantine: int = 1, select: int = 1,
                 max_norm: float | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown robust aggregation {method!r}; choose from {', '.join(METHODS)}")
        self.method, self.trim, self.f, self.select, self.max_norm = method, trim, byzantine, select, max_norm
        self._robust: Tensors | None = None
        self._metrics: dict[str, float] = {}

    def before(self, ctx: RoundContext, state: GlobalState, updates: Sequence[ClientUpdate]) -> StageResult:
        self._robust, self._metrics = None, {}
        if not updates:
            return StageResult(list(updates))
        keys = sorted(updates[0].tensors)
        if self.method == "norm_bound":
            return StageResult(self._bounded(state, updates, keys))
        if self.method in ("krum", "multi_krum"):
            if len(updates) <= 2 * self.f + 2:
                self._metrics = {"robust/skipped": 1.0}
                self._robust = {k: state.tensors[k] for k in keys}  # the round leaves the shared tensors as they were
                return StageResult(list(updates))
            m = 1 if self.method == "krum" else min(self.select, len(updates))
            chosen = krum_scores([rows(updates, k) for k in keys], self.f).argsort()[:m]
            self._metrics = {"robust/selected": float(m)}
            self._robust = {k: rows([updates[int(i)] for i in chosen], k).sum(dim=0, dtype=torch.float64).div(m)
                            .view(updates[0].tensors[k].shape) for k in keys}
            return StageResult(list(updates))
        reduce = coordinate_median if self.method == "median" else (lambda x: trimmed_mean(x, self.trim))
        self._robust = {k: reduce(columns(updates, k)).view(updates[0].tensors[k].shape) for k in keys}
        return StageResult(list(updates))

    def _bounded(self, state: GlobalState, updates: Sequence[ClientUpdate], keys: list[str]) -> list[ClientUpdate]:
        """Each update with its change of the shared tensors clipped to ``max_norm``."""
        out, clipped = [], 0
        start = {k: state.tensors[k].to(torch.float32) for k in keys}
        for u, (delta, norm) in zip(updates, change_norms(updates, start, keys)):
            if norm > self.max_norm:
                clipped += 1
                scaled = torch._foreach_add(list(start.values()), delta, alpha=self.max_norm / norm)
                u = replace(u, tensors={**u.tensors, **{k: t.to(u.tensors[k].dtype) for k, t in zip(keys, scaled)}})
            out.append(u)
        self._metrics = {"robust/clipped": float(clipped)}
        return out

    def after(self, ctx: RoundContext, old: GlobalState, new: GlobalState) -> tuple[GlobalState, dict[str, float]]:
        metrics, robust = self._metrics, self._robust
        self._robust, self._metrics = None, {}
        return (new if robust is None else with_shared(new, robust)), metrics
