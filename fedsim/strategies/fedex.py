"""FedEx-LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation
Models", 2024).

FedAvg of A and B (as FedIT) plus the residual that makes the aggregate exact,
``R = Σ_k p_k s B_k A_k − s (Σ_k p_k B_k)(Σ_k p_k A_k)``, merged into the base weights (a new base version). R has the
orientation of ``nn.Linear.weight`` (d_out, d_in) — the paper's code adds it transposed. All clients share one rank
and alpha. Each client downloads the averaged adapter and the dense residual (d_out · d_in per module).

Weights p_k (``weighting``): ``samples`` (the default) weights clients by their sample counts, as FedAvg and every
other strategy here do; the authors' released ``fed_agg.py`` averages with p_k = 1/K, which is ``uniform``. The paper's
text describes FedAvg without fixing the weights. Checked against the authors' code on identical inputs with
``uniform``: equal to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.strategies.base import Strategy, StrategySpec, register
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, RoundContext


class FedExParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    weighting: Literal["samples", "uniform"] = "samples"  # uniform: 1/K, as the authors' fed_agg.py


@register("fedex")
class FedExLoRA(Strategy):
    summary = "FedAvg of A and B plus the exact residual merged into the base (Singhal et al. 2024)"
    Params = FedExParams

    def _weights(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        if self.params.weighting == "samples":
            return super()._weights(updates)
        super()._weights(updates)  # raises on an empty round
        return ops.normalized_weights([1.0] * len(updates))

    def init_state(self, spec: StrategySpec) -> GlobalState:
        return GlobalState(tensors=self._fresh_adapter(spec), lora=spec.lora,
                           extras={"last_version": {}})

    def configure(self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]) -> dict[int, ClientPayload]:
        out = {}
        self._require_uniform(state, clients)
        for c in clients:
            since = state.extras["last_version"].get(c.client_id, 0)
            missed = sum(t.numel() for d in state.base_deltas[since:] for t in d.values())
            out[c.client_id] = ClientPayload(tensors=state.tensors, lora=state.lora, base_version=state.base_version,
                                             base_update_params=missed)
        return out

    def aggregate(self, ctx: RoundContext, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        keys = self._check_updates(updates, state)
        for u in updates:
            if u.lora != state.lora:
                raise AggregationError(f"client {u.client_id} returned {u.lora}, expected {state.lora}")
        p = self._weights(updates)
        avg = ops.weighted_average([u.tensors for u in updates], p, keys)
        s = state.lora.scaling
        delta = {}
        factors = [(u.tensors, float(p[k]) * s) for k, u in enumerate(updates)]
        for m in ops.modules(avg):
            exact = ops.product_sum(factors, m)  # Σ p_k s B_k A_k: GEMMs over stacked factors, not one per client
            delta[f"{m}.delta_W"] = exact - ops.delta_w(avg, m, s)  # (d_out, d_in), nn.Linear orientation
        new = self._copy_state(state, tensors=avg, base_version=state.base_version + 1)
        new.base_deltas.append(delta)
        new.extras["last_version"].update({u.client_id: new.base_version for u in updates})
        return new
