"""Streaming aggregation: the running sums a reduction strategy folds each update into.

A strategy whose aggregation is a reduction — weighted sums of factors, of products, stacked factors — sets
``streams = True`` and implements :meth:`~fedsim.strategies.Strategy.fold` (add one update to a :class:`Partial`)
and :meth:`~fedsim.strategies.Strategy.finish` (the new state from the sums). The server then holds one update at a
time, never the round's; partials of disjoint sets of clients :meth:`Partial.merge` into the partial of their union,
so a worker can fold the clients it trained before anything reaches the server.

What a partial holds, all keyed by name:

- ``sums``: Σ w·x in float64 (a tensor of the state's shape; an update of a smaller rank adds into a slice): sample
  counts as weights and the division at the end lose nothing (one client's mean is its update, bit for bit), and the
  result rounded to float32 does not depend on the order the updates arrived in;
- ``totals``: Σ w, float64 scalars (the weights' denominators, divided out in ``finish``);
- ``blocks``: per module, the (client id, c·B, A) factor blocks of stacking methods — kept in client-id order at the
  end, so the stacked factors do not depend on the order updates arrived in;
- ``dense``: per module, Σ c·B A as dense (d_out, d_in) float32, filled by flushing blocks (:meth:`flush`) in GEMMs
  of up to 256 columns — the waiting factors never outweigh the dense sum, and a flush is wide enough for the GEMM to
  run near the machine's peak (flushing every 32 columns, as before, made FLoRA's 500-update round 1.3× as long on a
  quiet 2-core machine and 2.3× on a busy one: benchmarks/results/aggregation.md);
- ``notes``: small per-client values a strategy keeps (HETLoRA's pruned ranks), and ``clients``: who is folded in.

Dense product sums are float32 (they have the layers' size): they depend on the order updates arrive in by float32
rounding only (≤ 1e-6 relative).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.types import Tensors

FLUSH_COLUMNS = 256  # a dense product sum takes its waiting blocks in one GEMM of this many columns (or its own size)


@dataclass
class Partial:
    """One round's running sums over a set of clients (see the module docstring)."""

    server_round: int
    base_version: int
    sums: Tensors = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)
    blocks: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    dense: Tensors = field(default_factory=dict)
    notes: dict[str, dict[int, Any]] = field(default_factory=dict)
    clients: list[int] = field(default_factory=list)

    # -- folding ------------------------------------------------------------------------------------------------
    def add(self, key: str, value: torch.Tensor, weight: float, shape: tuple[int, ...] | None = None,
            rows: int | None = None, cols: int | None = None) -> None:
        """sums[key] += weight · value; with ``shape`` the sum has that shape and ``value`` lands in its first
        ``rows`` rows or ``cols`` columns (an update of a smaller rank, zero-padded without a padded copy)."""
        acc = self.sums.get(key)
        if acc is None:
            acc = self.sums[key] = torch.zeros(shape or value.shape, dtype=torch.float64)
            self.dtypes[key] = value.dtype
        target = acc if rows is None and cols is None else (acc[:rows] if rows is not None else acc[:, :cols])
        target.add_(value, alpha=weight)

    def add_all(self, tensors: Tensors, weight: float) -> None:
        """sums[key] += weight · tensors[key] for every key, by one fused multi-tensor kernel (float32 into float64:
        ~26 ms for the 14M values of a 1.1B model's rank-16 update on one core, against ~34 ms one tensor at a
        time)."""
        keys = list(tensors)
        for k in keys:
            if k not in self.sums:
                self.sums[k], self.dtypes[k] = torch.zeros(tensors[k].shape, dtype=torch.float64), tensors[k].dtype
        bad = next((k for k in keys if self.sums[k].shape != tensors[k].shape), None)
        if bad is not None:
            raise AggregationError(f"{bad} has shape {tuple(tensors[bad].shape)}, the round's sum "
                                   f"{tuple(self.sums[bad].shape)}")
        torch._foreach_add_([self.sums[k] for k in keys], [tensors[k] for k in keys], alpha=weight)

    def count(self, name: str, weight: float) -> None:
        """totals[name] += weight."""
        self.totals[name] = self.totals.get(name, 0.0) + float(weight)

    def stack(self, module: str, client_id: int, b: torch.Tensor, a: torch.Tensor, coef: float) -> None:
        """Keep coef·B (d_out, r) and A (r, d_in) of one client for stacking or a product sum."""
        self.blocks.setdefault(module, []).append(
            (client_id, b.to(torch.float32).mul(coef), a.to(torch.float32)))

    def product(self, module: str, client_id: int, b: torch.Tensor, a: torch.Tensor, coef: float,
                stacked_until: float = 0.0) -> None:
        """Fold coef·B A of one client into the module's product sum: kept as blocks while their total width stays
        within ``stacked_until`` (stacking methods return them as they are), else summed densely — the blocks flushed
        by one GEMM whenever they reach 256 columns or the dense sum's own size (so waiting factors cost at most what
        the sum does)."""
        self.stack(module, client_id, b, a, coef)
        width = self.width(module)
        if module not in self.dense and width <= stacked_until:
            return
        d_out, d_in = b.shape[0], a.shape[1]
        if module not in self.dense or width * (d_out + d_in) >= d_out * d_in or width >= FLUSH_COLUMNS:
            self.flush(module)

    def width(self, module: str) -> int:
        """Columns of the blocks waiting for ``module``."""
        return sum(b.shape[1] for _, b, _ in self.blocks.get(module, ()))

    def flush(self, module: str) -> None:
        """dense[module] += the waiting blocks' product (one GEMM over them, in client-id order); blocks emptied."""
        blocks = sorted(self.blocks.pop(module, []), key=lambda x: x[0])
        if not blocks:
            return
        b_s = torch.cat([b for _, b, _ in blocks], dim=1)
        a_s = torch.cat([a for _, _, a in blocks], dim=0)
        if module in self.dense:
            self.dense[module].addmm_(b_s, a_s)
        else:
            self.dense[module] = b_s @ a_s

    def note(self, name: str, client_id: int, value: Any) -> None:
        self.notes.setdefault(name, {})[client_id] = value

    def joined(self, client_id: int) -> None:
        if client_id in self.clients:
            raise AggregationError(f"client {client_id} was folded into the round's aggregate twice")
        self.clients.append(client_id)

    # -- reading ------------------------------------------------------------------------------------------------
    def mean(self, key: str, total: str = "w") -> torch.Tensor:
        """sums[key] / totals[total], in the dtype the values came in."""
        return (self.sums[key] / self.denominator(total)).to(self.dtypes[key])

    def denominator(self, total: str = "w") -> float:
        value = self.totals.get(total, 0.0)
        if value <= 0:
            raise AggregationError("client weights sum to zero: every update has num_examples == 0")
        return value

    def stacked(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """B_s (d_out, Σr) and A_s (Σr, d_in) of the waiting blocks, in client-id order."""
        blocks = sorted(self.blocks.get(module, []), key=lambda x: x[0])
        return torch.cat([b for _, b, _ in blocks], dim=1), torch.cat([a for _, _, a in blocks], dim=0)

    # -- combining ----------------------------------------------------------------------------------------------
    def merge(self, other: Partial) -> Partial:
        """This partial with ``other``'s clients folded in (disjoint clients, the same round and base version);
        in place, and returned."""
        if (other.server_round, other.base_version) != (self.server_round, self.base_version):
            raise AggregationError(f"a partial of round {other.server_round} (base version {other.base_version}) "
                                   f"cannot join round {self.server_round} (base version {self.base_version})")
        for cid in other.clients:
            self.joined(cid)
        for k, v in other.sums.items():
            if k in self.sums:
                self.sums[k].add_(v)
            else:
                self.sums[k], self.dtypes[k] = v, other.dtypes[k]
        for k, v in other.totals.items():
            self.count(k, v)
        for m, blocks in other.blocks.items():
            self.blocks.setdefault(m, []).extend(blocks)
        for m, v in other.dense.items():
            if m in self.dense:
                self.dense[m].add_(v)
            else:
                self.dense[m] = v
        for name, values in other.notes.items():
            self.notes.setdefault(name, {}).update(values)
        return self

    def num_bytes(self) -> int:
        """Bytes of the tensors held (what a partial costs to send)."""
        blocks = sum(b.numel() * 4 + a.numel() * 4 for bl in self.blocks.values() for _, b, a in bl)
        return ops.num_bytes(self.sums) + ops.num_bytes(self.dense) + blocks
