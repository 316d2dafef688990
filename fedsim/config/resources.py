"""The ``resources`` and ``logging`` sections: where the work runs and where results go."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedsim.config.base import Frozen


class ServerResources(Frozen):
    """Resources of the server, which holds the global state and aggregates. None (the default): it runs in the
    driver process (Ray backend: no process of its own to start or keep in memory). Any CPU or GPU: a Ray actor of
    its own, isolated from the driver and placed where those resources are (e.g. a GPU for a heavy aggregation)."""

    num_cpus: float = Field(0.0, ge=0.0, le=1024)
    """CPUs of the server's own actor (0 with num_gpus 0: the driver process)"""
    num_gpus: float = Field(0.0, ge=0.0, le=64)
    """GPUs of the server's own actor"""


class WorkerPool(Frozen):
    """Extra workers, sized for the clients whose base has one of ``bits`` (e.g. a GPU share for 16-bit clients)."""

    bits: tuple[int, ...] = Field(min_length=1)
    """the base bit widths this pool trains"""
    num_workers: int = Field(1, ge=1, le=4096)
    """its workers"""
    num_cpus: float = Field(1.0, gt=0.0, le=1024)
    """CPUs per worker"""
    num_gpus: float = Field(0.0, ge=0.0, le=64)
    """GPUs per worker (fractional)"""

MAX_CLIENTS_PER_PASS = 256
MAX_CLIENTS_PER_CALL = 1024


def count_or_auto(name: str, v: int | str, top: int) -> int | str:
    """A setting that is a count from 1 to ``top``, or ``auto``."""
    if isinstance(v, int) and not 1 <= v <= top:
        raise ValueError(f"{name} must be between 1 and {top} or 'auto', got {v}")
    return v


class ResourcesConfig(Frozen):
    backend: Literal["local", "ray"] = "ray"
    """ray (a pool of worker actors) or local (one process)"""
    num_workers: int = Field(2, ge=1, le=4096)
    """Ray workers training clients"""
    num_cpus: float = Field(1.0, gt=0.0, le=1024)
    """CPUs per worker (fractional)"""
    num_gpus: float = Field(0.0, ge=0.0, le=64)
    """GPUs per worker (fractional)"""
    num_threads: int | None = Field(None, ge=1, le=1024)
    """torch threads per worker (default: its CPUs)"""
    address: str | None = None
    """a Ray cluster to join (auto, ray://host:port); default: a local Ray"""
    server: ServerResources = ServerResources()
    """the server's resources (default: it runs in the driver)"""
    dashboard: bool = False
    """start Ray's dashboard"""
    max_retries: int = Field(1, ge=0, le=100)
    """retries of a failed client within its round"""
    # consecutive rounds in which every sampled client fails before the run stops with their reason; 0 = never
    max_failed_rounds: int = Field(3, ge=0, le=1_000_000)
    client_timeout_s: float | None = Field(None, gt=0.0)
    """a client running longer is failed (null: no timeout)"""
    # clients whose base has one of a pool's bits are trained by that pool's workers; the rest by the main pool
    pools: tuple[WorkerPool, ...] = ()
    # clients trained together in one pass over one base (fedsim.client.packed): 1 = one at a time; auto = as many
    # as fit pack_tokens tokens per pass (batch_size × max_seq_len each)
    clients_per_pass: int | Literal["auto"] = 1
    # the token budget of one packed pass for clients_per_pass: auto (None: 4096 on CPU workers, 32768 with GPUs)
    pack_tokens: int | None = Field(None, ge=1, le=2**24)
    # each worker folds the updates of the clients it trains in a round into one partial, and the server merges the
    # workers' partials: the server and the object store hold a few partials, not every update of the round (for
    # strategies that stream). auto: where the strategy's partials merge bit for bit (its sums are float64) and a
    # worker trains more than two clients a round on average (a partial weighs two updates); the run's notes say
    # which path it took and why. true: wherever the strategy streams (product sums of FLoRA, FlexLoRA, FedEx-LoRA
    # then group clients by worker: equal to the server's own aggregation to float32 rounding)
    worker_partials: bool | Literal["auto"] = "auto"
    # clients a worker trains one after another in one call (Ray backend), so that Ray's cost per call (~2-4 ms of
    # worker and driver time) is paid once for several short clients; the numbers are those of one call per client.
    # auto: one per call in the first round, then calls of ~0.5 s by the previous round's client times
    # (1 when faults inject kills or hangs: each client's draw must cost only that client). Calls shrink towards a
    # round's end (guided self-scheduling) so that no worker waits on another's last long call
    clients_per_call: int | Literal["auto"] = "auto"

    @property
    def total_workers(self) -> int:
        """The processes that train: the local backend's one, or the main pool's and every bit-width pool's."""
        return 1 if self.backend == "local" else self.num_workers + sum(p.num_workers for p in self.pools)

    @field_validator("clients_per_call")
    @classmethod
    def _per_call(cls, v: int | str) -> int | str:
        return count_or_auto("clients_per_call", v, MAX_CLIENTS_PER_CALL)

    @model_validator(mode="after")
    def _calls_or_passes(self) -> ResourcesConfig:
        if self.clients_per_call not in ("auto", 1) and self.clients_per_pass != 1:
            raise ValueError(f"clients_per_call {self.clients_per_call} with clients_per_pass "
                             f"{self.clients_per_pass}: a pack is already one call; set one of them (clients_per_call "
                             "for clients trained one after another, clients_per_pass for clients trained together)")
        return self

    @field_validator("clients_per_pass")
    @classmethod
    def _per_pass(cls, v: int | str) -> int | str:
        return count_or_auto("clients_per_pass", v, MAX_CLIENTS_PER_PASS)

    def pack_size(self, tokens_per_client: int) -> int:
        """Clients per packed pass: ``clients_per_pass``, or for ``auto`` as many as fit the token budget
        (``pack_tokens``; default 4096 tokens on CPU workers — where a pass gains little beyond that — and 32768 on
        GPU workers), at least 1 and at most MAX_CLIENTS_PER_PASS."""
        if self.clients_per_pass != "auto":
            return int(self.clients_per_pass)
        budget = self.pack_tokens or (32768 if self.num_gpus > 0 else 4096)
        return max(1, min(MAX_CLIENTS_PER_PASS, budget // max(1, tokens_per_client)))

    @model_validator(mode="after")
    def _pools_disjoint(self) -> ResourcesConfig:
        seen: dict[int, int] = {}
        for i, pool in enumerate(self.pools):
            for b in pool.bits:
                if b in seen:
                    raise ValueError(f"pools {seen[b]} and {i} both claim {b}-bit clients; give each bit width to "
                                     "one pool")
                seen[b] = i
        return self

    def pool_of(self, bits: int) -> int:
        """Index of the pool that trains ``bits``-bit clients (-1: the main pool)."""
        return next((i for i, p in enumerate(self.pools) if bits in p.bits), -1)

    def slots(self) -> list[tuple[int, float, float]]:
        """(pool index, num_cpus, num_gpus) of every worker: the main pool (-1) first."""
        out = [(-1, self.num_cpus, self.num_gpus)] * self.num_workers
        for i, p in enumerate(self.pools):
            out += [(i, p.num_cpus, p.num_gpus)] * p.num_workers
        return out

    def threads_per_worker(self) -> int:
        """torch intra-op threads per worker — every worker, pools included, so that a client's result does not depend
        on which worker (or backend) trains it."""
        return self.num_threads or max(1, int(self.num_cpus))


NAME_FIELDS = ("name", "seed", "strategy", "rounds")  # the placeholders of logging.wandb.name


class WandbConfig(Frozen):
    """Weights & Biases. ``name``: the run's name (and its adapter artifact's), a template over ``{name}``, ``{seed}``,
    ``{strategy}`` and ``{rounds}``; by default the scenario's name followed by the keys ``--set`` changed (so that two
    runs of one file differ). ``tags``: added to the strategy's name, which every run is tagged with."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline, online or disabled"""
    project: str = "fedsim"
    """the W&B project"""
    name: str | None = Field(None, min_length=1, max_length=256)
    """the run's name there"""
    group: str | None = None
    """the run's group"""
    entity: str | None = None
    """the W&B entity"""
    tags: tuple[str, ...] = ()
    """the run's tags"""

    @field_validator("name")
    @classmethod
    def _known_placeholders(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                v.format(**dict.fromkeys(NAME_FIELDS, ""))
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{v!r} is not a name template ({e.__class__.__name__}: {e}); use the placeholders "
                                 + ", ".join("{" + f + "}" for f in NAME_FIELDS)) from None
        return v

    def run_name(self, name: str, seed: int, strategy: str, rounds: int) -> str:
        """The W&B run name: the template filled in (the scenario's name without one)."""
        return (self.name or "{name}").format(name=name, seed=seed, strategy=strategy, rounds=rounds)


class TensorBoardConfig(Frozen):
    """TensorBoard event files: the round's scalars, the partition and curves images, the resolved scenario as text
    and its numbers as hparams. ``dir``: where (default ``RUN_DIR/tensorboard``; ``tensorboard --logdir`` it)."""

    dir: str | None = None
    """where the event files go (default: the run directory's tensorboard/)"""


class MlflowConfig(Frozen):
    """MLflow: the scenario as params, each round's metrics at its step, the partition and curves images, the tables,
    the adapter and ``summary.json`` as artifacts; ``--resume`` continues the same MLflow run. ``tracking_uri``: a
    server (``http://host:5000``) or a store; default a local one, ``sqlite:///mlruns/mlflow.db`` with artifacts in
    ``mlruns/artifacts`` under the directory the run is started from. ``experiment``: the experiment's name."""

    tracking_uri: str | None = None
    """the tracking server or store (default: the run directory's mlruns/)"""
    experiment: str = Field("fedsim", min_length=1, max_length=256)
    """the experiment's name"""


class LoggingConfig(Frozen):
    """``plots``: each run draws ``curves.png`` (accuracy, loss, per-task accuracy, communication, time per round).
    ``tensorboard`` and ``mlflow``: those trackers beside W&B (``true`` for their defaults, or their settings; any
    combination at once)."""

    console: bool = True
    """print progress and results"""
    plots: bool = True
    """draw the curves and the partition heatmap"""
    progress: Literal["auto", "rich", "plain", "off"] = "auto"
    """auto (rich on a terminal, plain lines otherwise), rich, plain or off"""
    jsonl: bool = True
    """write metrics.jsonl"""
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases (offline by default)"""
    tensorboard: TensorBoardConfig | None = None
    """TensorBoard: true, or {dir}"""
    mlflow: MlflowConfig | None = None
    """MLflow: true, or {tracking_uri, experiment}"""

    @field_validator("tensorboard", "mlflow", mode="before")
    @classmethod
    def _on_or_off(cls, v: Any) -> Any:
        """``true``: the tracker with its defaults; ``false``: none."""
        if v is True:
            return {}
        return None if v is False else v
