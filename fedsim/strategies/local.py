"""Local-only training: the no-federation baseline.

Every client trains its own adapter on its own data, round after round, from PEFT's default initialisation; nothing is
uploaded or aggregated, and the global adapter stays the initial one (B = 0: the base model). The meaningful metric is
the personalized one (``eval/personal/*``): each client's own adapter on its local test split.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedsim.errors import AggregationError
from fedsim.strategies.base import Strategy, StrategySpec, register
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, RoundContext


@register("local")
class LocalOnly(Strategy):
    summary = "no federation: each client trains its own adapter, which never leaves it (baseline)"
    has_personal_state = True
    aggregates = False

    def init_state(self, spec: StrategySpec) -> GlobalState:
        return GlobalState(tensors=self._fresh_adapter(spec), lora=spec.lora)

    def is_shared(self, key: str) -> bool:
        return False

    def configure(self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]) -> dict[int, ClientPayload]:
        self._require_uniform(state, clients)
        payload = ClientPayload(tensors={}, lora=state.lora, base_version=state.base_version)  # nothing to download
        return {c.client_id: payload for c in clients}

    def aggregate(self, ctx: RoundContext, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        for u in updates:
            if u.tensors:
                raise AggregationError(f"local-only clients upload nothing, but client {u.client_id} sent "
                                       f"{len(u.tensors)} tensor(s)")
        return self._copy_state(state)
