"""The whole scenario: every section, and the checks that span sections (names resolved through the registry)."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedsim import registry
from fedsim.config.asynchronous import AsyncConfig
from fedsim.config.base import Frozen, format_validation
from fedsim.config.clients import ClientsConfig
from fedsim.config.compression import CompressionConfig
from fedsim.config.data import DataConfig, PartitionConfig
from fedsim.config.model import ModelConfig
from fedsim.config.privacy import PrivacyConfig
from fedsim.config.resources import LoggingConfig, ResourcesConfig
from fedsim.config.training import (
    CheckpointConfig,
    ClockConfig,
    EvalConfig,
    FaultsConfig,
    GenerateConfig,
    TrainingConfig,
)
from fedsim.errors import ScenarioError
from fedsim.schema import non_finite


class ServerOptimizerConfig(Frozen):
    """A server optimizer stepping on the aggregate (Reddi et al. 2021; :mod:`fedsim.pipeline.server_opt`)."""

    name: Literal["fedavgm", "fedadagrad", "fedadam", "fedyogi"]
    """FedAvgM, FedAdagrad, FedAdam or FedYogi (Reddi et al. 2021)"""
    lr: float = Field(1.0, gt=0.0, le=1e3)  # η
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """β₁, the first moment's decay"""
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    """β₂, the second moment's decay"""
    tau: float = Field(1e-3, gt=0.0, le=1e3)  # τ, the adaptivity
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # μ (fedavgm)


def _finite_params(params: dict[str, Any]) -> dict[str, Any]:
    """A free ``params`` mapping (its owner's class checks the keys later) holds no infinite or NaN number."""
    if (key := non_finite(params)) is not None:
        raise ValueError(f"{key}: {params_value(params, key)!r} is not a finite number; give a finite one")
    return params


def params_value(params: Any, key: str) -> Any:
    for part in key.split("."):
        params = params[int(part)] if isinstance(params, (list, tuple)) else params[part]
    return params


class ObjectiveConfig(Frozen):
    """A client objective every client adds to its local loss (:mod:`fedsim.objectives`), e.g. FedProx."""

    name: str
    """a registered client objective: fedprox, scaffold or your own"""
    params: dict[str, Any] = Field(default_factory=dict)
    """its settings (fedprox: mu; scaffold: server_lr)"""

    _finite = field_validator("params")(classmethod(lambda cls, v: _finite_params(v)))


class RobustConfig(Frozen):
    """Robust aggregation (``strategy.robust``, :mod:`fedsim.pipeline.robust`) for the averaging strategies."""

    method: Literal["median", "trimmed_mean", "krum", "multi_krum", "norm_bound"]
    """median, trimmed_mean, krum, multi_krum or norm_bound"""
    trim: float = Field(0.1, gt=0.0, lt=0.5)  # trimmed_mean: the share cut at each end
    byzantine: int = Field(1, ge=0)  # krum, multi_krum: f, the malicious clients tolerated
    select: int = Field(1, ge=1)  # multi_krum: how many of the best-scored updates are averaged
    max_norm: float | None = Field(None, gt=0.0)  # norm_bound: the largest change of the shared tensors


class StrategyConfig(Frozen):
    name: str = "fedit"
    """a registered strategy (`fedsim strategies` lists them)"""
    params: dict[str, Any] = Field(default_factory=dict)
    """the strategy's own settings, validated by the strategy"""
    server_optimizer: ServerOptimizerConfig | None = None
    """a server optimizer stepping on the aggregate (averaging strategies)"""
    client_objective: ObjectiveConfig | None = None
    """a term every client adds to its local loss (FedProx, SCAFFOLD, or one of your own)"""
    robust: RobustConfig | None = None
    """robust aggregation (averaging strategies)"""

    _finite = field_validator("params")(classmethod(lambda cls, v: _finite_params(v)))


class Scenario(Frozen):
    """A whole federated fine-tuning experiment. Build one with :func:`load_scenario` or :func:`scenario_from_dict`."""

    name: str = Field("run", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    """the run's name: its directory under runs/ (a number is added if it exists) and its W&B name"""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """the seed of everything random: the split, the sampling, the initial adapters, the training batches"""
    rounds: int = Field(10, ge=1, le=1_000_000)
    """federated rounds (asynchronous runs: server steps)"""
    model: ModelConfig = ModelConfig()
    """the base model and what it is fine-tuned as"""
    data: DataConfig = DataConfig()
    """the data set, its format and its test split"""
    partition: PartitionConfig = PartitionConfig()
    """how the training rows are split over the clients (non-IID splits)"""
    clients: ClientsConfig = ClientsConfig()
    """the clients: how many, how many a round, their LoRA ranks and quantized bases"""
    training: TrainingConfig = TrainingConfig()
    """each client's local training"""
    eval: EvalConfig = EvalConfig()
    """what is evaluated, how often"""
    strategy: StrategyConfig = StrategyConfig()
    """the aggregation strategy and what runs around it"""
    resources: ResourcesConfig = ResourcesConfig()
    """where the work runs"""
    logging: LoggingConfig = LoggingConfig()
    """the console, the metrics files and the trackers"""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """how often the run is checkpointed"""
    clock: ClockConfig = ClockConfig()
    """the simulated clock: each client's compute speed and links"""
    faults: FaultsConfig = FaultsConfig()
    """injected faults (a testing aid)"""
    privacy: PrivacyConfig | None = None
    """client-level differential privacy (none by default)"""
    compression: CompressionConfig | None = None
    """compressed uploads and broadcasts (none by default)"""
    asynchronous: AsyncConfig | None = None
    """buffered asynchronous aggregation, FedBuff (none by default: synchronous rounds)"""

    def pack_size(self, max_len: int) -> int:
        """Clients per packed training pass (``resources.clients_per_pass``, ``auto`` resolved for this scenario's
        batch_size × the data's ``max_len``: ``data.max_seq_len``, ``auto`` resolved by loading the data)."""
        return self.resources.pack_size(self.training.batch_size * max_len)

    @field_validator("name")
    @classmethod
    def _name_stays_in_runs(cls, v: str) -> str:
        if set(v) == {"."} and len(v) <= 2:  # "." is runs/ itself, ".." its parent
            raise ValueError(f"name {v!r} would put the run outside its own directory under runs/; use a name "
                             "with a letter or digit, e.g. quickstart")
        return v

    @model_validator(mode="after")
    def _faults_need_ray(self) -> Scenario:
        f = self.faults
        if self.resources.backend == "local" and f.in_process():
            raise ScenarioError("faults", "worker kills and hangs need the Ray backend (a local client runs inside "
                                "the driver process)", "set resources.backend: ray, or use only nan_update_prob")
        if self.resources.clients_per_call not in ("auto", 1) and f.in_process():
            raise ScenarioError("resources.clients_per_call", f"{self.resources.clients_per_call} clients per worker "
                                "call with injected kills or hangs: one client's draw would lose or hold every "
                                "client of its call", "leave clients_per_call: auto (one client per call with "
                                "faults) or set it to 1")
        return self

    @model_validator(mode="after")
    def _strategy_known(self, info: ValidationInfo) -> Scenario:
        if info.context and info.context.get("strategy") is False:  # checked later (it imports every strategy)
            return self
        cls = registry.get("strategy", self.strategy.name)  # raises ScenarioError naming the registered ones
        if cls.has_personal_state and self.eval.local_test_fraction <= 0:
            raise ScenarioError("eval.local_test_fraction", f"strategy {cls.name!r} keeps personal adapters, which "
                                "are evaluated on each client's local test split, but none is held out",
                                "set eval.local_test_fraction, e.g. 0.2")
        if self.clients.lora.is_mixed() and not cls.supports_mixed_ranks:
            mixed = [n for n, c in registry.entries("strategy").items() if c.supports_mixed_ranks]
            raise ScenarioError("clients.lora", f"strategy {cls.name!r} needs every client at one rank and alpha, "
                                "but the scenario mixes them", f"use one of {', '.join(mixed)} or a single rank")
        if self.training.grad_accum_steps > 1 and not cls.accumulates:
            raise ScenarioError("training.grad_accum_steps", f"strategy {cls.name!r} differentiates through one "
                                "batch per local step", "use a larger training.batch_size instead")
        if self.training.autocast == "fp16" and not cls.accumulates:
            raise ScenarioError("training.autocast", f"strategy {cls.name!r} differentiates through its local step, "
                                "where float16 would need loss scaling through the hypergradient",
                                "use autocast: bf16 (or true), or no autocast")
        if self.strategy.server_optimizer is not None and not cls.averages_factors:
            fits = [n for n, c in registry.entries("strategy").items() if c.averages_factors]
            raise ScenarioError("strategy.server_optimizer", f"strategy {cls.name!r} does not keep averaged factors "
                                "for a server optimizer to step on (it merges updates into the base, or keeps the "
                                "update in singular form)", f"use it with one of {', '.join(fits)}")
        try:
            cls.Params(**self.strategy.params)
        except ValidationError as e:
            raise ScenarioError("strategy.params", format_validation(e, prefix="strategy.params", model=cls.Params),
                                None) from None
        if self.strategy.robust is not None:
            self._check_robust(cls)
        if self.privacy is not None:
            self._check_privacy(cls)
        if self.resources.worker_partials is True and (why := self.partials_conflict(cls)) is not None:
            raise ScenarioError("resources.worker_partials", *why)
        return self

    def partials_conflict(self, cls: Any) -> tuple[str, str] | None:
        """Why workers cannot fold this scenario's updates into partials, and the fix — or None: they can where the
        round is a reduction the server need not look into one update at a time."""
        fix = "set resources.worker_partials: false"
        if not cls.streams:
            fits = [n for n, c in registry.entries("strategy").items() if c.streams]
            return (f"strategy {cls.name!r} aggregates the round's updates together (it does not stream), so "
                    "workers cannot fold them", f"{fix}, or use one of {', '.join(fits)}")
        if self.strategy.robust is not None:
            return f"strategy.robust ({self.strategy.robust.method}) needs every update of the round on the server", fix
        if self.privacy is not None and self.privacy.mode == "central":
            return "central differential privacy clips each update on the server", f"{fix}, or use privacy.mode: local"
        if self._objective_has_server_side():
            return (f"client objective {self.strategy.client_objective.name!r} sends each client's control variate "
                    "to the server's own state", fix)
        if self.clock.deadline_s is not None:
            return ("clock.deadline_s drops stragglers after they trained, but a folded update cannot be taken out "
                    "of its worker's partial", f"{fix}, or unset clock.deadline_s")
        return None

    def _check_privacy(self, cls: Any) -> None:
        """Differential privacy's conditions: δ < 1/N, uniform inclusion probabilities, and for central mode an
        average of factors at one rank, fed only by the clipped updates."""
        p, clients = self.privacy, self.clients
        n = clients.num_clients
        if not cls.aggregates:
            raise ScenarioError("privacy", f"strategy {cls.name!r} uploads nothing, so there is nothing to privatize",
                                "remove the privacy section, or use a strategy that aggregates")
        if p.delta_for(n) >= 1.0 / n:
            raise ScenarioError("privacy.delta", f"δ = {p.delta_for(n):g} is not below 1/N = {1 / n:g} (N = {n} "
                                "clients): a mechanism that releases one client's whole data with probability δ "
                                f"would satisfy it", f"set delta well below {1 / n:g}, e.g. {min(1e-5, 0.1 / n):.2g}")
        if clients.sampling == "size":
            raise ScenarioError("clients.sampling", "size-weighted sampling gives each client its own inclusion "
                                "probability, which the privacy accountant does not model",
                                "use sampling: uniform or poisson with privacy")
        if p.mode == "local":
            return
        why, fits = self._no_average_to_replace(cls)
        if why:
            raise ScenarioError("privacy.mode", f"central differential privacy with strategy {cls.name!r}: it {why}, "
                                "so there is no sum of updates to add the noise to",
                                f"use privacy.mode: local, or central with one of {', '.join(fits)} at one rank")
        if self.strategy.robust is not None:
            raise ScenarioError("privacy", "central differential privacy and strategy.robust both replace the "
                                "average of the updates", "use one of them (norm_bound's clipping is part of DP)")
        if self._objective_has_server_side():
            raise ScenarioError("privacy", f"client objective {self.strategy.client_objective.name!r} uploads "
                                "control variates that are neither clipped nor noised",
                                "use privacy without it, or with fedprox")
        if p.adaptive is not None:
            from fedsim.config.privacy import sample_rate

            count = p.adaptive.count_noise
            count = sample_rate(clients) * n / 20 if count is None else count
            sigma = p.noise_multiplier
            if sigma and (count == 0 or (2 * count) ** -2 >= sigma**-2):
                raise ScenarioError("privacy.adaptive.count_noise", f"the clipped count's noise {count:g} must "
                                    f"exceed noise_multiplier / 2 = {sigma / 2:g}, or it spends the whole budget",
                                    "raise count_noise or lower noise_multiplier")

    def _no_average_to_replace(self, cls: Any) -> tuple[str | None, list[str]]:
        """Why the strategy's aggregate is not an average of the clients' shared tensors, in the state's own
        coordinates, that a robust rule or differential privacy could replace (None: it is); and the strategies
        whose aggregate is."""
        fits = [n for n, c in registry.entries("strategy").items()
                if c.averages_factors and c.clients_start_from_state]
        if not cls.averages_factors:
            return ("does not average factors (it stacks, merges into the base, or keeps updates in singular form)",
                    fits)
        if not cls.clients_start_from_state:
            return ("trains each client on a rescaled, truncated copy of the global factors, which its own "
                    "aggregation maps back", fits)
        if self.clients.lora.is_mixed():
            return "mixes ranks, whose factors do not line up coordinate by coordinate", fits
        return None, fits

    def _objective_has_server_side(self) -> bool:
        """Whether the client objective brings a server stage of its own (SCAFFOLD's control variates)."""
        objective = self.client_objective()
        owner = next((c for c in type(objective).__mro__ if "server_stage" in vars(c)), None) if objective else None
        return owner is not None and owner.__name__ != "ClientObjective"

    def _check_robust(self, cls: Any) -> None:
        """Robust aggregation replaces an average of factors: refused, with the reason, where there is none."""
        rb = self.strategy.robust
        why, fits = self._no_average_to_replace(cls)
        if why:
            raise ScenarioError("strategy.robust", f"strategy {cls.name!r} {why}",
                                f"use robust aggregation with one of {', '.join(fits)} at a single rank")
        if rb.method == "norm_bound" and rb.max_norm is None:
            raise ScenarioError("strategy.robust.max_norm", "norm_bound needs the bound", "set max_norm, e.g. 1.0")
        n = self.clients.num_per_round()
        if rb.method in ("krum", "multi_krum") and n <= 2 * rb.byzantine + 2:
            raise ScenarioError("strategy.robust.byzantine", f"Krum with f = {rb.byzantine} needs more than "
                                f"{2 * rb.byzantine + 2} clients per round, and the scenario samples {n}",
                                f"sample at least {2 * rb.byzantine + 3} clients per round or lower byzantine")
        if rb.method == "multi_krum" and rb.select > n:
            raise ScenarioError("strategy.robust.select", f"multi_krum selects {rb.select} of {n} clients per round",
                                f"select at most {n}")
        if self._objective_has_server_side():
            raise ScenarioError("strategy.robust", f"client objective {self.strategy.client_objective.name!r} keeps "
                                "server state fed by every update (SCAFFOLD's control variates), which a robust rule "
                                "would bypass", "use robust aggregation without it, or with fedprox")

    @model_validator(mode="after")
    def _flipped_labels_need_labels(self) -> Scenario:
        bad = self.clients.malicious
        fmt = registry.entries("row_format").get(self.data.format)  # None: registered in the driver only (a worker)
        if bad is not None and bad.attack == "label_flip" and fmt is not None and not fmt.scored_by_options:
            raise ScenarioError("clients.malicious.attack", f"label_flip flips classification labels, and data.format "
                                f"{self.data.format!r} has none", "use data.format: classification, or a model "
                                "poisoning attack (sign_flip, scale, gaussian, fixed)")
        return self

    @model_validator(mode="after")
    def _metrics_known(self) -> Scenario:
        # the metrics' home imports torch: looked up only when the scenario names one
        generative = any(self._check_metric(name) for name in self.eval.metrics)
        if self.eval.generate is not None and not generative:
            raise ScenarioError("eval.generate", "generation is set up but eval.metrics names no metric of generated "
                                "text", "add one, e.g. eval.metrics: [rouge_l, exact_match]")
        return self

    @model_validator(mode="after")
    def _harness_usable(self) -> Scenario:
        h = self.eval.harness
        if h is None:
            return self
        if importlib.util.find_spec("lm_eval") is None:
            raise ScenarioError("eval.harness", "needs lm-evaluation-harness, which is not installed",
                                "pip install 'fedsim[eval]'")
        bad = [c for c in h.clients if not 0 <= c < self.clients.num_clients]
        if bad:
            raise ScenarioError("eval.harness.clients", f"no client(s) {bad}: the run has clients "
                                f"0..{self.clients.num_clients - 1}", "name existing client ids")
        return self

    def _check_metric(self, name: str) -> bool:
        """Raise a ScenarioError for a metric this scenario cannot report; whether it reads generated text."""
        if ":" in name:  # an import path: a function of generated text, or a Metric subclass
            obj = registry.load_object(name, "eval.metrics")
            if isinstance(obj, type) and hasattr(obj, "sums") and hasattr(obj, "reduce"):
                return bool(getattr(obj, "generative", False))
            if callable(obj):
                return True
            raise ScenarioError("eval.metrics", f"{name} is a {type(obj).__name__}, not a function or a Metric "
                                "subclass", "point at score(prediction: str, reference: str) -> float, or a Metric "
                                "subclass")
        known = registry.names("metric")
        if name not in known:
            raise ScenarioError("eval.metrics", f"unknown metric {name!r}", f"choose from {', '.join(known)}")
        cls = registry.get("metric", name)
        fmt = registry.entries("row_format").get(self.data.format)  # None: registered in the driver only (a worker)
        if getattr(cls, "needs_options", False) and fmt is not None and not fmt.scored_by_options:
            raise ScenarioError("eval.metrics", f"metric {name!r} needs a classification (label options), but "
                                f"data.format is {self.data.format!r}", "use data.format: classification")
        missing = [m for m in getattr(cls, "requires", ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise ScenarioError("eval.metrics", f"metric {name!r} needs the package(s) {missing}, which are not "
                                "installed", "pip install 'fedsim[eval]'")
        return bool(getattr(cls, "generative", False))

    def generation(self) -> GenerateConfig | None:
        """How generation-based evaluation runs: ``eval.generate``, or its defaults when ``eval.metrics`` names a
        metric of generated text; None when nothing is generated."""
        if self.eval.generate is not None:
            return self.eval.generate
        return GenerateConfig() if any(self._check_metric(n) for n in self.eval.metrics) else None

    @model_validator(mode="after")
    def _objective_known(self, info: ValidationInfo) -> Scenario:
        if self.strategy.client_objective is None or (info.context and info.context.get("strategy") is False):
            return self
        obj = self.client_objective()  # raises a ScenarioError naming the field
        cls = registry.get("strategy", self.strategy.name)
        takers = [n for n, c in registry.entries("strategy").items() if c.takes_objectives]
        if not cls.takes_objectives:
            raise ScenarioError("strategy.client_objective", f"strategy {cls.name!r} trains with a procedure that "
                                "takes no client objectives (its bilevel hypergradient differentiates the plain loss)",
                                f"use {self.strategy.client_objective.name!r} with one of {', '.join(takers)}")
        refusal = obj.refuses(cls, self)
        if refusal is not None:
            raise ScenarioError("strategy.client_objective", *refusal)
        return self

    def client_objective(self) -> Any:
        """The client objective ``strategy.client_objective`` names, with its params (None without one).

        Raises:
            ScenarioError: an unknown objective, or params it does not take.
        """
        cfg = self.strategy.client_objective
        if cfg is None:
            return None
        cls = registry.get("objective", cfg.name)
        try:
            return cls(**cfg.params)
        except (TypeError, ValueError) as e:
            raise ScenarioError("strategy.client_objective.params", str(e).splitlines()[0],
                                f"give the params {cfg.name!r} takes") from None

    def strategy_params(self) -> BaseModel:
        """The strategy's own validated hyperparameters."""
        return registry.get("strategy", self.strategy.name).Params(**self.strategy.params)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved scenario (all defaults filled in) as plain YAML-able data."""
        return self.model_dump(mode="json")

