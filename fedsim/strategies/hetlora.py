"""HETLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024).

- The server keeps a global adapter at the largest rank r_max. Client k receives its first r_k components
  (A[:r_k], B[:, :r_k]) and trains them.
- Aggregation zero-pads every update to r_max and weights client k by ``‖s_k B_k A_k‖_F`` (summed over modules),
  normalised — "sparsity-weighted": clients whose update carries more energy count more.
- Rank self-pruning: the local loss adds ``λ Σ_modules ‖s_k B_k[:, t:] A_k[t:, :]‖_F`` on the tail components
  t = ⌊γ r_k⌋ … r_k − 1 (0-based; a real gradient term: :class:`fedsim.objectives.tail.TailRegularizer`), as the paper defines it: with γ = 0.9 the tail is the last
  component for every rank from 2 to 10 (⌈γ r_k⌉ would leave it empty for every rank ≤ 9). If the tail norm shrank
  during local training, the client's rank drops to ⌊γ r_k⌋ (at least 1) from the next round on (``hetlora/rank``).
- Components beyond the largest rank that took part in a round: the paper's aggregation averages the zero-padded
  updates, so they become zero (in both factors) and only a client of that rank can grow them back from zero. That is
  the default, as the paper writes it; ``keep_untrained: true`` keeps the previous global values there instead.

Scaling: the global factors carry the product at scaling 1 (B already multiplied by s). A client with scaling s_k
receives B / s_k so that its initial s_k B A equals the global truncation, and uploads s_k B.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import Field

from fedsim.lora import ops
from fedsim.objectives.tail import TailRegularizer
from fedsim.schema import Strict
from fedsim.strategies.base import Strategy, StrategySpec, register
from fedsim.strategies.fold import Partial
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, LoraSpec, RoundContext


class HetLoRAParams(Strict):
    max_rank: int | None = Field(None, ge=1, description="global rank; default: the largest client rank")
    prune_lambda: float = Field(0.0, ge=0.0, description="λ of the tail regulariser (0 turns pruning off)")
    prune_gamma: float = Field(0.9, gt=0.0, lt=1.0, description="γ: share of the rank kept when pruning")
    keep_untrained: bool = Field(False, description="keep the previous global values of components no client of "
                                                    "the round had (the paper's zero-padding zeroes them)")


@register("hetlora")
class HetLoRA(Strategy):
    summary = "zero-padding, sparsity-weighted aggregation, per-client truncation and rank self-pruning (Cho et al. 2024)"
    takes_compressed = True
    async_refused = ("weighs a round's updates by their norms and truncates them to each client's rank: a buffer of stale "
                     "updates has no such round")
    Params = HetLoRAParams
    supports_mixed_ranks = True
    streams = True
    partials_exact = True
    averages_factors = True
    clients_start_from_state = False  # B rescaled by 1/s_k and truncated to the client's rank

    def init_state(self, spec: StrategySpec) -> GlobalState:
        r_max = self.params.max_rank or spec.lora.rank
        tensors = self._fresh_adapter(spec, r_max)  # B = 0: the product is 0 at any scaling
        return GlobalState(tensors=tensors, lora=LoraSpec(rank=r_max, alpha=float(r_max)), extras={"ranks": {}})

    def param_ranks(self) -> dict[str, int]:
        return {"strategy.params.max_rank": self.params.max_rank} if self.params.max_rank else {}

    def client_rank(self, state: GlobalState, client: ClientSpec) -> int:
        return min(state.extras["ranks"].get(client.client_id, client.lora.rank), state.lora.rank)

    def configure(self, ctx: RoundContext, state: GlobalState, clients: Sequence[ClientSpec]) -> dict[int, ClientPayload]:
        out = {}
        for c in clients:
            r = self.client_rank(state, c)
            lora = LoraSpec(rank=r, alpha=c.lora.alpha, rslora=c.lora.rslora)
            tensors = ops.scale_b(ops.truncate_rank(state.tensors, r), 1.0 / lora.scaling)
            objectives = ()
            if self.params.prune_lambda > 0 and r > 1:
                objectives = (TailRegularizer(lam=self.params.prune_lambda,
                                              start=max(1, math.floor(self.params.prune_gamma * r))),)
            out[c.client_id] = ClientPayload(tensors=tensors, lora=lora, base_version=state.base_version,
                                             objectives=objectives)
        return out

    def fold(self, ctx: RoundContext, state: GlobalState, acc: Partial, update: ClientUpdate) -> None:
        """Adds w_k · zero-pad(s_k B_k, A_k) to r_max in place (no padded copy), w_k = ‖s_k B_k A_k‖_F over all
        modules, from r×r Gram matrices (never the d_out × d_in products). Until some update has a non-zero
        norm, sample-weighted sums are kept too (the weights when every norm is zero)."""
        self._check_one(update, state)
        n = self._weigh(acc, update, total="n")
        r, s = update.lora.rank, update.lora.scaling
        norm = s * math.sqrt(ops.product_norms_sq(update.tensors))
        acc.count("norm", norm)
        fallback = acc.totals["norm"] <= 0
        if not fallback:
            for k in [k for k in acc.sums if k.startswith("n:")]:
                del acc.sums[k]
        if r == state.lora.rank and not fallback:  # full rank: two fused kernels, A's and B's
            for factor, coef in (("A", norm), ("B", norm * s)):
                acc.add_all({k: t for k, t in update.tensors.items() if ops.factor_of(k) == factor}, coef)
        else:  # a smaller rank lands in the sums' first rows (A) or columns (B), without a padded copy
            for k, t in update.tensors.items():
                a = ops.factor_of(k) == "A"
                shape, rows, cols = state.tensors[k].shape, (r if a else None), (None if a else r)
                acc.add(k, t, norm * (1.0 if a else s), shape=shape, rows=rows, cols=cols)
                if fallback:
                    acc.add(f"n:{k}", t, n * (1.0 if a else s), shape=shape, rows=rows, cols=cols)
        acc.note("rank", update.client_id, r)
        pruned = update.metrics.get("hetlora/rank")
        if pruned is not None and int(pruned) < r:
            acc.note("pruned", update.client_id, int(pruned))

    def finish(self, ctx: RoundContext, state: GlobalState, acc: Partial) -> GlobalState:
        total, prefix = ("norm", "") if acc.totals.get("norm", 0.0) > 0 else ("n", "n:")
        averaged = {k: (acc.sums[prefix + k] / acc.denominator(total)).to(state.tensors[k].dtype) for k in state.tensors}
        top, r_max = max(acc.notes["rank"].values()), state.lora.rank
        if self.params.keep_untrained and top < r_max:
            for k, t in averaged.items():  # components top..r_max-1: nobody trained them this round
                old = state.tensors[k]
                if ops.factor_of(k) == "A":
                    t[top:] = old[top:]
                else:
                    t[:, top:] = old[:, top:]
        new = self._copy_state(state, tensors=averaged)
        new.extras["ranks"].update(acc.notes.get("pruned", {}))
        return new
