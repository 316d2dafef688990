"""The model a run leaves behind, as one LoRA adapter: every update merged into the base during the run (FLoRA's
stacked factors, FedEx-LoRA's residuals) plus the final adapter, exactly.

Strategies that merge into the base start every round from a fresh adapter, so their final adapter alone holds
little of what the federation learned. The exported adapter is, per module, the total
``T = Σ_v ΔW_v + s·B·A`` written as one LoRA at scaling 1 (``alpha = r`` per module): through QR of the stacked
factors and the SVD of a small core when their width is below the layer's, else the eigendecomposition of the dense
``T``'s Gram matrix (:func:`fedsim.lora.ops.singular_form`, as FlexLoRA's aggregation); each factor carries ``√S``. Components whose singular value is below ``1e-7·s_max`` are dropped (an error of the order of
float32 rounding), so each module's rank is the numerical rank of its total, at most ``min(d_out, d_in)``; PEFT's
``rank_pattern`` / ``alpha_pattern`` give every module its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedsim.lora import ops
from fedsim.types import LoraSpec, Tensors

RELATIVE_CUTOFF = 1e-7


@dataclass
class ExportedAdapter:
    """An adapter in PEFT's layout: ``tensors`` keyed like the simulator's (``<module>.lora_A.weight`` …), the default
    ``lora`` and, where modules differ from it, per-module ranks and alphas (keys: escaped module paths); ``head``: a
    model task's head trained in full (``head.<module>.<parameter>``; PEFT's ``modules_to_save``)."""

    tensors: Tensors
    lora: LoraSpec
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    head: Tensors = field(default_factory=dict)


def complete_adapter(tensors: Tensors, lora: LoraSpec, deltas: Sequence[Tensors]) -> ExportedAdapter:
    """The final adapter with the base deltas folded in (unchanged when there are none).

    Args:
        tensors: the final global adapter (PEFT orientation: B (d_out, r), A (r, d_in)).
        lora: its rank and scaling.
        deltas: the updates merged into the base, oldest first: per module ``<module>.delta_B`` (d_out, R) and
            ``<module>.delta_A`` (R, d_in), or a dense ``<module>.delta_W`` (d_out, d_in).
    """
    if not deltas:
        return ExportedAdapter(dict(tensors), lora)
    return combine([(tensors, lora.scaling)], deltas)


def combine(adapters: Sequence[tuple[Tensors, float]], deltas: Sequence[Tensors] = ()) -> ExportedAdapter:
    """Σ deltas + Σ_j c_j B_j A_j per module, as one LoRA at scaling 1 (see the module's docstring)."""
    out: Tensors = {}
    ranks: dict[str, int] = {}
    names = {m for d in deltas for m in ops.delta_modules(d)}
    for tensors, _ in adapters:
        names |= set(ops.modules(tensors))
    for m in sorted(names):
        bs = [d[f"{m}.delta_B"].float() for d in deltas if f"{m}.delta_B" in d]
        as_ = [d[f"{m}.delta_A"].float() for d in deltas if f"{m}.delta_A" in d]
        dense = [d[f"{m}.delta_W"].float() for d in deltas if f"{m}.delta_W" in d]
        for tensors, c in adapters:
            if ops.b_key(m) in tensors and c != 0:
                bs.append(c * tensors[ops.b_key(m)].float())
                as_.append(tensors[ops.a_key(m)].float())
        if not bs and not dense:  # every contribution weighted 0: one zero component
            any_t = next(t for t, _ in adapters if ops.b_key(m) in t)
            out[ops.b_key(m)] = torch.zeros_like(any_t[ops.b_key(m)][:, :1]).float()
            out[ops.a_key(m)] = torch.zeros_like(any_t[ops.a_key(m)][:1]).float()
            ranks[m] = 1
            continue
        shape = dense[0].shape if dense else (bs[0].shape[0], as_[0].shape[1])
        if dense or sum(b.shape[1] for b in bs) >= min(shape):
            total = sum(dense, torch.zeros(shape))
            if bs:
                total = total + torch.cat(bs, 1) @ torch.cat(as_, 0)
            u, sa = ops.dense_singular_form(total)
        else:
            u, sa = ops.singular_form(torch.cat(bs, 1), torch.cat(as_, 0))
        s = sa.double().norm(dim=1)  # (U, S Vᵀ): the singular values are the rows' norms
        k = max(1, int((s > RELATIVE_CUTOFF * float(s.max())).sum()))
        root = s[:k].clamp_min(1e-30).sqrt()
        out[ops.b_key(m)] = (u[:, :k].double() * root).float().contiguous()
        out[ops.a_key(m)] = (sa[:k].double() / root[:, None]).float().contiguous()
        ranks[m] = k
    top = max(ranks.values())
    patterns = {re.escape(m): r for m, r in ranks.items() if r != top}
    return ExportedAdapter(out, LoraSpec(rank=top, alpha=float(top)), rank_pattern=patterns,
                           alpha_pattern={p: float(r) for p, r in patterns.items()})


def dense_totals(adapters: Sequence[tuple[Tensors, float]]) -> dict[str, torch.Tensor]:
    """Σ_j c_j B_j A_j per module, dense (d_out, d_in), float64."""
    out: dict[str, torch.Tensor] = {}
    for tensors, c in adapters:
        for m in ops.modules(tensors):
            dw = c * tensors[ops.b_key(m)].double() @ tensors[ops.a_key(m)].double()
            out[m] = out[m] + dw if m in out else dw
    return out
