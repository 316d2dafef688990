"""FedDPA-T (Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models", NeurIPS 2024).

Each client has a global adapter, aggregated by FedAvg with equal client weights (as the authors' code averages;
``weighting: samples`` weights by sample counts), and a local adapter that never leaves it. Their outputs are mixed
as in the paper and the authors' code (``local_weight`` there): W0 x + a ΔW_local x + (1 − a) ΔW_global x, a = 0.5 by
default (``a_weights: global`` keeps the reverse reading, a on the global adapter). Each round a client first trains its local adapter with the global one frozen (both active, mixed),
then the global adapter alone, which it uploads; in round 1, with no trained global adapter yet, only the global one
is trained (as the authors do). The personalized model is the mixture.

FedDPA-D (``inference: dynamic``): the paper's instance-wise dynamic weighting, at evaluation only, as the authors'
released inference script defines it: for each test instance, ``instances`` (5) of the client's training instances
are drawn at random; the test prompt and theirs are embedded by the base with the local adapter alone (the last
layer's hidden state at the last prompt token, or the mean over the prompt: ``embedding``); w = ``max_weight`` (0.5)
× the mean cosine similarity. The script gives w to the global adapter and 1 − w to the local one
(``dynamic_weights: global``); ``dynamic_weights: local`` gives w to the local adapter instead (the reading under
which a test instance unlike the local data leans on the global adapter).

Params: ``a`` (0.5), ``a_weights`` (``local``), ``weighting`` (``uniform``), ``personal_rank`` (None: the global
rank), ``personal_alpha`` (None: the global scaling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from pydantic import Field

from fedsim.strategies.base import PersonalAdapterParams, register
from fedsim.strategies.fedit import FedIT
from fedsim.types import (
    AlternateOptions,
    ClientPayload,
    ClientSpec,
    ClientUpdate,
    DynamicMix,
    GlobalState,
    RoundContext,
)


class FedDPAParams(PersonalAdapterParams):
    a: float = Field(0.5, ge=0.0, le=1.0)  # weight of the local adapter in the mixture; 1 − a for the global one
    a_weights: Literal["local", "global"] = "local"  # which adapter ``a`` weights (the paper: the local one)
    weighting: Literal["uniform", "samples"] = "uniform"  # FedAvg of the global adapters (the authors': uniform)
    inference: Literal["fixed", "dynamic"] = "fixed"  # dynamic: FedDPA-D's instance-wise weights at evaluation
    instances: int = Field(5, ge=1, le=1000)  # FedDPA-D: local training instances compared with each test one
    max_weight: float = Field(0.5, ge=0.0, le=1.0)  # FedDPA-D: w = max_weight × mean cosine similarity
    embedding: Literal["last", "mean"] = "last"  # FedDPA-D: last prompt token's hidden state, or the prompt's mean
    dynamic_weights: Literal["global", "local"] = "global"  # FedDPA-D: which adapter w weights (the authors': global)


@register("feddpa")
class FedDPA(FedIT):
    summary = "global adapter (FedAvg) + local adapter weighted a; local first, then global (Yang et al. 2024)"
    Params = FedDPAParams
    has_personal_state = True

    def mix(self) -> tuple[float, float]:
        """(weight of the global adapter, weight of the local adapter)."""
        a = self.params.a
        return (1.0 - a, a) if self.params.a_weights == "local" else (a, 1.0 - a)

    def weight_of(self, update: ClientUpdate) -> float:
        return float(update.num_examples) if self.params.weighting == "samples" else 1.0

    def _payload(self, state: GlobalState, personal_phase: bool) -> ClientPayload:
        return ClientPayload(tensors=state.tensors, lora=state.lora, base_version=state.base_version,
                             personal_lora=self.params.spec(state.lora, state.lora.rank),
                             mix=self.mix(), procedure="alternate",
                             procedure_options=AlternateOptions(personal_phase=personal_phase))

    def param_ranks(self) -> dict[str, int]:
        return {"strategy.params.personal_rank": self.params.personal_rank} if self.params.personal_rank else {}

    def configure(self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]) -> dict[int, ClientPayload]:
        self._require_uniform(state, clients)
        payload = self._payload(state, personal_phase=ctx.server_round > 1)
        return {c.client_id: payload for c in clients}

    def eval_payload(self, state: GlobalState) -> ClientPayload:
        payload = self._payload(state, personal_phase=True)
        if self.params.inference == "dynamic":
            q = self.params
            payload = replace(payload, dynamic_mix=DynamicMix(instances=q.instances, max_weight=q.max_weight,
                                                              embedding=q.embedding, weights=q.dynamic_weights))
        return payload
