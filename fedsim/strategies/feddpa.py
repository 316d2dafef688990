"""FedDPA-T (Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024).

Each client has a global adapter, aggregated by FedAvg (weighted by sample counts), and a local adapter that never
leaves it. Their outputs are mixed: W0 x + a ΔW_global x + (1 − a) ΔW_local x, with a = 0.5 by default as in the
authors' code. Each round a client first trains its local adapter with the global one frozen (both active, mixed),
then the global adapter alone, which it uploads; in round 1, with no trained global adapter yet, only the global one
is trained (as the authors do). The personalized model is the mixture. The paper's instance-wise dynamic weighting at
test time is not part of FedDPA-T's training and is not implemented: ``a`` is fixed.

Params: ``a`` (0.5), ``personal_rank`` (None: the global rank), ``personal_alpha`` (None: the global scaling).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from fedsim.strategies.base import PersonalAdapterParams, register
from fedsim.strategies.fedit import FedIT
from fedsim.types import ClientPayload, ClientSpec, GlobalState, RoundContext


class FedDPAParams(PersonalAdapterParams):
    a: float = Field(0.5, ge=0.0, le=1.0)  # weight of the global adapter in the mixture; 1 − a for the local one


@register("feddpa")
class FedDPA(FedIT):
    summary = "global adapter (FedAvg) + local adapter, mixed with weight a; local first, then global (Yang et al. 2024)"
    Params = FedDPAParams
    has_personal_state = True

    def _payload(self, state: GlobalState, personal_phase: bool) -> ClientPayload:
        return ClientPayload(tensors=state.tensors, lora=state.lora, base_version=state.base_version,
                             personal_lora=self.params.spec(state.lora, state.lora.rank),
                             mix=(self.params.a, 1.0 - self.params.a), procedure="alternate",
                             extras={"procedure": {"personal_phase": personal_phase}})

    def configure(self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]) -> dict[int, ClientPayload]:
        self._require_uniform(state, clients)
        payload = self._payload(state, personal_phase=ctx.server_round > 1)
        return {c.client_id: payload for c in clients}

    def eval_payload(self, state: GlobalState) -> ClientPayload:
        return self._payload(state, personal_phase=True)
