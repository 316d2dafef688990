"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025).

A learns what clients share and is averaged (weighted by sample counts); B learns what is client-specific and stays
with its client across rounds (in the client state store; never uploaded, never seen by the server). Every client
trains both. All clients share one rank and alpha. The global adapter alone (A with B = 0) is the base model, so the
meaningful metric is the personalized one: each client's A_global + B_k on its local test split
(``eval/personal/*``), which needs ``eval.local_test_fraction`` > 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.strategies.base import Strategy, StrategySpec, register
from fedsim.strategies.fold import Partial
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, RoundContext


@register("fedsa")
class FedSALoRA(Strategy):
    summary = "A shared and averaged, B personal: it stays with its client (Guo et al. 2025)"
    takes_compressed = True
    runs_async = True
    has_personal_state = True
    averages_factors = True
    streams = True
    partials_exact = True

    def init_state(self, spec: StrategySpec) -> GlobalState:
        init = self._fresh_adapter(spec)
        return GlobalState(tensors={k: v for k, v in init.items() if self.is_shared(k)}, lora=spec.lora)

    def is_shared(self, key: str) -> bool:
        return ops.factor_of(key) == "A"

    def configure(self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]) -> dict[int, ClientPayload]:
        self._require_uniform(state, clients)
        payload = ClientPayload(tensors=state.tensors, lora=state.lora, base_version=state.base_version)
        return {c.client_id: payload for c in clients}

    def fold(self, ctx: RoundContext, state: GlobalState, acc: Partial, update: ClientUpdate) -> None:
        if any(ops.factor_of(k) != "A" for k in update.tensors):
            raise AggregationError("FedSA-LoRA updates must carry exactly the shared A factors")
        self._check_one(update, state)
        w = self._weigh(acc, update)
        acc.add_all(update.tensors, w)

    def finish(self, ctx: RoundContext, state: GlobalState, acc: Partial) -> GlobalState:
        return self._copy_state(state, tensors={k: acc.mean(k) for k in sorted(acc.sums)})
