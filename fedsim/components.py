"""Every named component of a run, resolved once.

The driver resolves the scenario's names — strategy, model task, row format, metrics, client-side transforms,
server-side stages — into objects here, once, and hands those objects to the server and to every worker (with Ray,
pickled by cloudpickle, which ships a class defined in a user's script or notebook by value). Nothing downstream
looks a name up again, so a component registered only in the user's process works on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedsim import registry
from fedsim.config import Scenario
from fedsim.config.privacy import sample_rate
from fedsim.data.formats import RowFormat
from fedsim.errors import ScenarioError
from fedsim.eval.catalog import run_metrics
from fedsim.eval.metrics import Metric, default_metrics
from fedsim.models.tasks import ModelTask, task_for
from fedsim.pipeline import NanFault, ServerOptimizer, ServerStage, UpdateTransform
from fedsim.pipeline.robust import RobustAggregation
from fedsim.pipeline.transforms import Attack
from fedsim.server import partials_refusal
from fedsim.strategies import Strategy


@dataclass
class Components:
    """The objects a run is made of.

    Attributes:
        strategy: the aggregation strategy, with its validated params.
        task: the model task (how the model is built, its loss and its token scores).
        row_format: how data rows become examples (used where data is tokenized: the driver).
        metrics: what evaluation reports.
        transforms: client-side update transforms, applied in order on the workers after local training.
        stages: server-side stages around aggregation (after the built-in validation), in order.
        objectives: client objectives added to every payload (``strategy.client_objective``, e.g. FedProx).
        procedures: every local training procedure registered in the driver when the run started, by name (a
            payload names its procedure: the workers take it from here, never from their own registry, so a
            procedure registered in a notebook trains on Ray).
    """

    strategy: Strategy
    task: ModelTask
    row_format: RowFormat
    metrics: tuple[Metric, ...] = field(default_factory=default_metrics)
    transforms: tuple[UpdateTransform, ...] = ()
    stages: tuple[ServerStage, ...] = ()
    objectives: tuple[Any, ...] = ()
    procedures: dict[str, Any] = field(default_factory=lambda: registry.entries("procedure"))

    @property
    def keeps_client_state(self) -> bool:
        """Whether clients keep state between rounds (personal tensors, objectives' state): the run opens a client
        state store."""
        return (self.strategy.has_personal_state or self.strategy.keeps_client_state
                or any(o.state_key is not None for o in self.objectives) or any(t.keeps_state for t in self.transforms))


def resolve(scenario: Scenario, strategy: Strategy | None = None) -> Components:
    """The scenario's components (``strategy``: an instance to use instead of the one ``strategy.name`` names).

    Raises:
        ScenarioError: a name that nothing is registered under (naming the registered ones).
    """
    if strategy is None:
        strategy = registry.get("strategy", scenario.strategy.name)(scenario.strategy.params)
    transforms: tuple[UpdateTransform, ...] = ()
    if scenario.faults.nan_update_prob > 0:
        transforms = (NanFault(scenario.faults.nan_update_prob),)
    dp, dp_stage = privacy_parts(scenario, strategy) if scenario.privacy is not None else (None, None)
    if dp is not None:  # local privacy before any attack: an attacker sends what it likes
        transforms = (*transforms, dp)
    bad = scenario.clients.malicious
    if bad is not None:
        transforms = (*transforms, Attack(bad.clients(scenario.clients.num_clients, scenario.seed), bad.attack,
                                          multiplier=bad.multiplier(), std=bad.std, value=bad.value))
    upload, broadcast = compression_parts(scenario, strategy)
    if upload is not None:  # last: what goes on the wire is what the transforms before it made
        transforms = (*transforms, upload)
    stages: tuple[ServerStage, ...] = ()
    if dp_stage is not None:  # first: the clipped, noised average is what later stages see
        stages = (dp_stage,)
    rb = scenario.strategy.robust
    if rb is not None:  # first: a server optimizer steps towards the robust aggregate
        stages = (RobustAggregation(rb.method, trim=rb.trim, byzantine=rb.byzantine, select=rb.select,
                                    max_norm=rb.max_norm),)
    opt = scenario.strategy.server_optimizer
    if opt is not None:
        stages = (*stages, ServerOptimizer(opt.name, lr=opt.lr, beta1=opt.beta1, beta2=opt.beta2, tau=opt.tau,
                                  momentum=opt.momentum),)
    objective = scenario.client_objective()
    companion = objective.server_stage(scenario, strategy) if objective is not None else None
    if companion is not None:  # the objective's server side (SCAFFOLD's), after any server optimizer
        stages = (*stages, companion)
    if scenario.asynchronous is not None:  # it moves each update before any other stage sees it
        stages = (async_stage(scenario, strategy, stages), *stages)
    if broadcast is not None:  # last: it encodes the payload every other stage configured
        stages = (*stages, broadcast)
    aggregation_path(scenario, strategy, stages)  # refuses worker_partials: true where a stage reads each update
    task = task_for(scenario.model)
    refused = task.refusal(scenario, strategy)
    if refused is not None:
        raise ScenarioError(*refused)
    return Components(strategy=strategy, task=task,
                      row_format=registry.get("row_format", scenario.data.format)(), metrics=run_metrics(scenario.eval.metrics),
                      transforms=transforms, stages=stages, objectives=(objective,) if objective else ())


@dataclass(frozen=True)
class AggregationPath:
    """How a round's updates reach the aggregate.

    Attributes:
        folds: workers fold their clients' updates into partials (``resources.worker_partials``).
        feeds: where they do not, the server folds each update while the clients train (the strategy and every
            stage stream, and no deadline waits for the round's simulated times): the updates waiting for the
            server stay a few per worker. Neither: the round's updates are gathered (a median's, Krum's cost).
        note: the path and why, in words (the run's note under ``auto``).
    """

    folds: bool
    feeds: bool
    note: str

    @property
    def name(self) -> str:
        return "partials" if self.folds else "fed" if self.feeds else "gathered"


def aggregation_path(scenario: Scenario, strategy: Strategy, stages: tuple[ServerStage, ...]) -> AggregationPath:
    """The run's :class:`AggregationPath` for these components (the driver asks with the components it runs, which
    a caller may have changed since :func:`resolve`).

    Raises:
        ScenarioError: ``resources.worker_partials: true`` where the strategy or a stage needs every update on the
            server.
    """
    folds, why = worker_partials(scenario, strategy, stages)
    feeds = (not folds and strategy.streams and all(s.streams for s in stages)
             and scenario.clock.deadline_s is None)  # a deadline drops stragglers by the round's simulated times
    did = ("workers fold their clients' updates into partials" if folds else
           "the server folds each update as it comes" if feeds else "the server gathers the round's updates")
    return AggregationPath(folds, feeds, f"aggregation: {did} ({why})")


def worker_partials(scenario: Scenario, strategy: Strategy, stages: tuple[ServerStage, ...]) -> tuple[bool, str]:
    """Whether workers fold their clients' updates into partials (``resources.worker_partials``), and why (in the
    run's note). ``auto`` folds where the strategy's partials merge exactly (:attr:`Strategy.partials_exact`), no
    stage or scenario setting looks at single updates on the server, no injected kills would take a worker's folded
    clients with it, and a worker trains more than two clients a round on average (a float64 partial weighs two
    float32 updates).

    Raises:
        ScenarioError: ``true`` where the strategy or a stage needs every update on the server.
    """
    setting, key = scenario.resources.worker_partials, "resources.worker_partials"
    conflict = scenario.partials_conflict(type(strategy))
    refusal = conflict[0] if conflict else partials_refusal(strategy, stages)  # the stages: built-in or a user's
    if setting is True and refusal:
        raise ScenarioError(key, refusal, conflict[1] if conflict else "set resources.worker_partials: false")
    if setting != "auto":  # true or false
        return bool(setting), f"{key}: {str(setting).lower()}"
    per_worker = scenario.clients.num_per_round() / scenario.resources.total_workers
    why = next((w for w in (
        refusal,
        None if strategy.partials_exact else (f"strategy {strategy.name!r} sums products in float32, which grouping "
                                              f"by worker would round differently; {key}: true folds anyway"),
        "faults.kill_worker_prob would take a killed worker's folded clients with it"
        if scenario.faults.kill_worker_prob > 0 else None,
        f"{per_worker:.3g} clients a round per worker: a partial would weigh more than their updates"
        if per_worker <= 2 else None) if w), None)
    return why is None, f"{key}: auto; {why or f'{per_worker:.3g} clients a round per worker'}"


def async_stage(scenario: Scenario, strategy: Strategy, stages: tuple[ServerStage, ...]) -> ServerStage:
    """Buffered asynchronous aggregation's server stage (``asynchronous``).

    Raises:
        ScenarioError: what cannot run asynchronously — the strategy (it says why), a server stage or setting that
            needs synchronous rounds, too few clients to keep ``concurrency`` in flight.
    """
    from fedsim.pipeline.asynchronous import BufferedAsync

    a, sc = scenario.asynchronous, scenario
    refused = strategy.async_refusal()
    if refused is not None:
        raise ScenarioError("asynchronous", refused, "use fedit, ffa or fedsa (or FedIT's family: feddpa, fedqlora, "
                            "pf2lora), or remove the asynchronous section")
    rounds_only = [(key, why) for key, why, on in (
        ("privacy", "its accountant counts synchronous rounds", sc.privacy is not None),
        ("strategy.robust", "it compares a synchronous round's updates", sc.strategy.robust is not None),
        ("strategy.server_optimizer", "it steps once per synchronous round", sc.strategy.server_optimizer is not None),
        ("clock.deadline_s", "a deadline drops a synchronous round's stragglers; asynchronously they arrive stale "
         "instead", sc.clock.deadline_s is not None),
        ("training.round_lr_schedule", "it schedules the clients' lr by round; asynchronous clients start at any "
         "time", sc.training.round_lr_schedule != "constant"),
        ("clients.sampling", "asynchronous clients are drawn uniformly from the idle ones",
         sc.clients.sampling != "uniform"),
        ("clients.availability", "asynchronous clients are drawn from the idle ones, every one available",
         sc.clients.availability < 1),
        ("clients.dropout", "an asynchronous client that vanishes would hold its slot forever", sc.clients.dropout > 0),
    ) if on]
    if rounds_only:
        key, why = rounds_only[0]
        raise ScenarioError(key, f"asynchronous aggregation cannot take it: {why}", f"remove {key}, or the "
                            "asynchronous section")
    if stages:
        raise ScenarioError("asynchronous", f"the server stage {type(stages[0]).__name__} steps on synchronous rounds",
                            "remove it, or the asynchronous section")
    if a.concurrency + a.buffer - 1 > sc.clients.num_clients:
        raise ScenarioError("asynchronous.concurrency", f"{a.concurrency} clients in flight and a buffer of "
                            f"{a.buffer} need at least {a.concurrency + a.buffer - 1} clients (a client is neither in "
                            f"flight nor in the buffer when it starts), but there are {sc.clients.num_clients}",
                            "lower concurrency or buffer, or raise clients.num_clients")
    return BufferedAsync(a.server_lr, a.weight)


def compression_parts(scenario: Scenario, strategy: Strategy) -> tuple[UpdateTransform | None, ServerStage | None]:
    """Compressed communication's client transform (``compression.upload``) and server stage (``.download``).

    Raises:
        ScenarioError: a strategy that cannot take compressed factors (it says why).
    """
    c = scenario.compression
    if c is None:
        return None, None
    from fedsim.pipeline.compression import Codec, CompressBroadcast, CompressUpload

    feedback = c.feedback and c.upload != "none"
    refused = strategy.compression_refusal(feedback)
    if refused is not None:
        if feedback and strategy.compression_refusal(False) is None:
            raise ScenarioError("compression.error_feedback", refused, "set compression.error_feedback: false")
        raise ScenarioError("compression", refused, "remove the compression section, or use a strategy that averages "
                            "factors (e.g. fedit)")
    upload = (CompressUpload(Codec(c.upload, c.block_size, c.topk_fraction), feedback)
              if c.upload != "none" else None)
    broadcast = CompressBroadcast(Codec(c.download, c.block_size), scenario.seed) if c.download != "none" else None
    return upload, broadcast


def compression_line(scenario: Scenario, strategy: Strategy, shapes: dict[str, Any], rank: int) -> str:
    """What ``fedsim validate`` says of the compression section: each direction's codec and one client's bytes at
    ``rank`` over the adapted modules ``shapes``, against float32."""
    from fedsim.lora import ops
    from fedsim.pipeline.compression import Codec

    c = scenario.compression
    sizes = {k: n for m, s in shapes.items()
             for k, n in ((ops.a_key(m), rank * s.d_in), (ops.b_key(m), rank * s.d_out))}
    shared = [k for k in sizes if strategy.is_shared(k)]
    parts = []
    for way, method, keys in (("upload", c.upload, shared), ("download", c.download, list(sizes))):
        if method == "none":
            parts.append(f"{way}s raw")
            continue
        codec = Codec(method, c.block_size, c.topk_fraction)
        raw, sent = 4 * sum(sizes[k] for k in keys), sum(codec.wire_bytes(sizes[k]) for k in keys)
        what = (f"top {c.topk_fraction:.3g} of each tensor" if method == "topk" else
                f"{method}, blocks of {c.block_size}, stochastic rounding" if method.startswith("int") else method)
        feedback = ", error feedback" if way == "upload" and c.feedback else ""
        parts.append(f"{way}s {what}{feedback}: {sent:,} bytes a client at rank {rank} ({raw / max(sent, 1):.2f}× "
                     f"fewer than float32)")
    return "compression: " + "; ".join(parts)


def privacy_parts(scenario: Scenario, strategy: Strategy) -> tuple[UpdateTransform | None, ServerStage]:
    """Differential privacy's client transform (local mode) and server stage (central: clipping, noise and
    accounting; local: accounting), with σ solved from ``target_epsilon`` when the scenario gives one.

    Raises:
        ScenarioError: a target ε that the rounds given cannot reach.
    """
    from fedsim.pipeline.privacy import (
        CentralPrivacy,
        LocalAccounting,
        LocalPrivacy,
        PrivacyAccountant,
        solve_noise,
    )

    p, clients = scenario.privacy, scenario.clients
    delta, local = p.delta_for(clients.num_clients), p.mode == "local"
    q = 1.0 if local else sample_rate(clients)
    sigma = p.noise_multiplier
    if sigma is None:  # local: for a client that takes part in every round; σ/2 per release (see the accountant)
        try:
            sigma = solve_noise(p.target_epsilon, delta, q, scenario.rounds, p.accountant) * (2 if local else 1)
        except ValueError as e:
            raise ScenarioError("privacy.target_epsilon", str(e)) from None
    accountant = PrivacyAccountant(p.mode, sigma, q, delta, p.accountant)
    if local:
        return LocalPrivacy(p.clipping_norm, sigma), LocalAccounting(accountant)
    expected = q * clients.num_clients
    adaptive = None
    if p.adaptive is not None:
        a = p.adaptive
        adaptive = (a.target_quantile, a.lr, expected / 20 if a.count_noise is None else a.count_noise)
    try:
        stage = CentralPrivacy(p.clipping_norm, sigma, expected, accountant, strategy.is_shared, adaptive)
    except ValueError as e:  # adaptive clipping's count noise too small for the solved σ
        raise ScenarioError("privacy.adaptive.count_noise", str(e)) from None
    return None, stage


def privacy_line(scenario: Scenario, strategy: Strategy) -> str:
    """What ``fedsim validate`` says of the privacy section: the mechanism, σ (as solved) and ε after the last round
    (local mode: for a client that takes part in every round)."""
    acc = privacy_parts(scenario, strategy)[1].accountant
    p = scenario.privacy
    solved = f" (solved for ε = {p.target_epsilon:g})" if p.noise_multiplier is None else ""
    where = (f"q = {acc.sample_rate:.3g}, {p.accountant.upper()}" if p.mode == "central" else
             f"{p.accountant.upper()}, a client in every round")
    adaptive = ", adaptive" if p.adaptive is not None else ""
    return (f"privacy: {p.mode} DP, C = {p.clipping_norm:g}{adaptive}, σ = {acc.noise_multiplier:.4g}{solved}; "
            f"ε = {acc.epsilon(scenario.rounds):.3g} at δ = {acc.delta:.3g} after {scenario.rounds} rounds ({where})")
