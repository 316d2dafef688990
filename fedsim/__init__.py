"""fedsim: simulate federated LoRA fine-tuning of LLMs on one machine or a Ray cluster.

Public API::

    from fedsim import load_scenario, run_scenario
    summary = run_scenario(load_scenario("scenarios/quickstart.yaml"))
"""

from fedsim.config import Scenario, load_scenario, scenario_from_dict
from fedsim.driver import run_scenario
from fedsim.errors import AggregationError, BackendError, DataError, FedsimError, ScenarioError
from fedsim.strategies import Strategy, available_strategies, make_strategy, register
from fedsim.types import ClientPayload, ClientSpec, ClientUpdate, GlobalState, LoraSpec, RoundContext

__version__ = "0.1.0"

__all__ = [
    "AggregationError", "BackendError", "ClientPayload", "ClientSpec", "ClientUpdate", "DataError", "FedsimError",
    "GlobalState", "LoraSpec", "RoundContext", "Scenario", "ScenarioError", "Strategy", "available_strategies",
    "load_scenario", "make_strategy", "register", "run_scenario", "scenario_from_dict",
]
