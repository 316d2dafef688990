import pytest
from pydantic import ValidationError

from fedsim.config import apply_overrides, dump_scenario, load_scenario, scenario_from_dict
from fedsim.errors import ScenarioError


def test_quickstart_loads_and_is_frozen():
    sc = load_scenario("scenarios/quickstart.yaml")
    assert sc.clients.num_clients >= 20 and sc.rounds <= 10
    assert sc.resources.backend == "ray" and sc.resources.num_workers == 2
    assert sc.partition.method == "dirichlet" and sc.strategy.name == "fedit"
    with pytest.raises(ValidationError, match="frozen"):
        sc.rounds = 3


def test_overrides_apply_to_nested_keys(tiny_raw):
    sc = scenario_from_dict(tiny_raw, ["rounds=7", "clients.lora.rank=2", "training.lr=0.5", "model.target_modules=[q_proj]"])
    assert sc.rounds == 7 and sc.clients.lora.rank == 2 and sc.training.lr == 0.5
    assert sc.model.target_modules == ("q_proj",)


def test_overrides_do_not_mutate_input(tiny_raw):
    before = repr(tiny_raw)
    apply_overrides(tiny_raw, ["clients.num_clients=3"])
    assert repr(tiny_raw) == before


def test_resolved_scenario_round_trips(tiny_scenario):
    import yaml

    again = scenario_from_dict(yaml.safe_load(dump_scenario(tiny_scenario)))
    assert again == tiny_scenario


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["bogus=1"], "bogus"),
        (["clients.lora.alpha=0"], "clients.lora.alpha"),
        (["clients.lora.alpha=-2"], "clients.lora.alpha"),
        (["clients.lora.rank=0"], "clients.lora.rank"),
        (["rounds=three"], "rounds"),
        (["strategy.name=nope"], "strategy.name"),
        (["clients.per_round=50"], "per_round"),
        (["clients.per_round=1.5"], "per_round"),
        (["training.local_epochs=1"], "local_steps or local_epochs"),
        (["model.tiny.num_heads=3"], "num_heads"),
        (["data.format=images"], "data.format"),
        (["partition.method=random"], "partition.method"),
        (["resources.backend=spark"], "resources.backend"),
        (["logging.wandb.mode=loud"], "logging.wandb.mode"),
        (["data.prompt_template={x.__class__}"], "data.prompt_template"),
        (["model.trust_remote_code=true"], "trust_remote_code"),
        (["strategy.params={lr: 1}"], "strategy.params"),
        (["clients.lora={rank: 4, alfa: 8}"], "clients.lora.alfa"),
    ],
)
def test_invalid_values_name_the_field(tiny_raw, overrides, field):
    with pytest.raises(ScenarioError) as e:
        scenario_from_dict(tiny_raw, overrides)
    assert field in str(e.value)


def test_unknown_strategy_lists_registered(tiny_raw):
    with pytest.raises(ScenarioError, match="fedit"):
        scenario_from_dict(tiny_raw, ["strategy.name=fedprox9000"])


def test_bad_override_syntax():
    with pytest.raises(ScenarioError, match="no '='"):
        apply_overrides({}, ["rounds"])
    with pytest.raises(ScenarioError, match="not a section"):
        apply_overrides({"rounds": 3}, ["rounds.x=1"])


def test_yaml_cannot_execute_code(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(f)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario(tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match="mapping"):
        load_scenario(f)


def test_fraction_per_round(tiny_raw):
    sc = scenario_from_dict(tiny_raw, ["clients.per_round=0.5"])
    assert sc.clients.num_per_round() == 4


TIERS = {"tiers": [{"fraction": 0.1, "rank": 64, "alpha": 128}, {"fraction": 0.2, "rank": 32},
                   {"fraction": 0.3, "rank": 16}, {"fraction": 0.4, "rank": 4}]}


def test_rank_tiers_assign_exact_shares_seeded(tiny_raw):
    tiny_raw["clients"] = {"num_clients": 20, "per_round": 5, "lora": TIERS}
    tiny_raw["strategy"] = {"name": "flora"}
    sc = scenario_from_dict(tiny_raw)
    ranks = [r for r, _ in sc.clients.lora.assign(20, seed=1)]
    assert sorted(ranks) == [4] * 8 + [16] * 6 + [32] * 4 + [64] * 2
    assert ranks == [r for r, _ in sc.clients.lora.assign(20, seed=1)]
    assert ranks != [r for r, _ in sc.clients.lora.assign(20, seed=2)]
    alphas = dict(sc.clients.lora.assign(20, seed=1))
    assert alphas[64] == 128 and alphas[32] == 64  # alpha defaults to 2 × rank


def test_rank_mix_errors(tiny_raw):
    tiny_raw["clients"]["lora"] = TIERS
    with pytest.raises(ScenarioError, match="fedit.*mixes them.*flora"):
        scenario_from_dict(tiny_raw)
    tiny_raw["strategy"] = {"name": "flora"}
    with pytest.raises(ScenarioError, match="sum to 0.9"):
        scenario_from_dict(tiny_raw, ["clients.lora.tiers=[{fraction: 0.5, rank: 2}, {fraction: 0.4, rank: 4}]"])
    with pytest.raises(ScenarioError, match="one entry per client"):
        scenario_from_dict(tiny_raw, ["clients.lora.tiers=null", "clients.lora.per_client=[{rank: 2}, {rank: 4}]"])
    with pytest.raises(ScenarioError, match="rank"):
        scenario_from_dict(tiny_raw, ["clients.lora.tiers=[{fraction: 1.0, rank: 0}]"])
    with pytest.raises(ScenarioError, match="alpha"):
        scenario_from_dict(tiny_raw, ["clients.lora.tiers=[{fraction: 1.0, rank: 2, alpha: -1}]"])
    for name in ("ffa", "fedex"):
        with pytest.raises(ScenarioError, match="mixes them"):
            scenario_from_dict(tiny_raw, [f"strategy.name={name}"])


def test_rank_above_layer_width_is_refused(tiny_raw):
    from fedsim.driver import prepare

    tiny_raw["clients"]["lora"] = {"rank": 40, "alpha": 8}
    with pytest.raises(ScenarioError, match="smallest adapted dimension 32"):
        prepare(scenario_from_dict(tiny_raw))


@pytest.mark.parametrize(("override", "said"), [
    ("resources.worker_partials=maybe", "resources.worker_partials: expected true, false or 'auto', got 'maybe'"),
    ("resources.clients_per_call=many", "resources.clients_per_call: expected an integer or 'auto', got 'many'"),
    ("data.max_seq_len=abc", "data.max_seq_len: expected an integer or 'auto', got 'abc'"),
])
def test_a_value_that_fits_no_member_of_a_union_is_one_line_naming_what_fits(tiny_raw, override, said):
    """pydantic names each member of a union apart (``worker_partials.bool: …; worker_partials.literal['auto']:
    …``); the error says once what the key takes and what it got."""
    with pytest.raises(ScenarioError) as e:
        scenario_from_dict(tiny_raw, [override])
    assert str(e.value).startswith(said), str(e.value)
