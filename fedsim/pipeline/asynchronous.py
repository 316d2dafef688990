"""The server's side of buffered asynchronous aggregation (``asynchronous``; FedBuff, Nguyen et al., AISTATS 2022).

A client trains from the global version of the moment it starts; by the time it arrives the server may have stepped
s times (its staleness). Each server step takes the buffered arrivals and moves the global factors by

    x ← x + η_g · (1/K') Σ_i w(s_i) · (x_i − x_{v_i})

over the K' updates it aggregates (K, the buffer, less any that failed), x_i a client's trained factors and x_{v_i} the
version it started from. The stage writes each update as x + η_g w(s_i) (x_i − x_{v_i}) with weight 1, so that the
strategy's own average (FedIT's, FFA-LoRA's, FedSA-LoRA's: the strategies that declare ``runs_async``) computes the
step. It keeps the versions clients in flight started from (checkpointed with the run) and configures a client of an
earlier version — a run resumed with clients in flight — from it. The schedule (who starts when, who arrives when)
is the driver's: :mod:`fedsim.federation.buffered`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch

from fedsim.errors import AggregationError
from fedsim.pipeline.stages import ServerStage
from fedsim.types import ClientPayload, ClientUpdate, GlobalState, RoundContext, Tensors


class BufferedAsync(ServerStage):
    """FedBuff's server step (see the module).

    Args:
        server_lr: η_g.
        weight: w(s), the weight of an update s versions stale.
    """

    metric_keys: ClassVar[tuple[str, ...]] = ("async/staleness_mean", "async/staleness_max", "async/weight_mean")

    def __init__(self, server_lr: float, weight: Callable[[int], float]):
        self.server_lr, self.weight = server_lr, weight
        self.kept: dict[int, Tensors] = {}  # version → the global tensors then
        self.version = 0  # the steps taken: the version of the state the server holds

    def configure(self, ctx: RoundContext, state: GlobalState, payload: ClientPayload) -> ClientPayload:
        """A client configured in step r starts from version r − 1: the state now, or a kept earlier version."""
        version = ctx.server_round - 1
        if version == self.version:
            self.kept[version] = state.tensors
            return payload
        if version not in self.kept:
            raise AggregationError(f"no kept global version {version} to configure a client from (kept: "
                                   f"{sorted(self.kept)})")
        old = self.kept[version]
        return replace(payload, tensors={k: old[k] if k in old else v for k, v in payload.tensors.items()})

    def admit(self, ctx: RoundContext, state: GlobalState, update: ClientUpdate
              ) -> tuple[ClientUpdate | None, str | None]:
        starts = dict(ctx.asynchronous.starts) if ctx.asynchronous else {}
        if update.client_id not in starts or starts[update.client_id] not in self.kept:
            raise AggregationError(f"client {update.client_id}'s update arrived without the version it started from")
        version = starts[update.client_id]
        step = self.server_lr * self.weight(ctx.server_round - 1 - version)
        base = self.kept[version]
        moved = {k: (state.tensors[k].to(torch.float32) + step * (v.to(torch.float32) - base[k].to(torch.float32))
                     ).to(v.dtype) for k, v in update.tensors.items()}
        return replace(update, tensors=moved, num_examples=1), None

    def after(self, ctx: RoundContext, old: GlobalState, new: GlobalState) -> tuple[GlobalState, dict[str, float]]:
        self._prune(ctx, new)
        return new, {}

    def idle(self, ctx: RoundContext, old: GlobalState, new: GlobalState) -> tuple[GlobalState, dict[str, float]]:
        self._prune(ctx, new)
        return new, {}

    def _prune(self, ctx: RoundContext, new: GlobalState) -> None:
        """Keep the versions clients in flight started from, and the new one (version ``server_round``)."""
        live = set(ctx.asynchronous.live) if ctx.asynchronous else set()
        self.kept = {v: t for v, t in self.kept.items() if v in live}
        self.version = ctx.server_round
        self.kept[self.version] = new.tensors

    def end_round(self, ctx: RoundContext, received: Sequence[int]) -> dict[str, float]:
        starts = ctx.asynchronous.starts if ctx.asynchronous else ()
        stale = [ctx.server_round - 1 - v for _, v in starts]
        if not stale:
            return {}
        return {"async/staleness_mean": sum(stale) / len(stale), "async/staleness_max": float(max(stale)),
                "async/weight_mean": sum(self.weight(s) for s in stale) / len(stale)}

    def state_dict(self) -> dict[str, Any]:
        # copies: the newest version is the state itself, which the checkpoint writes too
        return {"version": self.version, "kept": {str(v): {k: x.clone() for k, x in t.items()}
                                                  for v, t in self.kept.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state.get("version", 0))
        self.kept = {int(v): dict(t) for v, t in state.get("kept", {}).items()}
