"""The server behind Ray: in the driver (the default), or a Ray actor of its own when ``resources.server`` asks for
resources. Either way payloads and updates travel through the object store: each distinct payload is ``ray.put``
once per round (FedIT's global adapter is one object for all sampled clients) and updates are read by reference, so
adapter tensors never pass through the driver's dispatch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from fedsim.components import Components
from fedsim.errors import ServerLostError
from fedsim.runtime.interfaces import Handle, ServerHandle
from fedsim.runtime.local import LocalServerHandle
from fedsim.runtime.wire import pack, pack_tensors_of, unpack_tensors_of
from fedsim.server import Server
from fedsim.strategies import StrategySpec
from fedsim.types import ClientSpec, RoundContext, RoundReport


def _one_at_a_time(update_refs: list) -> Iterator[Any]:
    """The updates behind ``update_refs``, each fetched from the object store when the previous one is done with."""
    import ray

    return (unpack_tensors_of(ray.get(ref)) for ref in update_refs)


class ObjectStoreServer:
    """The server behind Ray object references: ``ray.put`` of each distinct payload once per round (FedIT's global
    adapter is one object for all sampled clients), updates read by reference, so adapter tensors never pass through
    the driver's dispatch. Runs in the driver, or inside the server actor."""

    def __init__(self, components: Components, spec: StrategySpec):
        self.server = Server(components.strategy, spec=spec, stages=components.stages,
                             objectives=components.objectives)

    def configure(self, ctx: RoundContext, clients: Sequence[ClientSpec]):
        import ray

        payloads, down = self.server.configure(ctx, clients)
        refs: dict[int, Any] = {}
        by_object: dict[int, Any] = {}
        for cid, p in payloads.items():
            if id(p) not in by_object:  # one object-store copy per distinct payload
                by_object[id(p)] = ray.put(pack_tensors_of(p))
            refs[cid] = by_object[id(p)]
        return refs, down

    def aggregate(self, ctx: RoundContext, update_refs: list) -> RoundReport:
        """Aggregate the round's updates by reference. A streaming server reads them one at a time (each fetched
        from the object store, folded and dropped before the next: the server's memory holds one update, however
        many clients the round had); otherwise all at once."""
        import ray

        if self.server.streams:
            return self.server.aggregate(ctx, _one_at_a_time(update_refs))
        return self.server.aggregate(ctx, [unpack_tensors_of(u) for u in ray.get(list(update_refs))])

    def open_round(self, ctx: RoundContext) -> None:
        self.server.open_round(ctx)

    def feed(self, ctx: RoundContext, update_refs: list) -> None:
        """Fold these updates into the open round, each fetched from the object store and dropped before the next."""
        self.server.feed(ctx, _one_at_a_time(update_refs))

    def close_round(self, ctx: RoundContext) -> RoundReport:
        return self.server.close_round(ctx)

    def fold_spec(self, ctx: RoundContext):
        """The round's :class:`~fedsim.server.FoldSpec` in the object store, once for every worker (in a list: an
        actor's caller gets the reference)."""
        import ray

        spec = self.server.fold_spec(ctx)
        return [ray.put(replace(spec, state=pack_tensors_of(spec.state)))]

    def aggregate_partials(self, ctx: RoundContext, partial_refs: list, results: dict) -> RoundReport:
        """The workers' partials, read by reference one at a time (each merged and dropped before the next)."""
        import ray

        return self.server.aggregate_partials(ctx, (ray.get(ref) for ref in partial_refs), results)

    def base_deltas(self, since: int):
        import ray

        return [(v, ray.put(pack(d))) for v, d in self.server.base_deltas(since)]

    def get_state(self):
        return self.server.get_state()

    def set_state(self, state, strategy_state):
        self.server.set_state(state, strategy_state)

    def eval_handle(self):
        import ray

        return [ray.put(pack_tensors_of(self.server.eval_payload()))]  # in a list: an actor's caller gets the ref

    def global_adapter(self):
        return self.server.global_adapter()


class RayServerHandle(ServerHandle):
    """The server as a Ray actor of its own (``resources.server`` asks for resources): isolated from the driver, and
    placed where those resources are."""

    def __init__(self, actor: Any):
        self.actor = actor

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        try:
            return ray.get(getattr(self.actor, method).remote(*args))
        except ray.exceptions.RayActorError as e:  # ActorDiedError, or its node gone
            why = (getattr(e, "error_msg", None) or str(e)).strip()
            first = why.splitlines()[0] if why else "no reason given"
            raise ServerLostError(f"the server actor died during {method} ({first}); the global model and the "
                                  "strategy's state were in it, so the run cannot go on") from None

    def configure(self, ctx: RoundContext, clients: Sequence[ClientSpec]):
        return self._call("configure", ctx, list(clients))

    def aggregate(self, ctx: RoundContext, updates: Sequence[Handle]) -> RoundReport:
        # Wrapped in a list so that Ray passes the references through instead of resolving them here.
        return self._call("aggregate", ctx, list(updates))

    def open_round(self, ctx: RoundContext) -> None:
        self.feeding: list = []
        self._call("open_round", ctx)

    def feed(self, ctx: RoundContext, updates: Sequence[Handle]) -> None:
        """Not waited for: the actor's calls run in the order sent, and it holds the references (borrowed, in a list)
        until it has read them; :meth:`close_round` raises what a feed raised."""
        self.feeding.append(self.actor.feed.remote(ctx, list(updates)))

    def close_round(self, ctx: RoundContext) -> RoundReport:
        import ray

        feeding, self.feeding = self.feeding, []
        try:
            ray.get(feeding)
        except ray.exceptions.RayActorError:
            pass  # said by the call below, as for every other call
        return self._call("close_round", ctx)

    def fold_spec(self, ctx: RoundContext) -> Handle:
        return self._call("fold_spec", ctx)[0]

    def aggregate_partials(self, ctx: RoundContext, partials: Sequence[Handle], results: dict) -> RoundReport:
        return self._call("aggregate_partials", ctx, list(partials), results)

    def base_deltas(self, since: int) -> list[tuple[int, Handle]]:
        return self._call("base_deltas", since)

    def get_state(self) -> tuple[Any, dict]:
        return self._call("get_state")

    def set_state(self, state: Any, strategy_state: dict) -> None:
        self._call("set_state", state, strategy_state)

    def eval_handle(self) -> Handle:
        return self._call("eval_handle")[0]

    def global_adapter(self) -> Any:
        return self._call("global_adapter")


class DriverServerHandle(LocalServerHandle):
    """The server in the driver process (``resources.server`` asks for no resources, the default): no process of its
    own to start or to keep in memory; payloads and updates still travel through the object store."""

    def __init__(self, server: ObjectStoreServer):
        super().__init__(server)  # type: ignore[arg-type]  # Server's interface, with object references

    def eval_handle(self) -> Handle:
        return self.server.eval_handle()[0]  # type: ignore[attr-defined]

    def fold_spec(self, ctx: RoundContext) -> Handle:
        return self.server.fold_spec(ctx)[0]  # type: ignore[attr-defined]
