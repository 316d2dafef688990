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

from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.schema import Strict
from fedsim.strategies.base import Strategy, StrategySpec, register
from fedsim.strategies.fold import Partial
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, RoundContext


class FedExParams(Strict):
    weighting: Literal["samples", "uniform"] = "samples"  # uniform: 1/K, as the authors' fed_agg.py


@register("fedex")
class FedExLoRA(Strategy):
    summary = "FedAvg of A and B plus the exact residual merged into the base (Singhal et al. 2024)"
    takes_compressed = True
    async_refused = ("merges the residual of a round's exact average into the base: a stale client's factors belong to "
                     "another base")
    Params = FedExParams
    streams = True
    merges_into_base = True

    def weight_of(self, update: ClientUpdate) -> float:
        return float(update.num_examples) if self.params.weighting == "samples" else 1.0

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

    def fold(self, ctx: RoundContext, state: GlobalState, acc: Partial, update: ClientUpdate) -> None:
        if update.lora != state.lora:
            raise AggregationError(f"client {update.client_id} returned {update.lora}, expected {state.lora}")
        self._check_one(update, state)
        w = self._weigh(acc, update)
        acc.add_all(update.tensors, w)
        for m in ops.modules(update.tensors):  # Σ w_k s B_k A_k: GEMMs over a few clients' stacked factors at once
            acc.product(m, update.client_id, update.tensors[ops.b_key(m)], update.tensors[ops.a_key(m)],
                        w * state.lora.scaling)

    def finish(self, ctx: RoundContext, state: GlobalState, acc: Partial) -> GlobalState:
        total = acc.denominator()
        avg = {k: acc.mean(k) for k in sorted(acc.sums)}
        delta = {}
        for m in ops.modules(avg):
            acc.flush(m)
            delta[f"{m}.delta_W"] = acc.dense[m] / total - ops.delta_w(avg, m, state.lora.scaling)  # nn.Linear's
        new = self._copy_state(state, tensors=avg, base_version=state.base_version + 1)
        new.base_deltas.append(delta)
        new.extras["last_version"].update({c: new.base_version for c in acc.clients})
        return new
