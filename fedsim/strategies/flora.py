"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
NeurIPS 2024): stacking aggregation.

Each round the sampled clients' adapters are stacked — B_s = [p_1 s_1 B_1, …, p_K s_K B_K] (d_out, Σr_k) and
A_s = [A_1; …; A_K] (Σr_k, d_in) — so that B_s A_s = Σ_k p_k s_k B_k A_k exactly, for any mix of ranks, alphas and any
subset of clients (the paper's code assumes full participation and alpha/r = 2). The stacked update is merged into
the base model (a new base version); every client starts a fresh LoRA module next round. Where the stacked factors
would be larger than the dense update (Σr · (d_out + d_in) > d_out · d_in, e.g. hundreds of clients a round), the
merge is kept as the dense sum instead — the same update, a tenth of the memory and of the checkpoint.

Communication: a client uploads its A and B. To reach the current base it downloads the stacked factors of every
merge since it last took part — or, when that is larger, the dense merged update (d_out · d_in per module). We model
the cheaper of the two, per module, which is what a real deployment would send.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedsim.lora import ops
from fedsim.strategies.base import Strategy, StrategySpec, register
from fedsim.strategies.fold import Partial
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, RoundContext


@register("flora")
class FLoRA(Strategy):
    summary = "stacking aggregation: exact Σ p_k s_k B_k A_k merged into the base, fresh LoRA each round (Wang et al. 2024)"
    takes_compressed = True
    async_refused = ("stacks each round's factors into the base: a client's factors trained on an older base cannot be "
                     "stacked onto a newer one")
    supports_mixed_ranks = True
    streams = True
    merges_into_base = True

    def compression_refusal(self, error_feedback: bool) -> str | None:
        if error_feedback:
            return ("FLoRA's clients start a fresh adapter each round, so a residual of last round's factors has "
                    "nothing to be added to")
        return super().compression_refusal(error_feedback)

    def init_state(self, spec: StrategySpec) -> GlobalState:
        # the global adapter is always "fresh" (B = 0): after each merge the base carries everything
        return GlobalState(tensors=self._fresh_adapter(spec), lora=spec.lora,
                           extras={"last_version": {}, "shapes": {m: (s.d_in, s.d_out) for m, s in spec.shapes.items()}})

    def configure(self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]) -> dict[int, ClientPayload]:
        out = {}
        for c in clients:
            since = state.extras["last_version"].get(c.client_id, 0)
            out[c.client_id] = ClientPayload(tensors={}, lora=c.lora, base_version=state.base_version, fresh=True,
                                             base_update_params=self._catch_up_params(state, since))
        return out

    @staticmethod
    def _catch_up_params(state: GlobalState, since: int) -> int:
        missed = state.base_deltas[since:]
        if not missed:
            return 0
        total = 0
        for m, (d_in, d_out) in state.extras["shapes"].items():
            if any(f"{m}.delta_W" in d for d in missed):  # a merge already stored dense: send the dense sum
                total += d_in * d_out
                continue
            stacked = sum(d[f"{m}.delta_B"].shape[1] for d in missed) * (d_in + d_out)
            total += min(stacked, d_in * d_out)
        return total

    def fold(self, ctx: RoundContext, state: GlobalState, acc: Partial, update: ClientUpdate) -> None:
        self._check_one(update, state)
        w = self._weigh(acc, update)
        for m in ops.modules(update.tensors):
            d_in, d_out = state.extras["shapes"][m]
            acc.product(m, update.client_id, update.tensors[ops.b_key(m)], update.tensors[ops.a_key(m)],
                        w * update.lora.scaling, stacked_until=d_out * d_in / (d_out + d_in))

    def finish(self, ctx: RoundContext, state: GlobalState, acc: Partial) -> GlobalState:
        """Per module the stacked factors [w_k s_k B_k] / Σw and [A_k] — or, where they would outweigh it
        (Σr · (d_out + d_in) > d_out · d_in), the dense Σ p_k s_k B_k A_k."""
        total, delta = acc.denominator(), {}
        for m, (d_in, d_out) in state.extras["shapes"].items():
            if m in acc.dense or acc.width(m) * (d_out + d_in) > d_out * d_in:
                acc.flush(m)
                delta[f"{m}.delta_W"] = acc.dense[m] / total  # (d_out, d_in), the same sum
            else:
                b_s, a_s = acc.stacked(m)
                delta[f"{m}.delta_B"] = b_s / total  # (d_out, Σr)
                delta[f"{m}.delta_A"] = a_s  # (Σr, d_in)
        new = self._copy_state(state, base_version=state.base_version + 1)
        new.base_deltas.append(delta)
        new.extras["last_version"].update({c: new.base_version for c in acc.clients})
        return new

    def eval_payload(self, state: GlobalState) -> ClientPayload:
        # the merged base is the global model; its fresh adapter has B = 0
        return ClientPayload(tensors=state.tensors, lora=state.lora, base_version=state.base_version)
