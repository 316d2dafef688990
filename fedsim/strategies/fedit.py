"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024).

FedAvg applied to the LoRA factors separately: A ← Σ p_k A_k, B ← Σ p_k B_k with p_k = n_k / Σ n. Every client
starts the round from the global (A, B). Note that the product of the averages is not the average of the products:
``Σ p_k B_k A_k − (Σ p_k B_k)(Σ p_k A_k) = ½ Σ_{k,j} p_k p_j (B_k − B_j)(A_k − A_j)`` — the error FLoRA removes.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedsim.errors import AggregationError
from fedsim.strategies.base import Strategy, StrategySpec, register
from fedsim.strategies.fold import Partial
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, RoundContext


@register("fedit")
class FedIT(Strategy):
    summary = "FedAvg of LoRA A and B separately, weighted by client sample counts (Zhang et al. 2024)"
    takes_compressed = True
    runs_async = True
    averages_factors = True
    streams = True
    partials_exact = True

    def init_state(self, spec: StrategySpec) -> GlobalState:
        return GlobalState(tensors=self._fresh_adapter(spec), lora=spec.lora)

    def configure(self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]) -> dict[int, ClientPayload]:
        self._require_uniform(state, clients)
        payload = ClientPayload(tensors=state.tensors, lora=state.lora, base_version=state.base_version)
        return {c.client_id: payload for c in clients}

    def fold(self, ctx: RoundContext, state: GlobalState, acc: Partial, update: ClientUpdate) -> None:
        if update.lora.rank != state.lora.rank:
            raise AggregationError(f"client {update.client_id} returned rank {update.lora.rank}, "
                                   f"expected {state.lora.rank}")
        self._check_one(update, state)
        w = self._weigh(acc, update)
        acc.add_all(update.tensors, w)

    def finish(self, ctx: RoundContext, state: GlobalState, acc: Partial) -> GlobalState:
        """Σ w_k X_k / Σ w_k for every shared tensor (the state's others kept)."""
        return self._copy_state(state, tensors={**state.tensors, **{k: acc.mean(k) for k in acc.sums}})
