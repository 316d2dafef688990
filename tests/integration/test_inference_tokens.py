"""What the exported model sees is what the simulator saw (issue #42 point 6), for every tokenizer family: the run's
adapter directory holds the tokenizer; ``tokenizer(prompt)`` from it gives the simulator's prompt tokens exactly, and
plain ``generate`` on the tiny base rebuilt outside fedsim (the documented recipe, docs/getting-started.md) with the adapter loaded by PEFT
reproduces the simulator's greedy generations."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import offline_tokenizer

from fedsim.config import scenario_from_dict
from fedsim.driver import run_scenario

PROMPTS = [f"the {a} {b} says" for a in ("quick", "brown", "lazy", "man") for b in ("dog", "fox", "guitar", "street")]
# words the offline tokenizers know (trained on conftest's sentences): every prompt's tokens differ


def readme_tiny_base(hidden=32, intermediate=64, layers=1, heads=2, positions=512, init_seed=1234, init_std=0.1):
    """The documented recipe: the built-in tiny base, rebuilt with plain transformers (``model.tiny``'s settings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=384, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=positions, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                         tie_word_embeddings=False, initializer_range=init_std)
    torch.manual_seed(init_seed)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family", [None, "bpe", "sentencepiece", "t5", "wordpiece"])
def test_generate_on_the_export_reproduces_the_simulators_generations(tiny_raw, tmp_path, family):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from fedsim.data.datasets import load_data

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "completion": " jumps over"}) + "\n" for p in PROMPTS))
    if family is not None:
        tiny_raw["model"]["tokenizer"] = offline_tokenizer(family, tmp_path / "tok")
    tiny_raw.update(rounds=1)
    tiny_raw["data"] = {"source": str(src), "format": "prompt_completion", "task_field": None, "max_seq_len": 48,
                        "test": {"fraction": 0.25}}
    tiny_raw["partition"] = {"method": "iid"}
    tiny_raw["clients"].update(num_clients=2, per_round=2)
    tiny_raw["training"].update(local_steps=4, lr=0.05)
    tiny_raw["eval"] = {"every": 1, "batch_size": 8, "metrics": ["exact_match"],
                        "generate": {"max_samples": None, "log_samples": 100,
                                                                   "max_new_tokens": 6}}
    sc = scenario_from_dict(tiny_raw)
    out = tmp_path / "run"
    run_scenario(sc, out)
    gens = {g["index"]: g["prediction"] for g in map(json.loads, (out / "generations.jsonl").read_text().splitlines())}
    data = load_data(sc)
    assert len(gens) == len(data.test) == 4

    tok = AutoTokenizer.from_pretrained(out / "adapter")  # the tokenizer the run wrote beside its adapter
    t = tiny_raw["model"]["tiny"]
    base = readme_tiny_base(t["hidden_size"], t["intermediate_size"], t["num_layers"], t["num_heads"])
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    prompts = {tuple(data.test.sample(i)[: int(data.test.prompt_len[i])].tolist()): i for i in range(len(data.test))}
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    assert eos == data.eos_id
    matched = set()
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        i = prompts.get(tuple(enc["input_ids"][0].tolist()))
        if i is None:  # a training row (or the tokenizer would give other ids than the simulator saw: see below)
            continue
        with torch.no_grad():
            new = model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
        new = new[: new.index(eos)] if eos in new else new
        assert tok.decode(new, skip_special_tokens=True).strip() == gens[i]
        matched.add(i)
    assert matched == set(range(len(data.test)))  # every test prompt's tokens, as the user's tokenizer(prompt) gives
