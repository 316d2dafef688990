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

from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

import torch

from fedsim.pipeline.stages import ServerStage, StageResult, with_shared
from fedsim.types import ClientUpdate, GlobalState, RoundContext, Tensors

METHODS = ("median", "trimmed_mean", "krum", "multi_krum", "norm_bound")


def stacked(updates: Sequence[ClientUpdate], key: str) -> torch.Tensor:
    """The clients' values of one tensor, stacked as they are (float32): (n, *shape)."""
    return torch.stack([u.tensors[key].detach() for u in updates])


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Median over dim 0; the mean of the two middle values when the count is even (``numpy.median``), in float64.
    By selection, not a full sort: ``torch.median`` gives the lower middle value; for an even count the upper one is
    the smallest value above it — or the lower one itself when it occurs often enough."""
    n = x.shape[0]
    lower = torch.median(x, dim=0).values
    if n % 2:
        return lower.to(torch.float64)
    above = torch.where(x > lower, x, torch.full_like(x, float("inf"))).min(dim=0).values
    upper = torch.where((x <= lower).sum(dim=0) >= n // 2 + 1, lower, above)
    return (lower.to(torch.float64) + upper.to(torch.float64)) / 2


def trimmed_mean(x: torch.Tensor, trim: float) -> torch.Tensor:
    """Mean over dim 0 of what is left after dropping the ⌊trim·n⌋ largest and smallest values per coordinate, in
    float64: the sum less the k largest and the k smallest (``topk``), not a full sort."""
    n = x.shape[0]
    k = int(trim * n)
    total = x.to(torch.float64).sum(dim=0)
    if k:
        total -= x.topk(k, dim=0).values.to(torch.float64).sum(dim=0)
        total -= x.topk(k, dim=0, largest=False).values.to(torch.float64).sum(dim=0)
    return total / (n - 2 * k)


def krum_scores(blocks: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """Each update's Krum score — the sum of squared distances to its n − f − 2 nearest others — from its flattened
    tensors ``blocks`` (each (n, d_k)): squared distances ‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩ from Gram matrices summed
    over the blocks, in float64 (no (n, Σd) copy of every update). Returns (n,)."""
    n = blocks[0].shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for b in blocks:
        b = b.to(torch.float64)
        gram += b @ b.T
    sq = gram.diagonal()
    d = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    d.fill_diagonal_(float("inf"))
    return d.sort(dim=1).values[:, : n - f - 2].sum(dim=1)


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
            chosen = krum_scores([stacked(updates, k).flatten(1) for k in keys], self.f).argsort()[:m]
            self._metrics = {"robust/selected": float(m)}
            self._robust = {k: stacked([updates[int(i)] for i in chosen], k).to(torch.float64).mean(dim=0)
                            for k in keys}
            return StageResult(list(updates))
        reduce = coordinate_median if self.method == "median" else (lambda x: trimmed_mean(x, self.trim))
        self._robust = {k: reduce(stacked(updates, k)) for k in keys}
        return StageResult(list(updates))

    def _bounded(self, state: GlobalState, updates: Sequence[ClientUpdate], keys: list[str]) -> list[ClientUpdate]:
        """Each update with its change of the shared tensors clipped to ``max_norm`` (float64 norm)."""
        out, clipped = [], 0
        start = {k: state.tensors[k].to(torch.float64) for k in keys}
        for u in updates:
            delta = {k: u.tensors[k].to(torch.float64) - start[k] for k in keys}
            norm = float(torch.sqrt(sum((d * d).sum() for d in delta.values())))
            if norm > self.max_norm:
                clipped += 1
                scale = self.max_norm / norm
                tensors = {**u.tensors, **{k: (start[k] + delta[k] * scale).to(u.tensors[k].dtype) for k in keys}}
                u = replace(u, tensors=tensors)
            out.append(u)
        self._metrics = {"robust/clipped": float(clipped)}
        return out

    def after(self, ctx: RoundContext, old: GlobalState, new: GlobalState) -> tuple[GlobalState, dict[str, float]]:
        metrics, robust = self._metrics, self._robust
        self._robust, self._metrics = None, {}
        return (new if robust is None else with_shared(new, robust)), metrics
