"""Server-side stages around ``Strategy.aggregate``: before it on the round's updates, after it on the new state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from fedsim.lora import ops
from fedsim.types import ClientPayload, ClientUpdate, GlobalState, ModuleShape, RoundContext, Tensors


@dataclass
class StageResult:
    """What a stage's :meth:`ServerStage.before` leaves: the updates that go on, those it rejected, with why, and
    whether the round aggregates nothing although updates remain (``skip``: Krum with too few of them) — the
    server then treats the round as one without updates: the state stays, and every stage gets :meth:`idle`
    instead of :meth:`after` (a server optimizer takes no momentum step)."""

    updates: list[ClientUpdate]
    rejected: dict[int, str] = field(default_factory=dict)
    skip: bool = False


class ServerStage:
    """A step of the server's aggregation. The defaults pass everything through unchanged.

    A stage that looks at one update at a time overrides :meth:`admit`: the server can then stream the round (one
    update in memory at a time, when the strategy streams too). A stage that needs the round's updates together (a
    coordinate-wise median, Krum) overrides :meth:`before` instead, and the server holds the round's updates for it.

    Attributes:
        metric_keys: the keys :meth:`after` may return (they join the round's row).
    """

    metric_keys: ClassVar[tuple[str, ...]] = ()

    def configure(self, ctx: RoundContext, state: GlobalState, payload: ClientPayload) -> ClientPayload:
        """The payload the round's clients get instead of ``payload`` (e.g. with SCAFFOLD's objective carrying the
        server's control variate); called once per distinct payload object, so shared payloads stay shared."""
        return payload

    def admit(self, ctx: RoundContext, state: GlobalState, update: ClientUpdate
              ) -> tuple[ClientUpdate | None, str | None]:
        """One update on its way to the aggregate: itself (or a changed copy: clipped, reweighted), or (None, why
        it is rejected). Default: unchanged."""
        return update, None

    def before(self, ctx: RoundContext, state: GlobalState, updates: Sequence[ClientUpdate]) -> StageResult:
        """The updates to aggregate (a filter, a reweighting, a robust selection), and those rejected. Default:
        :meth:`admit` of each; override it only for a rule over the whole round."""
        out = StageResult([])
        for u in updates:
            kept, why = self.admit(ctx, state, u)
            if kept is None:
                out.rejected[u.client_id] = why or "update rejected"
            else:
                out.updates.append(kept)
        return out

    @property
    def streams(self) -> bool:
        """Whether the stage takes one update at a time (it does not override :meth:`before`)."""
        return type(self).before is ServerStage.before

    def after(self, ctx: RoundContext, old: GlobalState, new: GlobalState) -> tuple[GlobalState, dict[str, float]]:
        """The state to keep after aggregation (e.g. a server optimizer's step from ``old`` towards ``new``)."""
        return new, {}

    def idle(self, ctx: RoundContext, old: GlobalState, new: GlobalState) -> tuple[GlobalState, dict[str, float]]:
        """The state to keep after a round in which no update was aggregated (all failed, none sampled); ``new`` is
        what the stages before this one left. Default: unchanged."""
        return new, {}

    def end_round(self, ctx: RoundContext, received: Sequence[int]) -> dict[str, float]:
        """Called at the end of every round with the client ids of every update the server received (rejected ones
        too); metrics for the round's row (e.g. the privacy spent so far)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume (JSON data; tensors under keys of their own). Empty by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def with_shared(state: GlobalState, values: Tensors) -> GlobalState:
    """``state`` with the tensors in ``values`` replaced (cast to the dtype the state keeps them in)."""
    tensors = dict(state.tensors)
    for k, v in values.items():
        tensors[k] = v.to(state.tensors[k].dtype if k in state.tensors else torch.float32)
    return replace(state, tensors=tensors)


class ValidateUpdates(ServerStage):
    """Rejects an update whose tensors the strategy cannot aggregate: missing or unexpected keys, wrong shapes for
    the client's rank, NaN or Inf values. Always the first stage; a rejected client counts as failed, with its reason.

    Args:
        shapes: the adapted modules' shapes.
        is_shared: which adapter keys a client uploads (the strategy's :meth:`~fedsim.strategies.Strategy.is_shared`).
    """

    def __init__(self, shapes: dict[str, ModuleShape], is_shared: Callable[[str], bool]):
        self.shapes, self.is_shared = shapes, is_shared

    def invalid_reason(self, update: ClientUpdate) -> str | None:
        """Why ``update`` must not be aggregated, or None."""
        r = update.lora.rank
        expected = {}
        for m, shape in self.shapes.items():
            for key, dims in ((ops.a_key(m), (r, shape.d_in)), (ops.b_key(m), (shape.d_out, r))):
                if self.is_shared(key):
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
        bad = ops.first_nonfinite({k: update.tensors[k] for k in expected})
        if bad is None and update.head:
            bad = ops.first_nonfinite(update.head)
        return None if bad is None else f"{bad} holds NaN or Inf values"

    def admit(self, ctx: RoundContext, state: GlobalState, update: ClientUpdate
              ) -> tuple[ClientUpdate | None, str | None]:
        reason = self.invalid_reason(update)
        return (update, None) if reason is None else (None, f"update rejected: {reason}")
