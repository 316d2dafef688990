"""``model.target_modules`` in PEFT's three forms (#25 point 3): a list (full names or suffixes after a dot), a regular
expression (full names) and ``all-linear`` — the shapes fedsim uses are the modules PEFT adapts, checked against PEFT
itself; a name that matches nothing is an error naming the near misses."""

import json

import pytest

from fedsim.config import ModelConfig, scenario_from_dict
from fedsim.errors import ScenarioError
from fedsim.models.base import build_base_model, peft_matches, target_shapes

FORMS = [("q_proj", "v_proj"), ("self_attn.o_proj", "mlp.down_proj"), r".*\.layers\.1\.mlp\.(up|gate)_proj",
         "all-linear"]


GPT2_FORMS = [("c_attn",), ("attn.c_proj", "mlp.c_fc"), r"transformer\.h\.0\.mlp\.c_.*", "all-linear"]


def _peft_adapted(target, cfg=None) -> set[str]:
    """The modules PEFT itself puts a LoRA layer on (the tiny model by default)."""
    import peft

    model = peft.get_peft_model(build_base_model(cfg or ModelConfig()),
                                peft.LoraConfig(r=2, target_modules=list(target) if isinstance(target, tuple)
                                                else target))
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")
            and isinstance(getattr(m, "lora_A", None), __import__("torch").nn.ModuleDict)}


@pytest.mark.parametrize("target", FORMS, ids=["names", "suffixes", "regex", "all-linear"])
def test_fedsims_shapes_are_the_modules_peft_adapts(target):
    cfg = ModelConfig(target_modules=target)
    assert set(target_shapes(cfg)) == _peft_adapted(target)


@pytest.mark.parametrize("target", GPT2_FORMS, ids=["names", "suffixes", "regex", "all-linear"])
def test_gpt2_conv1d_layers_are_matched_as_peft_matches_them(target):
    """GPT-2's c_attn / c_proj / c_fc are transformers' Conv1D (weight stored (d_in, d_out)): adaptable, with the
    shapes PEFT gives their factors; all-linear leaves out the tied LM head as PEFT does."""
    from conftest import GPT2

    cfg = ModelConfig(**{**GPT2, "target_modules": target})
    shapes = target_shapes(cfg)
    assert set(shapes) == _peft_adapted(target, cfg)
    if "transformer.h.0.attn.c_attn" in shapes:
        s = shapes["transformer.h.0.attn.c_attn"]
        assert (s.d_in, s.d_out) == (32, 96)  # n_embd → 3 · n_embd


def test_the_matching_rule_is_peft_s():
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    names = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.up_proj", "lm_head", "q_proj", "xq_proj",
             "model.layers.0.self_attn.q_proj.sub"]
    for target in (("q_proj",), ("self_attn.q_proj", "lm_head"), r"model\.layers\.\d+\.self_attn\..*", "lm_head"):
        cfg = LoraConfig(target_modules=list(target) if isinstance(target, tuple) else target)
        for n in names:
            assert peft_matches(n, target) == bool(check_target_module_exists(cfg, n)), (target, n)


def test_a_name_or_pattern_that_matches_nothing_names_the_near_misses(tiny_raw):
    with pytest.raises(ScenarioError, match=r"'q_prj' matches no linear layer of tiny \(near misses: q_proj, "):
        target_shapes(ModelConfig(target_modules=("q_prj", "v_proj")))
    with pytest.raises(ScenarioError, match="the regular expression 'q_proj' matches no linear layer's full name"):
        target_shapes(ModelConfig(target_modules="q_proj"))
    with pytest.raises(ScenarioError, match=r"matches model.layers.0.mlp.act_fn of tiny, a SiLUActivation: LoRA "
                                            "adapts linear layers only"):
        target_shapes(ModelConfig(target_modules=r".*\.mlp\..*"))  # PEFT itself fails on the activation
    with pytest.raises(ScenarioError, match="matches model.layers.0.mlp of tiny, a LlamaMLP"):
        target_shapes(ModelConfig(target_modules=("mlp",)))
    tiny_raw["model"]["target_modules"] = "(unclosed"
    with pytest.raises(ScenarioError, match="neither all-linear nor a regular expression"):
        scenario_from_dict(tiny_raw)


def test_a_run_with_a_regular_expression_exports_it_for_peft(tiny_raw, tmp_path):
    from fedsim.driver import run_scenario

    tiny_raw.update(rounds=1)
    tiny_raw["model"]["target_modules"] = r".*\.(q_proj|down_proj)"
    run_scenario(scenario_from_dict(tiny_raw), tmp_path / "run")
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == r".*\.(q_proj|down_proj)"
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in keys} == {"q_proj", "down_proj"}
