"""The backend interface: where client jobs, evaluation and the server run.

A backend hands out opaque *handles* for payloads and updates: the objects themselves in-process, Ray object
references with Ray, so that the driver can route tensors between server and workers without touching them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedsim.components import Components
from fedsim.config import Scenario
from fedsim.data.tokenized import TokenizedData
from fedsim.errors import BackendError
from fedsim.strategies import StrategySpec
from fedsim.types import ClientFailure, ClientJob, ClientResult, ClientSpec, RoundContext, RoundReport

Handle = Any
JobOutcome = tuple[ClientResult | ClientFailure, Handle | None]


class Sink(ABC):
    """Where a round's outcomes go, in job order, while the clients train (the server folding them as they come)."""

    @abstractmethod
    def take(self, outcomes: Sequence[JobOutcome]) -> None:
        """The next outcomes, in job order."""


def drain(sink: Sink, outcomes: list[JobOutcome | None], start: int) -> int:
    """Give ``sink`` the outcomes from position ``start`` on that are done, with every one before them; their update
    handles are dropped here once it has them. Returns the first position not given."""
    end = start
    while end < len(outcomes) and outcomes[end] is not None:
        end += 1
    if end > start:
        sink.take(outcomes[start:end])  # type: ignore[arg-type]
        for i in range(start, end):
            outcomes[i] = (outcomes[i][0], None)  # type: ignore[index]
    return end


class ServerHandle(ABC):
    """The server as seen from the driver."""

    @abstractmethod
    def configure(self, ctx: RoundContext, clients: Sequence[ClientSpec]
                  ) -> tuple[dict[int, Handle], dict[int, tuple[int, int]]]:
        """Payload handles per client, and (params, bytes) each client downloads."""

    @abstractmethod
    def aggregate(self, ctx: RoundContext, updates: Sequence[Handle]) -> RoundReport:
        """Aggregate the update handles; return upload accounting, rejections and the stages' metrics."""

    def open_round(self, ctx: RoundContext) -> None:
        """Begin a round the server folds while the clients train (:meth:`feed`, then :meth:`close_round`)."""
        raise BackendError(f"{type(self).__name__} does not fold updates while the clients train")

    def feed(self, ctx: RoundContext, updates: Sequence[Handle]) -> None:
        """Fold these update handles (the next ones in client-id order) into the open round; the handles may go
        once this returns (a server in an actor of its own holds them until it has read them)."""
        raise BackendError(f"{type(self).__name__} does not fold updates while the clients train")

    def close_round(self, ctx: RoundContext) -> RoundReport:
        """End the open round; the accounting of :meth:`aggregate`."""
        raise BackendError(f"{type(self).__name__} does not fold updates while the clients train")

    def fold_spec(self, ctx: RoundContext) -> Handle:
        """A handle to what workers fold the round's updates against (``resources.worker_partials``)."""
        raise BackendError(f"{type(self).__name__} does not take partials")

    def aggregate_partials(self, ctx: RoundContext, partials: Sequence[Handle], results: dict) -> RoundReport:
        """Aggregate the workers' partials (handles) given every folded client's (upload cost, rejection); the
        accounting of :meth:`aggregate`."""
        raise BackendError(f"{type(self).__name__} does not take partials")

    @abstractmethod
    def base_deltas(self, since: int) -> list[tuple[int, Handle]]:
        """(version, handle) of every base-model update after version ``since``."""

    @abstractmethod
    def get_state(self) -> tuple[Any, dict]:
        """(GlobalState, the server's own state) for a checkpoint."""

    @abstractmethod
    def set_state(self, state: Any, strategy_state: dict) -> None:
        """Restore a checkpointed state."""

    @abstractmethod
    def eval_handle(self) -> Handle:
        """A handle to the payload the global model is evaluated with."""

    @abstractmethod
    def global_adapter(self) -> Any:
        """The run's whole model as one adapter (:class:`fedsim.lora.merge.ExportedAdapter`), for saving."""


class Backend(ABC):
    """Runs a server and a pool of workers."""

    num_replaced: int = 0  # workers replaced after dying or hanging, over the run

    def launch(self, scenario: Scenario) -> None:  # noqa: B027 (optional hook; the default does nothing)
        """Begin starting the workers, before the data is ready (the driver calls it before preparing the data, so
        that process start-up overlaps the tokenization); :meth:`start` finishes the job. Optional."""

    def launch_note(self) -> str | None:
        """What :meth:`launch` set going, in words for the console (None: nothing)."""
        return None

    def start_note(self, scenario: Scenario) -> str:
        """What :meth:`start` waits for, in words for the console."""
        return "building the model"

    @abstractmethod
    def start(self, scenario: Scenario, data: TokenizedData, spec: StrategySpec, components: Components
              ) -> ServerHandle:
        """Start the workers (if :meth:`launch` has not) and the server, handing both the run's resolved
        ``components``; return the server handle."""

    @abstractmethod
    def train(self, jobs: Sequence[tuple[ClientJob, Handle]],
              on_done: Callable[[ClientResult | ClientFailure], None] | None = None,
              fold: Handle | None = None, sink: Sink | None = None) -> list[JobOutcome]:
        """Run every job; return one outcome per job (a result with its update handle, or a failure). With
        ``fold`` (a :meth:`ServerHandle.fold_spec` handle), each worker folds its clients' updates into its partial
        of the round instead (results carry their upload cost and any rejection; no update handles): then
        :meth:`collect_partials`. With ``sink``, the outcomes go to it in job order as soon as each and all before
        it are done (:func:`drain`; they are returned without update handles), and a job starts only within a
        window of the first one not yet given to it (a few calls per worker): the updates in flight stay bounded,
        whatever the clients per round."""

    def collect_partials(self, server_round: int) -> tuple[list[Handle], list[ClientFailure]]:
        """After a folding :meth:`train`: a handle to each worker's partial, and the clients whose partial was lost
        with its worker (they count as failed; the round goes on without them)."""
        raise BackendError(f"{type(self).__name__} does not fold updates on its workers")

    @abstractmethod
    def sync_base(self, deltas: Sequence[tuple[int, Handle]]) -> None:
        """Make every worker apply these base-model updates (in order) before its next job."""

    @abstractmethod
    def evaluate(self, payload: Handle, batches: Sequence[np.ndarray]) -> list[dict[str, float]]:
        """Evaluate the payload on test batches; one dict of metric sums per batch, in order."""

    @abstractmethod
    def evaluate_clients(self, payload: Handle, items: Sequence[tuple[int, Any, np.ndarray]]
                         ) -> dict[int, tuple[dict[str, float], dict[str, float]]]:
        """Per client (id, personal tensors or None, local test indices): sums with the global adapter alone and
        with the personal tensors on top. Backends that generate also take ``server_round`` (an int: generate with
        each client's own model too, the generative metrics' sums joining the personal ones)."""

    def generate(self, payload: Handle, batches: Sequence[np.ndarray], server_round: int
                 ) -> list[tuple[dict[str, float], list[dict[str, Any]]]]:
        """Generate for test batches with the global model: per batch, the generative metrics' sums and the samples
        (``{index, task, prompt, prediction, reference}``), in order."""
        raise BackendError(f"{type(self).__name__} cannot generate; eval.generate needs the local or the Ray backend")

    def harness(self, payload: Handle, items: Sequence[tuple[int, Any, Any]], server_round: int
                ) -> dict[str, dict[str, float]]:
        """lm-evaluation-harness on one worker: the global model (key ``""``) and each item's client's own model
        (``(client_id, personal tensors or None, QuantSpec)``; key ``client_<id>``)."""
        raise BackendError(f"{type(self).__name__} cannot run eval.harness; use the local or the Ray backend")

    @abstractmethod
    def worker_stats(self) -> list[dict[str, Any]]:
        """Per-worker counters (model builds, PEFT wraps, clients trained)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers (and Ray, if this backend started it)."""
