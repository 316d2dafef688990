"""Other architectures, offline (#25 points 2 and 5): ``model.config`` builds a randomly initialised stand-in of any
transformers architecture (a mapping with its model_type, or a local config.json), with the byte-level tokenizer or
a tokenizer directory; GPT-2's Conv1D layers are adapted, merged into and quantized through their (d_out, d_in) view;
a model whose head the task would drop is refused."""

from __future__ import annotations

import json

import pytest
import torch
from tolerances import F32_ALGEBRA

from fedsim.config import ModelConfig, scenario_from_dict
from fedsim.errors import ScenarioError
from fedsim.models.base import build_base_model, load_tokenizer, target_shapes, weight_matrix


def gpt2(**over):
    from conftest import GPT2

    return ModelConfig(**{**GPT2, **over})


def test_a_standin_is_the_named_architecture_seeded_with_the_byte_tokenizer():
    model = build_base_model(gpt2())
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.vocab_size == 384 and model.config.pad_token_id == 0 and model.config.eos_token_id == 1
    again, other = build_base_model(gpt2()), build_base_model(gpt2(seed=7))
    w = model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(w, again.transformer.h[0].attn.c_attn.weight)
    assert not torch.equal(w, other.transformer.h[0].attn.c_attn.weight)
    tok = load_tokenizer(gpt2())  # the byte-level tokenizer: ByT5's ids, nothing appended
    assert len(tok) == 384 and tok("ab")["input_ids"] == [ord("a") + 3, ord("b") + 3]


def test_a_standin_from_a_config_file_and_a_tokenizer_directory(tmp_path):
    from transformers import ByT5Tokenizer, GPT2Config

    GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=400, n_positions=32).save_pretrained(tmp_path / "cfg")
    ByT5Tokenizer().save_pretrained(tmp_path / "tok")
    cfg = ModelConfig(name="my-gpt2", config=str(tmp_path / "cfg"), tokenizer=str(tmp_path / "tok"),
                      target_modules=["c_attn"])
    model = build_base_model(cfg)
    assert model.config.vocab_size == 400 and model.config.n_embd == 16
    assert load_tokenizer(cfg).pad_token_id == 0
    assert list(target_shapes(cfg)) == ["transformer.h.0.attn.c_attn"]
    by_file = cfg.model_copy(update={"config": str(tmp_path / "cfg" / "config.json")})
    assert build_base_model(by_file).config.n_embd == 16


def test_standin_mistakes_are_one_line_errors(tiny_raw, tmp_path):
    tiny_raw["model"] = {"name": "x", "config": {"hidden_size": 32}}
    with pytest.raises(ScenarioError, match="needs its model_type"):
        scenario_from_dict(tiny_raw)
    tiny_raw["model"]["config"] = str(tmp_path / "nowhere")
    with pytest.raises(ScenarioError, match="neither a config.json file nor a directory holding one"):
        scenario_from_dict(tiny_raw)
    with pytest.raises(ScenarioError, match="model.config: cannot build a config from .*'not_a_model'"):
        build_base_model(ModelConfig(config={"model_type": "not_a_model"}))
    with pytest.raises(ScenarioError, match="vocab_size 100 is smaller than the byte-level tokenizer's 384 ids"):
        build_base_model(gpt2(config={"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2,
                                      "vocab_size": 100}))


def test_a_sequence_classifier_is_not_loaded_as_a_causal_lm(tmp_path):
    """The issue's silent failure: a RoBERTa classifier directory run as a causal LM lost its classifier and scored
    through a random LM head. Asked for causal_lm, it is refused, naming the task that fits."""
    from transformers import RobertaConfig

    RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=400,
                  architectures=["RobertaForSequenceClassification"], num_labels=2).save_pretrained(tmp_path)
    cfg = ModelConfig(name=str(tmp_path), task="causal_lm", target_modules=["query", "value"])
    with pytest.raises(ScenarioError, match="is a RobertaForSequenceClassification: loading it as a causal LM would "
                                            "drop its head.*model.task: seq_cls"):
        build_base_model(cfg)
    with pytest.raises(ScenarioError, match="RobertaForSequenceClassification"):
        target_shapes(cfg)


def test_conv1d_weights_are_seen_as_d_out_by_d_in():
    model = build_base_model(gpt2())
    layer = model.transformer.h[0].attn.c_attn  # Conv1D: weight (d_in, d_out) = (32, 96)
    view = weight_matrix(layer)
    assert view.shape == (96, 32)
    x = torch.randn(3, 32)
    assert torch.allclose(layer(x), x @ view.t() + layer.bias, atol=F32_ALGEBRA)
    with torch.no_grad():
        view.add_(1.0)  # a merge in place reaches the layer
    assert torch.allclose(layer.weight, weight_matrix(build_base_model(gpt2()).transformer.h[0].attn.c_attn).t() + 1)


@pytest.mark.parametrize("backend,bits", [("hqq", 4), ("bnb", 8)])
def test_a_quantized_gpt2_computes_its_conv1d_layers_as_linear_ones(backend, bits):
    from fedsim.models.quant import dequantized_weight, quantizable_layers, quantize_model
    from fedsim.types import QuantSpec

    base = build_base_model(gpt2())
    assert sorted(quantizable_layers(base)) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                                "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    q = quantize_model(base, QuantSpec(bits=bits, backend=backend, group_size=32), torch.device("cpu"),
                       torch.float32)
    for name, layer in quantizable_layers(base).items():
        full, deq = weight_matrix(layer).float(), dequantized_weight(q.get_submodule(name))
        assert deq.shape == full.shape
        assert float((deq - full).norm() / full.norm()) < (0.15 if bits == 4 else 0.02)
    ids = torch.randint(2, 300, (2, 12))
    with torch.no_grad():
        a, b = base(input_ids=ids).logits, q(input_ids=ids).logits
    assert float((a - b).abs().max()) < 0.5 * float(a.abs().max())


def test_the_exported_config_of_a_gpt2_run_says_fan_in_fan_out(tmp_path):
    from peft import LoraConfig

    from fedsim.lora.merge import ExportedAdapter
    from fedsim.models.adapter_io import save_peft_adapter
    from fedsim.types import LoraSpec

    sc = scenario_from_dict({"model": json.loads(json.dumps(gpt2().model_dump(mode="json")))})
    save_peft_adapter(ExportedAdapter(tensors={}, lora=LoraSpec(4, 8.0)), sc, tmp_path)
    assert LoraConfig.from_pretrained(str(tmp_path)).fan_in_fan_out is True


def test_a_standin_caps_the_sequence_length_at_its_positions(tmp_path):
    from conftest import ROBERTA

    from fedsim.models.base import position_limit

    assert position_limit(gpt2()) == 64  # n_positions
    assert position_limit(ModelConfig(**ROBERTA)) == 80 - 1  # RoBERTa numbers positions from the padding id + 1
    assert position_limit(ModelConfig(name=str(tmp_path))) is None  # a loaded model: its tokenizer says


def test_data_to_text_rows_join_their_triples():
    from fedsim.config import DataConfig
    from fedsim.data.formats.data_to_text import DataToText
    from fedsim.errors import DataError

    cfg = DataConfig(format="data_to_text", prompt_template="Triples: {input}\nText: ", response_field="target")
    row = {"input": ["Alan_Bean | occupation | Test_pilot", "Alan_Bean | birthPlace | Wheeler"],
           "target": "Alan Bean, born in Wheeler, was a test pilot."}
    fmt = DataToText()
    fmt.check_row(row, cfg, "row 1")
    ex = fmt.example(row, cfg)
    assert ex.prompt == "Triples: Alan_Bean | occupation | Test_pilot ; Alan_Bean | birthPlace | Wheeler\nText: "
    assert ex.response == row["target"]
    with pytest.raises(DataError, match=r"row 2 field 'input\[\]' is a list"):
        fmt.check_row({"input": [["nested"]], "target": "x"}, cfg, "row 2")


@pytest.mark.parametrize("backend,bits", [("bnb", 4), ("bnb", 8), ("hqq", 3)])
def test_a_quantized_encoder_classifier_keeps_its_head_in_full_precision(backend, bits):
    from conftest import ROBERTA

    from fedsim.models.quant import quantizable_layers, quantize_model
    from fedsim.models.tasks import task_for
    from fedsim.types import QuantSpec

    cfg = ModelConfig(**ROBERTA)
    base = task_for(cfg).build(cfg)
    assert not any(n.startswith("classifier") for n in quantizable_layers(base))
    q = quantize_model(base, QuantSpec(bits=bits, backend=backend, group_size=32), torch.device("cpu"), torch.float32)
    assert type(q.classifier.dense) is torch.nn.Linear and type(q.classifier.out_proj) is torch.nn.Linear
    assert torch.equal(q.classifier.out_proj.weight, base.classifier.out_proj.weight)
    assert type(q.roberta.encoder.layer[0].attention.self.query) is not torch.nn.Linear
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        a, b = base(input_ids=ids).logits, q(input_ids=ids).logits
    assert torch.isfinite(b).all() and float((a - b).abs().max()) < 1.0
