"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

A is frozen at a shared seeded initialisation and never trained or sent; only B is trained, uploaded and averaged.
Since every client's A is the same, Σ p_k s B_k A = s (Σ p_k B_k) A: the aggregation is exact. All clients share one
rank and alpha. Communication counts B only (every client rebuilds A from the shared seed).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.strategies.base import Strategy, StrategySpec, register
from fedsim.strategies.fold import Partial
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, RoundContext


@register("ffa")
class FFALoRA(Strategy):
    summary = "A frozen at a shared seeded init, only B trained and averaged: exact (Sun et al. 2024)"
    takes_compressed = True
    runs_async = True
    averages_factors = True
    streams = True
    partials_exact = True

    def init_state(self, spec: StrategySpec) -> GlobalState:
        return GlobalState(tensors=self._fresh_adapter(spec), lora=spec.lora)

    def is_shared(self, key: str) -> bool:
        return ops.factor_of(key) == "B"

    def download_cost(self, payload: ClientPayload) -> tuple[int, int]:
        b = {k: t for k, t in payload.tensors.items() if self.is_shared(k)}
        return ops.num_params(b), ops.sent_bytes(b, payload.wire)

    def configure(self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]) -> dict[int, ClientPayload]:
        self._require_uniform(state, clients)
        payload = ClientPayload(tensors=state.tensors, lora=state.lora, trainable=("B",), base_version=state.base_version)
        return {c.client_id: payload for c in clients}

    def fold(self, ctx: RoundContext, state: GlobalState, acc: Partial, update: ClientUpdate) -> None:
        if any(ops.factor_of(k) != "B" for k in update.tensors):
            raise AggregationError("FFA-LoRA updates must carry B only")
        self._check_one(update, state)
        w = self._weigh(acc, update)
        acc.add_all(update.tensors, w)

    def finish(self, ctx: RoundContext, state: GlobalState, acc: Partial) -> GlobalState:
        return self._copy_state(state, tensors={**state.tensors, **{k: acc.mean(k) for k in acc.sums}})
