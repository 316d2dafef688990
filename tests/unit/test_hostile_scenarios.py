"""At least 50 mutations of the quickstart scenario: every one ends in a ScenarioError (one clear message), never an
unhandled exception; YAML can never execute code."""

import copy

import pytest
import yaml

from fedsim.config import load_scenario, scenario_from_dict
from fedsim.errors import ScenarioError

with open("scenarios/quickstart.yaml") as f:
    QUICKSTART = yaml.safe_load(f)


def _set(path, value):
    def mutate(raw):
        node = raw
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return mutate


def _drop(path):
    def mutate(raw):
        node = raw
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
    return mutate


MUTATIONS = {
    # wrong types
    "rounds-string": _set(["rounds"], "ten"), "rounds-list": _set(["rounds"], [1]), "seed-float": _set(["seed"], 1.5),
    "seed-negative": _set(["seed"], -1), "name-int-list": _set(["name"], [1, 2]), "name-path": _set(["name"], "../x"),
    "name-empty": _set(["name"], ""), "model-string": _set(["model"], "tiny"),
    "targets-string-int": _set(["model", "target_modules"], 5), "targets-empty": _set(["model", "target_modules"], []),
    "dtype-bad": _set(["model", "dtype"], "float8"), "dropout-1": _set(["model", "lora_dropout"], 1.0),
    "remote-code": _set(["model", "trust_remote_code"], True), "tiny-heads": _set(["model", "tiny", "num_heads"], 5),
    "tiny-zero-layers": _set(["model", "tiny", "num_layers"], 0), "data-format": _set(["data", "format"], "audio"),
    "data-tasks-unknown": _set(["data", "synthetic", "tasks"], ["fly"]),
    "data-tasks-empty": _set(["data", "synthetic", "tasks"], []),
    "data-num-train-0": _set(["data", "synthetic", "num_train"], 0), "seq-len-2": _set(["data", "max_seq_len"], 2),
    "template-attr": _set(["data", "prompt_template"], "{x.__class__.__init__.__globals__}"),
    "template-index": _set(["data", "prompt_template"], "{x[0]}"),
    "test-fraction-1": _set(["data", "test", "fraction"], 1.0), "partition-method": _set(["partition", "method"], "x"),
    "partition-alpha-0": _set(["partition", "alpha"], 0), "partition-alpha-neg": _set(["partition", "alpha"], -1),
    "min-samples-0": _set(["partition", "min_samples"], 0), "clients-0": _set(["clients", "num_clients"], 0),
    "per-round-0": _set(["clients", "per_round"], 0), "per-round-neg": _set(["clients", "per_round"], -0.5),
    "per-round-too-many": _set(["clients", "per_round"], 21), "per-round-bool": _set(["clients", "per_round"], True),
    "rank-0": _set(["clients", "lora", "rank"], 0), "alpha-0": _set(["clients", "lora", "alpha"], 0),
    "alpha-neg": _set(["clients", "lora", "alpha"], -16), "alpha-string": _set(["clients", "lora", "alpha"], "big"),
    "tiers-sum": _set(["clients", "lora", "tiers"], [{"fraction": 0.3, "rank": 2}]),
    "tiers-missing-rank": _set(["clients", "lora", "tiers"], [{"fraction": 1.0}]),
    "steps-0": _set(["training", "local_steps"], 0), "steps-and-epochs": _set(["training", "local_epochs"], 1),
    "batch-0": _set(["training", "batch_size"], 0), "lr-0": _set(["training", "lr"], 0),
    "lr-neg": _set(["training", "lr"], -1e-3), "optimizer": _set(["training", "optimizer"], "lion"),
    "clip-0": _set(["training", "max_grad_norm"], 0), "eval-every-0": _set(["eval", "every"], 0),
    "strategy-unknown": _set(["strategy", "name"], "fedmagic"), "strategy-params": _set(["strategy", "params"], {"x": 1}),
    "strategy-params-list": _set(["strategy", "params"], [1]), "backend": _set(["resources", "backend"], "mpi"),
    "workers-0": _set(["resources", "num_workers"], 0), "cpus-0": _set(["resources", "num_cpus"], 0),
    "gpus-neg": _set(["resources", "num_gpus"], -1), "wandb-mode": _set(["logging", "wandb", "mode"], "loud"),
    "progress": _set(["logging", "progress"], "fancy"),
    # unknown fields and wrong nesting
    "unknown-top": _set(["epochs"], 3), "unknown-nested": _set(["training", "epochs"], 3),
    "lora-at-top": _set(["lora"], {"rank": 4}), "rank-in-clients": _set(["clients", "rank"], 4),
    "wandb-at-top": _set(["wandb"], {"mode": "offline"}), "model-in-data": _set(["data", "model"], "tiny"),
    # missing sections are filled by defaults, but not inside list entries
    "tier-missing-fraction": _set(["clients", "lora", "tiers"], [{"rank": 4}]),
    # huge values
    "rounds-huge": _set(["rounds"], 10**12), "clients-huge": _set(["clients", "num_clients"], 10**12),
    "rank-huge": _set(["clients", "lora", "rank"], 10**9), "seq-huge": _set(["data", "max_seq_len"], 10**9),
    "workers-huge": _set(["resources", "num_workers"], 10**7), "seed-huge": _set(["seed"], 2**80),
    # quantization and personalization
    "bits-string": _set(["clients", "quant", "bits"], "four"), "bits-7": _set(["clients", "quant", "bits"], 7),
    "bits-bnb-2": _set(["clients", "quant"], {"bits": 2, "backend": "bnb"}),
    "quant-backend": _set(["clients", "quant", "backend"], "gptq"),
    "quant-tiers-sum": _set(["clients", "quant", "tiers"], [{"fraction": 0.5, "bits": 4}]),
    "quant-tier-no-bits": _set(["clients", "quant", "tiers"], [{"fraction": 1.0}]),
    "quant-per-client-length": _set(["clients", "quant", "per_client"], [{"bits": 4}]),
    "group-size-odd": _set(["clients", "quant"], {"bits": 2, "group_size": 12}),
    "pf2lora-no-local-test": _set(["strategy"], {"name": "pf2lora"}),
    "pf2lora-rank-0": lambda raw: raw.update(strategy={"name": "pf2lora", "params": {"personal_rank": 0}},
                                             eval={"local_test_fraction": 0.2}),
    "feddpa-a-2": lambda raw: raw.update(strategy={"name": "feddpa", "params": {"a": 2}},
                                         eval={"local_test_fraction": 0.2}),
    "failed-rounds-neg": _set(["resources", "max_failed_rounds"], -1),
    "availability-0": _set(["clients", "availability"], 0), "client-dropout-1": _set(["clients", "dropout"], 1.0),
    "sampling-bad": _set(["clients", "sampling"], "greedy"), "speed-0": _set(["clock", "steps_per_s"], 0),
    "deadline-neg": _set(["clock", "deadline_s"], -5), "speed-bits-0": _set(["clock", "by_bits"], {2: 0}),
    "speed-tiers-sum": _set(["clock", "tiers"], [{"fraction": 0.3, "steps_per_s": 1}]),
    "pools-overlap": _set(["resources", "pools"], [{"bits": [2, 4]}, {"bits": [4]}]),
    "pool-no-bits": _set(["resources", "pools"], [{"bits": [], "num_workers": 1}]),
    "pool-workers-0": _set(["resources", "pools"], [{"bits": [2], "num_workers": 0}]),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutation_is_a_clear_scenario_error(name):
    raw = copy.deepcopy(QUICKSTART)
    MUTATIONS[name](raw)
    with pytest.raises(ScenarioError) as e:
        scenario_from_dict(raw)
    assert str(e.value) and "Traceback" not in str(e.value) and len(str(e.value)) < 2000


def test_there_are_at_least_fifty_mutations():
    assert len(MUTATIONS) >= 50


def test_missing_sections_fall_back_to_defaults():
    raw = copy.deepcopy(QUICKSTART)
    _drop(["training"])(raw)
    _drop(["eval"])(raw)
    assert scenario_from_dict(raw).training.batch_size == 8


@pytest.mark.parametrize("text, match", [
    ("!!python/object/apply:os.system ['touch /tmp/fedsim-pwned']", "not valid YAML"),
    ("rounds: !!python/name:os.system", "not valid YAML"),
    ("a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n",
     "more than"),
    ("rounds: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
    ("42\n", "mapping"),
])
def test_hostile_yaml_files(tmp_path, text, match):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(ScenarioError, match=match):
        load_scenario(f)
    assert not (tmp_path / "fedsim-pwned").exists()
