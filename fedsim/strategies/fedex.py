"""FedEx-LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation
Models", 2024).

FedAvg of A and B (as FedIT) plus the residual that makes the aggregate exact,
``R = Σ_k p_k s B_k A_k − s (Σ_k p_k B_k)(Σ_k p_k A_k)``, merged into the base weights (a new base version). R has the
orientation of ``nn.Linear.weight`` (d_out, d_in) — the paper's code adds it transposed. All clients share one rank
and alpha. Each client downloads the averaged adapter and the dense residual (d_out · d_in per module).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.strategies.base import Strategy, StrategySpec, register
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, RoundContext


@register("fedex")
class FedExLoRA(Strategy):
    summary = "FedAvg of A and B plus the exact residual merged into the base (Singhal et al. 2024)"

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
