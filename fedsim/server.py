"""The server: the global state, the strategy and the server-side stages of the update pipeline. In-process with the
local backend and in the driver by default with Ray; inside a Ray actor of its own when ``resources.server`` asks
for resources (:mod:`fedsim.runtime.ray.server_host`). No Ray imports here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.lora.merge import ExportedAdapter, complete_adapter
from fedsim.pipeline import ServerStage, ValidateUpdates
from fedsim.strategies import Strategy, StrategySpec, make_strategy
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, RoundContext, Tensors

STAGES_KEY = "__stages__"  # the stages' own state, inside the server's checkpointed state (only when they have one)


class Server:
    """Holds the strategy and the global state and runs a round's server steps.

    Args:
        strategy: the strategy (an instance; or a registered name, with ``params``).
        params: the strategy's hyperparameters, when ``strategy`` is a name.
        spec: shapes, global LoRA spec and seed for :meth:`Strategy.init_state`.
        stages: server-side stages around aggregation, in order, after the built-in update validation.
        objectives: client objectives added to every payload, after the strategy's own (e.g. FedProx).
    """

    def __init__(self, strategy: Strategy | str, params: dict | None = None, spec: StrategySpec | None = None,
                 stages: Sequence[ServerStage] = (), objectives: Sequence[Any] = ()):
        if spec is None:
            raise TypeError("Server needs the strategy spec (spec=StrategySpec(...))")
        self.strategy = make_strategy(strategy, params) if isinstance(strategy, str) else strategy
        self.shapes = spec.shapes
        self.validation = ValidateUpdates(spec.shapes, self.strategy.is_shared)
        self.stages: list[ServerStage] = [self.validation, *stages]
        self.objectives = tuple(objectives)
        self.state: GlobalState = self.strategy.init_state(spec)

    def invalid_reason(self, update: ClientUpdate) -> str | None:
        """Why ``update`` must not be aggregated (missing/unexpected keys, wrong shapes, NaN/Inf), or None."""
        return self.validation.invalid_reason(update)

    def configure(self, ctx: RoundContext, clients: Sequence[ClientSpec]
                  ) -> tuple[dict[int, ClientPayload], dict[int, tuple[int, int]]]:
        """Payloads for the sampled clients and, per client, the (params, bytes) it downloads."""
        payloads = self.strategy.configure(ctx, self.state, clients)
        missing = sorted({c.client_id for c in clients} - set(payloads))
        if missing:
            raise AggregationError(f"strategy {self.strategy.name} produced no payload for clients {missing[:5]}")
        # payloads shared between clients stay shared (one object-store copy each)
        distinct = {id(p): p for p in payloads.values()}
        if self.objectives:
            distinct = {i: replace(p, objectives=p.objectives + self.objectives) for i, p in distinct.items()}
        for stage in self.stages:
            distinct = {i: stage.configure(ctx, self.state, p) for i, p in distinct.items()}
        payloads = {cid: distinct[id(p)] for cid, p in payloads.items()}
        return payloads, {cid: self.download_cost(p) for cid, p in payloads.items()}

    def download_cost(self, payload: ClientPayload) -> tuple[int, int]:
        """(params, bytes) one client downloads: the strategy's count plus what its objectives carry."""
        params, nbytes = self.strategy.download_cost(payload)
        for o in payload.objectives:
            carried = o.carried()
            params, nbytes = params + ops.num_params(carried), nbytes + ops.num_bytes(carried)
        return params, nbytes

    def upload_cost(self, update: ClientUpdate) -> tuple[int, int]:
        """(params, bytes) one client uploads: the strategy's count plus its objectives' uploads."""
        params, nbytes = self.strategy.upload_cost(update)
        return params + ops.num_params(update.extra), nbytes + ops.num_bytes(update.extra)

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        """Run the stages and the strategy on the round's updates (sorted by client id: a deterministic order).

        Returns upload accounting — in total and per client (``per_client_up``: client id → [params, bytes]), every
        update counted, rejected or not —, ``aggregated`` (how many went in), ``rejected`` (client id → reason) and
        the stages' metrics (``stage_metrics``).
        """
        updates = sorted(updates, key=lambda u: u.client_id)
        costs = [self.upload_cost(u) for u in updates]
        kept: list[ClientUpdate] = list(updates)
        rejected: dict[int, str] = {}
        for stage in self.stages:
            result = stage.before(ctx, self.state, kept)
            kept, rejected = result.updates, {**rejected, **result.rejected}
        metrics: dict[str, float] = {}
        # a round in which every update failed or was rejected leaves the global state unchanged (unless a stage
        # moves it regardless: central differential privacy's noise)
        old = self.state
        new = self.strategy.aggregate(ctx, old, kept) if kept else old
        for stage in self.stages:
            new, m = stage.after(ctx, old, new) if kept else stage.idle(ctx, old, new)
            metrics.update(m)
        self.state = new
        for stage in self.stages:
            metrics.update(stage.end_round(ctx, updates))
        return {"comm/up_params": float(sum(c[0] for c in costs)), "comm/up_bytes": float(sum(c[1] for c in costs)),
                "aggregated": float(len(kept)), "rejected": rejected, "stage_metrics": metrics,
                "per_client_up": {u.client_id: [c[0], c[1]] for u, c in zip(updates, costs)}}

    def get_state(self) -> tuple[GlobalState, dict]:
        """The global state and the server's own state (the strategy's, plus the stages' under ``__stages__`` when
        any has one), for checkpoints."""
        extra = self.strategy.state_dict()
        stages = {str(i): s.state_dict() for i, s in enumerate(self.stages)}
        stages = {i: s for i, s in stages.items() if s}
        return self.state, ({**extra, STAGES_KEY: stages} if stages else extra)

    def set_state(self, state: GlobalState, strategy_state: dict) -> None:
        """Restore what :meth:`get_state` returned."""
        own = dict(strategy_state)
        stages = own.pop(STAGES_KEY, {})
        self.state = state
        self.strategy.load_state_dict(own)
        for i, stage in enumerate(self.stages):
            if str(i) in stages:
                stage.load_state_dict(stages[str(i)])

    def base_deltas(self, since: int) -> list[tuple[int, Tensors]]:
        """(version, delta) for every base version after ``since``."""
        return [(v, d) for v, d in enumerate(self.state.base_deltas, start=1) if v > since]

    def eval_payload(self) -> ClientPayload:
        return self.strategy.eval_payload(self.state)

    def global_adapter(self) -> ExportedAdapter:
        """The global model as one PEFT adapter: the updates merged into the base folded in, exactly."""
        p = self.strategy.eval_payload(self.state)
        return complete_adapter(p.tensors, p.lora, self.state.base_deltas)
