"""The scenario schema: YAML in, validated frozen objects out.

A scenario file is parsed with ``yaml.safe_load`` (it can never execute code or import modules), command-line
``--set a.b=c`` overrides are applied to the raw mapping, and the result is validated by pydantic into a frozen
:class:`Scenario`. Unknown keys are rejected everywhere. Errors come out as one :class:`~fedsim.errors.ScenarioError`
that names each offending field and the fix. Names of components (strategies, data formats, synthetic tasks) are
checked through :mod:`fedsim.registry`, never by importing their owners.

One module per group of sections: :mod:`~fedsim.config.model`, :mod:`~fedsim.config.data` (data, partition),
:mod:`~fedsim.config.clients` (clients, LoRA and quantization mixes), :mod:`~fedsim.config.training` (training, eval,
checkpoint, clock, faults), :mod:`~fedsim.config.resources` (resources, logging), :mod:`~fedsim.config.scenario` (the
whole, and checks across sections), :mod:`~fedsim.config.loading` (files and overrides); :mod:`~fedsim.config.quant`
holds what the quantization backends can do.
"""

from fedsim.config.asynchronous import AsyncConfig
from fedsim.config.base import Frozen, deal_tiers
from fedsim.config.clients import (
    ClientsConfig,
    LoraSpecConfig,
    QuantChoice,
    QuantConfig,
    QuantTier,
    RankChoice,
    RankTier,
)
from fedsim.config.compression import CompressionConfig
from fedsim.config.data import DataConfig, PartitionConfig, SourceConfig, SyntheticConfig, TestSplitConfig
from fedsim.config.loading import (
    apply_overrides,
    dump_scenario,
    load_scenario,
    parse_override,
    scenario_from_dict,
)
from fedsim.config.model import DEFAULT_TARGET_MODULES, ModelConfig, TinyModelConfig
from fedsim.config.resources import (
    MAX_CLIENTS_PER_PASS,
    LoggingConfig,
    ResourcesConfig,
    ServerResources,
    WandbConfig,
    WorkerPool,
)
from fedsim.config.scenario import ObjectiveConfig, Scenario, ServerOptimizerConfig, StrategyConfig
from fedsim.config.training import (
    CheckpointConfig,
    ClockConfig,
    EvalConfig,
    FaultsConfig,
    GenerateConfig,
    HarnessConfig,
    SpeedTier,
    TrainingConfig,
)

__all__ = [
    "AsyncConfig", "DEFAULT_TARGET_MODULES", "MAX_CLIENTS_PER_PASS", "CheckpointConfig", "ClientsConfig", "ClockConfig", "CompressionConfig", "DataConfig",
    "EvalConfig", "FaultsConfig", "Frozen", "GenerateConfig", "HarnessConfig", "LoggingConfig", "LoraSpecConfig", "ModelConfig", "ObjectiveConfig", "PartitionConfig",
    "QuantChoice", "QuantConfig", "QuantTier", "RankChoice", "RankTier", "ResourcesConfig", "Scenario",
    "ServerOptimizerConfig", "ServerResources", "SourceConfig", "SpeedTier", "StrategyConfig", "SyntheticConfig", "TestSplitConfig", "TinyModelConfig",
    "TrainingConfig", "WandbConfig", "WorkerPool", "apply_overrides", "deal_tiers", "dump_scenario", "load_scenario",
    "parse_override", "scenario_from_dict",
]
