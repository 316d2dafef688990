"""The model a run leaves behind, as one PEFT LoRA adapter: every update merged into the base during the run (FLoRA's
stacked factors, FedEx-LoRA's residuals) plus the final adapter, exactly.

Strategies that merge into the base start every round from a fresh adapter, so their final adapter alone holds
little of what the federation learned. The exported adapter is, per module, the total
``T = Σ_v ΔW_v + s·B·A`` written as one LoRA at scaling 1 (``alpha = r`` per module): through QR of the stacked
factors and the SVD of a small core when their width is below the layer's, else the SVD of the dense ``T``; each
factor carries ``√S``. Components whose singular value is below ``1e-7·s_max`` are dropped (an error of the order of
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
    ``lora`` and, where modules differ from it, per-module ranks and alphas (keys: escaped module paths)."""

    tensors: Tensors
    lora: LoraSpec
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


def _delta_modules(deltas: Sequence[Tensors]) -> set[str]:
    return {k.rsplit(".", 1)[0] for d in deltas for k in d}


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
    out: Tensors = {}
    ranks: dict[str, int] = {}
    for m in sorted(set(ops.modules(tensors)) | _delta_modules(deltas)):
        bs = [d[f"{m}.delta_B"].double() for d in deltas if f"{m}.delta_B" in d]
        as_ = [d[f"{m}.delta_A"].double() for d in deltas if f"{m}.delta_A" in d]
        dense = [d[f"{m}.delta_W"].double() for d in deltas if f"{m}.delta_W" in d]
        if ops.b_key(m) in tensors:
            bs.append(lora.scaling * tensors[ops.b_key(m)].double())
            as_.append(tensors[ops.a_key(m)].double())
        shape = dense[0].shape if dense else (bs[0].shape[0], as_[0].shape[1])
        width = sum(b.shape[1] for b in bs)
        if dense or width >= min(shape):
            total = torch.zeros(shape, dtype=torch.float64)
            for w in dense:
                total += w
            if bs:
                total += torch.cat(bs, 1) @ torch.cat(as_, 0)
            u, s, vh = torch.linalg.svd(total, full_matrices=False)
        else:
            u, s, vh = ops.lowrank_svd(torch.cat(bs, 1), torch.cat(as_, 0))
            u, s, vh = u.double(), s.double(), vh.double()
        k = max(1, int((s > RELATIVE_CUTOFF * float(s.max())).sum())) if float(s.max()) > 0 else 1
        root = s[:k].sqrt()
        out[ops.b_key(m)] = (u[:, :k] * root).float().contiguous()
        out[ops.a_key(m)] = (root[:, None] * vh[:k]).float().contiguous()
        ranks[m] = k
    top = max(ranks.values())
    patterns = {re.escape(m): r for m, r in ranks.items() if r != top}
    return ExportedAdapter(out, LoraSpec(rank=top, alpha=float(top)), rank_pattern=patterns,
                           alpha_pattern={p: float(r) for p, r in patterns.items()})
