"""The server: global state + strategy. In-process with the local backend; wrapped in a Ray actor with the Ray
backend (see :mod:`fedsim.runtime.ray_backend`). No Ray imports here."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.errors import AggregationError
from fedsim.export import ExportedAdapter, complete_adapter
from fedsim.lora import ops
from fedsim.strategies import StrategySpec, make_strategy
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, RoundContext, Tensors


class Server:
    """Holds the strategy and the global state and runs the strategy's steps.

    Args:
        strategy_name: a registered strategy.
        params: its hyperparameters.
        spec: shapes, global LoRA spec and seed for :meth:`Strategy.init_state`.
    """

    def __init__(self, strategy_name: str, params: dict, spec: StrategySpec):
        self.strategy = make_strategy(strategy_name, params)
        self.shapes = spec.shapes
        self.state: GlobalState = self.strategy.init_state(spec)

    def invalid_reason(self, update: ClientUpdate) -> str | None:
        """Why ``update`` must not be aggregated (missing/unexpected keys, wrong shapes, NaN/Inf), or None."""
        r = update.lora.rank
        expected = {}
        for m, shape in self.shapes.items():
            for key, dims in ((ops.a_key(m), (r, shape.d_in)), (ops.b_key(m), (shape.d_out, r))):
                if self.strategy.is_shared(key):
                    expected[key] = dims
        missing = sorted(set(expected) - set(update.tensors))
        if missing:
            return f"missing {len(missing)} tensor(s), e.g. {missing[0]}"
        unexpected = sorted(set(update.tensors) - set(expected))
        if unexpected:
            return f"unexpected tensor(s), e.g. {unexpected[0]}"
        for key, dims in expected.items():
            t = update.tensors[key]
            if tuple(t.shape) != dims:
                return f"{key} has shape {tuple(t.shape)}, expected {dims} for rank {r}"
            if not torch.isfinite(t).all():
                return f"{key} holds NaN or Inf values"
        return None

    def configure(self, ctx: RoundContext, clients: Sequence[ClientSpec]
                  ) -> tuple[dict[int, ClientPayload], dict[int, tuple[int, int]]]:
        """Payloads for the sampled clients and, per client, the (params, bytes) it downloads."""
        payloads = self.strategy.configure(ctx, self.state, clients)
        missing = sorted({c.client_id for c in clients} - set(payloads))
        if missing:
            raise AggregationError(f"strategy {self.strategy.name} produced no payload for clients {missing[:5]}")
        down = {cid: self.strategy.download_cost(p) for cid, p in payloads.items()}
        return payloads, down

    def aggregate(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> dict:
        """Aggregate (updates sorted by client id for a deterministic order); return upload accounting, in total
        and per client (``per_client_up``: client id → [params, bytes])."""
        updates = sorted(updates, key=lambda u: u.client_id)
        costs = [self.strategy.upload_cost(u) for u in updates]
        up_params = sum(c[0] for c in costs)
        up_bytes = sum(c[1] for c in costs)
        rejected = {}
        valid = []
        for u in updates:
            reason = self.invalid_reason(u)
            if reason is None:
                valid.append(u)
            else:
                rejected[u.client_id] = f"update rejected: {reason}"
        if valid:  # a round in which every update failed or was rejected leaves the global state unchanged
            self.state = self.strategy.aggregate(ctx, self.state, valid)
        return {"comm/up_params": float(up_params), "comm/up_bytes": float(up_bytes),
                "aggregated": float(len(valid)), "rejected": rejected,
                "per_client_up": {u.client_id: [c[0], c[1]] for u, c in zip(updates, costs)}}

    def get_state(self) -> tuple[GlobalState, dict]:
        """The global state and the strategy's own state, for checkpoints."""
        return self.state, self.strategy.state_dict()

    def set_state(self, state: GlobalState, strategy_state: dict) -> None:
        """Restore what :meth:`get_state` returned."""
        self.state = state
        self.strategy.load_state_dict(strategy_state)

    def base_deltas(self, since: int) -> list[tuple[int, Tensors]]:
        """(version, delta) for every base version after ``since``."""
        return [(v, d) for v, d in enumerate(self.state.base_deltas, start=1) if v > since]

    def eval_payload(self) -> ClientPayload:
        return self.strategy.eval_payload(self.state)

    def global_adapter(self) -> ExportedAdapter:
        """The global model as one PEFT adapter: the updates merged into the base folded in, exactly."""
        p = self.strategy.eval_payload(self.state)
        return complete_adapter(p.tensors, p.lora, self.state.base_deltas)
