"""PF2LoRA (Hao et al., "Personalized Federated Fine-tuning for Heterogeneous Data: an Automatic Rank Learning
Approach via Two-Level LoRA", 2025).

Every client adapts W0 + s B A + s~ D_k C_k: a common adapter x = (B, A) of rank r, averaged over clients as FedAvg
does (weighted by sample counts), and a light client-specific adapter y_k = (D_k, C_k) of rank r~ (default 2) that never
leaves its client. Local training solves the bilevel problem min_x f_k(x, y_k*(x)), y_k*(x) = argmin_y f_k(x, y), one
step at a time: y⁺ = y − α ∇_y f(x, y), then x moves along the hypergradient
∇_x f(x, y⁺) − α ∇²_{xy} f(x, y) ∇_y f(x, y⁺), whose Hessian-vector product is computed by double backpropagation
(:func:`fedsim.client.procedures.hypergradient`). Because the personal adapter adapts to the common one, the rank the
client effectively uses is learned per client.

Params: ``personal_rank`` r~ (2), ``personal_alpha`` (None: the global adapter's scaling), ``inner_lr`` α (0.5; the
upper level uses ``training.lr`` η with the scenario's optimizer), ``mode``: ``bilevel`` (the method),
``first_order`` (drop the Hessian-vector term) or ``simultaneous`` (x and y from ∇f at the same point) — the ablations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from fedsim.strategies.base import PersonalAdapterParams, register
from fedsim.strategies.fedit import FedIT
from fedsim.types import BilevelOptions, ClientPayload, ClientSpec, GlobalState, RoundContext


class PF2LoRAParams(PersonalAdapterParams):
    personal_rank: int | None = 2
    inner_lr: float = Field(0.5, gt=0.0, le=100.0)  # tuned on the tiny model over {0.1, 0.5, 2}
    mode: Literal["bilevel", "first_order", "simultaneous"] = "bilevel"


@register("pf2lora")
class PF2LoRA(FedIT):
    summary = "common adapter (averaged) + rank-r~ personal adapter, bilevel with a hypergradient (Hao et al. 2025)"
    Params = PF2LoRAParams
    has_personal_state = True
    accumulates = False
    takes_objectives = False

    def _payload(self, state: GlobalState) -> ClientPayload:
        return ClientPayload(tensors=state.tensors, lora=state.lora, base_version=state.base_version,
                             personal_lora=self.params.spec(state.lora, 2), procedure="bilevel",
                             procedure_options=BilevelOptions(inner_lr=self.params.inner_lr, mode=self.params.mode))

    def param_ranks(self) -> dict[str, int]:
        return {"strategy.params.personal_rank": self.params.personal_rank} if self.params.personal_rank else {}

    def configure(self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]) -> dict[int, ClientPayload]:
        self._require_uniform(state, clients)
        payload = self._payload(state)
        return {c.client_id: payload for c in clients}

    def eval_payload(self, state: GlobalState) -> ClientPayload:
        return self._payload(state)
