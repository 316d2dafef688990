"""The server: the global state, the strategy and the server-side stages of the update pipeline. In-process with the
local backend and in the driver by default with Ray; inside a Ray actor of its own when ``resources.server`` asks
for resources (:mod:`fedsim.runtime.ray.server_host`). No Ray imports here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedsim.errors import AggregationError
from fedsim.lora import ops
from fedsim.lora.merge import ExportedAdapter, complete_adapter
from fedsim.pipeline import ServerStage, ValidateUpdates
from fedsim.strategies import Strategy, StrategySpec, make_strategy
from fedsim.strategies.fold import Partial
from fedsim.types import (
    ClientPayload,
    ClientSpec,
    ClientUpdate,
    GlobalState,
    ModuleShape,
    RoundContext,
    RoundReport,
    Tensors,
)

STAGES_KEY = "__stages__"  # the stages' own state, inside the server's checkpointed state (only when they have one)
HEAD_KEY = "__head__"  # the global head (a model task's modules trained in full), inside the checkpointed state
HEAD_TOTAL = "__head_weight__"  # the head's Σ n_k in a partial's totals


def fold_head(acc: Partial, update: ClientUpdate) -> None:
    """Add an update's head (a classifier trained in full) to the round's sums, weighted by its sample count: the
    server averages it beside the strategy's aggregation, whatever the strategy."""
    if update.head:
        acc.add_all(update.head, float(update.num_examples))
        acc.count(HEAD_TOTAL, float(update.num_examples))


def take_head(acc: Partial) -> Tensors:
    """The round's head, Σ n_k h_k / Σ n_k, taken out of ``acc`` (so the strategy's finish never sees it); {} when no
    update had one."""
    keys = [k for k in acc.sums if k.startswith(ops.HEAD_PREFIX)]
    if not keys:
        return {}
    total = acc.denominator(HEAD_TOTAL)
    del acc.totals[HEAD_TOTAL]
    return {k: (acc.sums.pop(k) / total).to(acc.dtypes.pop(k)) for k in keys}


def partials_refusal(strategy: Strategy, stages: Sequence[ServerStage]) -> str | None:
    """Why workers cannot fold the updates into partials (``resources.worker_partials``), or None when they can:
    the strategy streams, and no stage (beyond the validation, which the workers run) looks at single updates —
    a stage's :meth:`~fedsim.pipeline.ServerStage.admit` keeps state of the server's (SCAFFOLD's Σ Δc, central
    privacy's clipped sum), or it needs the round's updates together (a median, Krum)."""
    if not strategy.streams:
        return f"strategy {strategy.name!r} aggregates the round's updates together (it does not stream)"
    for stage in stages:
        if not isinstance(stage, ValidateUpdates) and (not stage.streams or type(stage).admit is not ServerStage.admit):
            return f"the server stage {type(stage).__name__} looks at every update on the server"
    return None


def upload_cost(strategy: Strategy, update: ClientUpdate) -> tuple[int, int]:
    """(params, bytes) one client uploads: the strategy's count plus its objectives' uploads and its head."""
    params, nbytes = strategy.upload_cost(update)
    return (params + ops.num_params(update.extra) + ops.num_params(update.head),
            nbytes + ops.num_bytes(update.extra) + ops.sent_bytes(update.head, update.wire))


def _moved(update: ClientUpdate) -> int:
    return ops.num_bytes(update.tensors) + ops.num_bytes(update.extra) + ops.num_bytes(update.head)


@dataclass(frozen=True)
class FoldSpec:
    """What a worker folds a round's updates against: the round, the global state at its start (without the base
    history), the adapted modules' shapes."""

    ctx: RoundContext
    state: GlobalState
    shapes: dict[str, ModuleShape]


class Folder:
    """The server's per-update steps — validation, upload accounting, the strategy's fold — where the updates are
    produced: a worker folds the clients it trains in a round into one partial (``resources.worker_partials``)."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy
        self.partial: Partial | None = None
        self.validation: ValidateUpdates | None = None  # the round's, made with its partial

    def fold(self, spec: FoldSpec, update: ClientUpdate) -> tuple[tuple[int, int], str | None]:
        """Fold ``update`` into this round's partial (a partial of an earlier round is dropped); (its upload cost,
        why it was rejected or None)."""
        key = (spec.ctx.server_round, spec.state.base_version)
        if self.partial is None or (self.partial.server_round, self.partial.base_version) != key:
            self.partial = self.strategy.begin(spec.ctx, spec.state)
            self.validation = ValidateUpdates(spec.shapes, self.strategy.is_shared)
        cost = upload_cost(self.strategy, update)
        why = self.validation.invalid_reason(update)
        if why is not None:
            return cost, f"update rejected: {why}"
        self.strategy.fold(spec.ctx, spec.state, self.partial, update)
        fold_head(self.partial, update)
        return cost, None

    def take(self, server_round: int) -> Partial | None:
        """This round's partial (None when nothing was folded in it); the folder is empty after."""
        part, self.partial, self.validation = self.partial, None, None
        return part if part is not None and part.server_round == server_round else None


@dataclass
class _OpenRound:
    """A streaming round between :meth:`Server.open_round` and :meth:`Server.close_round`."""

    server_round: int
    acc: Partial
    costs: dict[int, tuple[int, int]] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    moved: int = 0
    kept: int = 0


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
        self.head: Tensors = {}  # the global head ({}: the base model's initial one, until a round trains it)
        self.open: _OpenRound | None = None  # a streaming round being fed (open_round … close_round)

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
        if self.head:
            distinct = {i: replace(p, head=self.head) for i, p in distinct.items()}
        for stage in self.stages:
            distinct = {i: stage.configure(ctx, self.state, p) for i, p in distinct.items()}
        payloads = {cid: distinct[id(p)] for cid, p in payloads.items()}
        return payloads, {cid: self.download_cost(p) for cid, p in payloads.items()}

    def download_cost(self, payload: ClientPayload) -> tuple[int, int]:
        """(params, bytes) one client downloads: the strategy's count plus what its objectives carry and the head."""
        params, nbytes = self.strategy.download_cost(payload)
        if payload.head:
            params, nbytes = params + ops.num_params(payload.head), nbytes + ops.sent_bytes(payload.head, payload.wire)
        for o in payload.objectives:
            carried = o.carried()
            params, nbytes = params + ops.num_params(carried), nbytes + ops.num_bytes(carried)
        return params, nbytes

    def upload_cost(self, update: ClientUpdate) -> tuple[int, int]:
        """(params, bytes) one client uploads: the strategy's count plus its objectives' uploads."""
        return upload_cost(self.strategy, update)


    @property
    def streams(self) -> bool:
        """Whether a round's updates are folded one at a time: the strategy is a reduction (``streams``) and every
        stage takes one update at a time (no median or Krum, which need the round's updates together)."""
        return self.strategy.streams and all(stage.streams for stage in self.stages)

    def aggregate(self, ctx: RoundContext, updates: Iterable[ClientUpdate]) -> RoundReport:
        """Run the stages and the strategy on the round's updates, in client-id order (a deterministic order; the
        caller passes them sorted when they come one at a time).

        When :attr:`streams`, the updates are consumed one at a time — each validated, passed through the stages
        and folded into the strategy's running sums, then dropped — so an iterator that fetches them lazily keeps
        one update in memory, whatever the clients per round. Otherwise they are gathered and aggregated together.

        Returns upload accounting — in total and per client (``per_client_up``: client id → [params, bytes]), every
        update counted, rejected or not —, ``aggregated`` (how many went in), ``rejected`` (client id → reason) and
        the stages' metrics (``stage_metrics``).
        """
        if self.streams:
            self.open_round(ctx)
            self.feed(ctx, updates)
            return self.close_round(ctx)
        old, rejected = self.state, {}
        batch = sorted(updates, key=lambda u: u.client_id)
        costs = {u.client_id: self.upload_cost(u) for u in batch}
        moved = sum(_moved(u) for u in batch)
        for stage in self.stages:
            result = stage.before(ctx, old, batch)
            batch, rejected = result.updates, {**rejected, **result.rejected}
            if result.skip:  # the round aggregates nothing (the stage says why in its metrics)
                batch = []
        kept = len(batch)
        heads = Partial(ctx.server_round, old.base_version)
        for u in batch:
            fold_head(heads, u)
        head = take_head(heads)
        # a round in which every update failed or was rejected leaves the global state unchanged (unless a
        # stage moves it regardless: central differential privacy's noise)
        new = self.strategy.aggregate(ctx, old, batch) if batch else old
        del batch
        if head:
            self.head = head
        return self._end_round(ctx, old, new, kept, costs, rejected, (moved, len(costs)))

    # -- a streaming round, fed while the clients train -----------------------------------------------------------
    def open_round(self, ctx: RoundContext) -> None:
        """Begin a streaming round (:attr:`streams`): :meth:`feed` then folds updates as they come, in client-id
        order over all calls, and :meth:`close_round` ends it — the round :meth:`aggregate` makes of them all."""
        if not self.streams:
            raise AggregationError("this server cannot fold updates one at a time: a stage or the strategy needs "
                                   "the round's updates together")
        self.open = _OpenRound(ctx.server_round, self.strategy.begin(ctx, self.state))

    def feed(self, ctx: RoundContext, updates: Iterable[ClientUpdate]) -> None:
        """Validate, pass through the stages and fold each update into the open round's sums, then drop it (an
        iterator that fetches them lazily keeps one in memory)."""
        rnd, old = self._open(ctx), self.state
        for u in updates:
            cid = u.client_id
            rnd.costs[cid] = self.upload_cost(u)
            rnd.moved += _moved(u)
            for stage in self.stages:
                u, why = stage.admit(ctx, old, u)
                if u is None:
                    rnd.rejected[cid] = why or "update rejected"
                    break
            else:
                self.strategy.fold(ctx, old, rnd.acc, u)
                fold_head(rnd.acc, u)
                rnd.kept += 1
            u = None  # noqa: F841 -- the update goes before the next one comes

    def close_round(self, ctx: RoundContext) -> RoundReport:
        """End the open round: the strategy's finish, the stages' ``after``; the accounting of :meth:`aggregate`."""
        rnd, old = self._open(ctx), self.state
        self.open = None
        head = take_head(rnd.acc)
        new = self.strategy.finish(ctx, old, rnd.acc) if rnd.kept else old
        if head:
            self.head = head
        return self._end_round(ctx, old, new, rnd.kept, rnd.costs, rnd.rejected, (rnd.moved, len(rnd.costs)))

    def _open(self, ctx: RoundContext) -> _OpenRound:
        if self.open is None or self.open.server_round != ctx.server_round:
            raise AggregationError(f"round {ctx.server_round} was not opened on the server (open_round first)")
        return self.open

    def _end_round(self, ctx: RoundContext, old: GlobalState, new: GlobalState, kept: int,
                   costs: dict[int, tuple[int, int]], rejected: dict[int, str], moved: tuple[int, int]
                   ) -> RoundReport:
        """The stages' ``after`` (or ``idle``) and ``end_round``; the new state kept; the round's accounting —
        the simulated clients' uploads (``comm/*``), and what the simulator itself moved into the server (bytes,
        objects: ``engine/server_in_*``)."""
        metrics: dict[str, float] = {}
        for stage in self.stages:
            new, m = stage.after(ctx, old, new) if kept else stage.idle(ctx, old, new)
            metrics.update(m)
        self.state = new
        for stage in self.stages:
            metrics.update(stage.end_round(ctx, sorted(costs)))
        return RoundReport(up_params=float(sum(c[0] for c in costs.values())),
                           up_bytes=float(sum(c[1] for c in costs.values())), aggregated=float(kept),
                           rejected=rejected, stage_metrics=metrics,
                           per_client_up={cid: list(costs[cid]) for cid in sorted(costs)},
                           server_in_bytes=float(moved[0]), server_in_objects=float(moved[1]))

    def fold_spec(self, ctx: RoundContext) -> FoldSpec:
        """What a worker needs to fold this round's updates (``resources.worker_partials``)."""
        return FoldSpec(ctx, replace(self.state, base_deltas=[]), self.shapes)

    def aggregate_partials(self, ctx: RoundContext, partials: Iterable[Partial],
                           results: dict[int, tuple[tuple[int, int], str | None]]) -> RoundReport:
        """The round from the workers' partials (``resources.worker_partials``): merged one at a time into the
        round's sums, then the strategy's :meth:`~fedsim.strategies.Strategy.finish` and the stages' ``after``.

        Args:
            partials: the partials (an iterator fetching them one at a time keeps one in memory).
            results: every update the workers received, by client id: (its upload cost, why the worker rejected it
                or None). A partial of another round or base version is rejected with its clients; a client that
                is in no partial counts as rejected too.

        Returns:
            The accounting of :meth:`aggregate`, plus ``partials`` (how many were merged).
        """
        old = self.state
        rejected = {cid: why for cid, (_, why) in results.items() if why is not None}
        acc, merged, moved = self.strategy.begin(ctx, old), 0, 0
        for part in partials:
            moved += part.num_bytes()
            if (part.server_round, part.base_version) != (ctx.server_round, old.base_version):
                for cid in part.clients:
                    rejected[cid] = (f"update rejected: its worker's partial is of round {part.server_round}, base "
                                     f"version {part.base_version} (expected {ctx.server_round}, {old.base_version})")
                continue
            unknown = sorted(set(part.clients) - set(results))
            if unknown:
                raise AggregationError(f"a partial holds client(s) {unknown[:5]} that this round did not train")
            acc.merge(part)
            merged += 1
            part = None  # noqa: F841 -- the partial goes before the next one comes
        for cid in sorted(set(results) - set(rejected) - set(acc.clients)):
            rejected[cid] = "update rejected: no partial of its worker reached the server"
        kept = len(acc.clients)
        head = take_head(acc)
        new = self.strategy.finish(ctx, old, acc) if kept else old
        if head:
            self.head = head
        costs = {cid: cost for cid, (cost, _) in results.items()}
        return self._end_round(ctx, old, new, kept, costs, rejected, (moved, merged))

    def get_state(self) -> tuple[GlobalState, dict]:
        """The global state and the server's own state (the strategy's, plus the stages' under ``__stages__`` when
        any has one), for checkpoints."""
        extra = self.strategy.state_dict()
        stages = {str(i): s.state_dict() for i, s in enumerate(self.stages)}
        stages = {i: s for i, s in stages.items() if s}
        extra = {**extra, STAGES_KEY: stages} if stages else extra
        return self.state, ({**extra, HEAD_KEY: dict(self.head)} if self.head else extra)

    def set_state(self, state: GlobalState, strategy_state: dict) -> None:
        """Restore what :meth:`get_state` returned."""
        own = dict(strategy_state)
        stages = own.pop(STAGES_KEY, {})
        self.head = dict(own.pop(HEAD_KEY, {}))
        self.state = state
        self.strategy.load_state_dict(own)
        for i, stage in enumerate(self.stages):
            if str(i) in stages:
                stage.load_state_dict(stages[str(i)])

    def base_deltas(self, since: int) -> list[tuple[int, Tensors]]:
        """(version, delta) for every base version after ``since``."""
        return [(v, d) for v, d in enumerate(self.state.base_deltas, start=1) if v > since]

    def eval_payload(self) -> ClientPayload:
        p = self.strategy.eval_payload(self.state)
        return replace(p, head=self.head) if self.head else p

    def global_adapter(self) -> ExportedAdapter:
        """The global model as one PEFT adapter: the updates merged into the base folded in, exactly (with the
        head, when the model task trains one)."""
        p = self.strategy.eval_payload(self.state)
        return replace(complete_adapter(p.tensors, p.lora, self.state.base_deltas), head=dict(self.head))
