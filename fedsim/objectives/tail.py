"""HETLoRA's rank self-pruning term (Cho et al., EMNLP 2024): ``λ Σ_modules ‖s · B[:, t:] A[t:, :]‖_F`` over the tail
components t = ``start`` … r − 1; if the tail's norm shrank during local training, the client's rank drops to
``start`` from the next round on (reported as ``hetlora/rank``, read by :class:`fedsim.strategies.hetlora.HetLoRA`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.lora import ops
from fedsim.objectives import BoundObjective, ClientObjective, Params, objective
from fedsim.types import LoraSpec, Tensors


@objective("hetlora_tail")
@dataclass(frozen=True)
class TailRegularizer(ClientObjective):
    """λ (``lam``) times the Frobenius norm of the tail components from ``start`` on, summed over modules."""

    lam: float
    start: int

    metric_keys = ("reg/tail_norm_start", "reg/tail_norm_end", "hetlora/rank")
    round_metrics = ("reg/tail_norm_start", "reg/tail_norm_end")

    def bind(self, params: Params, lora: LoraSpec, scaling: float, state: Tensors | None = None) -> BoundObjective:
        return _BoundTail(self, params, lora, scaling)


class _BoundTail(BoundObjective):
    def __init__(self, term: TailRegularizer, params: Params, lora: LoraSpec, scaling: float):
        self.term, self.params, self.lora, self.scaling = term, params, lora, scaling
        with torch.no_grad():
            self.start_norm = float(self.penalty())

    def penalty(self) -> torch.Tensor:
        p, start, s = self.params(), self.term.start, self.scaling
        return self.term.lam * sum(torch.linalg.matrix_norm(s * p[ops.b_key(m)][:, start:] @ p[ops.a_key(m)][start:, :])
                                   for m in ops.modules(p))

    def finish(self) -> dict[str, float]:
        with torch.no_grad():
            end = float(self.penalty())
        rank = self.term.start if end < self.start_norm else self.lora.rank
        return {"reg/tail_norm_start": self.start_norm, "reg/tail_norm_end": end, "hetlora/rank": float(rank)}
