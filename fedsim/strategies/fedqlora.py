"""FedQLoRA: federated LoRA over clients whose base models are quantized at different bit widths.

A client that runs a quantized base W_q = deq(q(W)) (any bit width below 16) also holds a local *quantization-aware
adapter* (B_q, A_q) of its own rank, meant to absorb its quantization error W − W_q, so that the shared LoRA adapter
learns the task rather than each client's quantization error; only the LoRA adapter is uploaded and aggregated
(FedAvg, weighted by sample counts). The quantization-aware adapter persists across rounds in the client state store
and never leaves the client; full-precision (16/32-bit) clients have none.

- ``iterative: false``: each round both adapters train together on the client's data.
- ``iterative: true``: each round the client first fits its quantization-aware adapter with the LoRA adapter frozen,
  then trains the LoRA adapter with the quantization-aware adapter frozen (and in place) — the alternation that copes
  with non-IID data.
- ``qa_init``: ``zero`` (B_q = 0, PEFT's init) or ``loftq``: s·B_q·A_q starts as the rank-r_q truncated SVD of
  W − deq(q(W)) at the client's bit width (computed once per worker, base version and bit width).

Reported: per client, how well s·B_q·A_q approximates W − deq(q(W)) (``eval/qa/rel_error``, ``eval/qa/corr``, and
per bit width), in the per-client table too.

Params: ``qa_rank`` (4), ``qa_alpha`` (None: the global scaling), ``qa_init`` (``zero``), ``iterative`` (False).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator

from fedsim.schema import Strict
from fedsim.strategies.base import PersonalAdapterParams, register
from fedsim.strategies.fedit import FedIT
from fedsim.types import AlternateOptions, ClientPayload, ClientSpec, GlobalState, QuantSpec, RoundContext


class FedQLoRAParams(Strict):
    qa_rank: int = 4
    qa_alpha: float | None = Field(None, gt=0.0)  # None: the global adapter's scaling
    qa_init: Literal["zero", "loftq"] = "zero"
    iterative: bool = False

    @field_validator("qa_rank")
    @classmethod
    def _qa_rank(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"the quantization-aware adapter's rank must be at least 1, got {v} (e.g. 4)")
        return v


def _needs_qa(quant: QuantSpec) -> bool:
    return quant.quantized


@register("fedqlora")
class FedQLoRA(FedIT):
    summary = "LoRA averaged; each quantized client keeps a quantization-aware adapter for its quantization error"
    Params = FedQLoRAParams
    has_personal_state = True

    def param_ranks(self) -> dict[str, int]:
        return {"strategy.params.qa_rank": self.params.qa_rank}

    def _payload(self, state: GlobalState, quantized: bool) -> ClientPayload:
        if not quantized:
            return ClientPayload(tensors=state.tensors, lora=state.lora, base_version=state.base_version)
        qa = PersonalAdapterParams(personal_rank=self.params.qa_rank,
                                   personal_alpha=self.params.qa_alpha).spec(state.lora, self.params.qa_rank)
        iterative = self.params.iterative
        return ClientPayload(tensors=state.tensors, lora=state.lora, base_version=state.base_version,
                             personal_lora=qa, procedure="alternate" if iterative else "joint",
                             procedure_options=AlternateOptions(personal_in_main_phase=True) if iterative else None,
                             personal_init="loftq" if self.params.qa_init == "loftq" else "peft", measure_qa=True)

    def configure(self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]) -> dict[int, ClientPayload]:
        self._require_uniform(state, clients)
        payloads = {q: self._payload(state, q) for q in (False, True)}
        return {c.client_id: payloads[_needs_qa(c.quant)] for c in clients}

    def eval_payload(self, state: GlobalState) -> ClientPayload:
        """The global model is the LoRA adapter alone; each quantized client adds its own quantization-aware
        adapter (full-precision clients have none)."""
        return replace(self._payload(state, True), no_personal_for=("16bit", "32bit"))
