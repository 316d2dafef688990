"""Row formats (alpaca, prompt_completion, chat, a column map), tokenization as the exported model sees it at inference,
and truncation that is correct and counted (issue #24 points 1 and 2)."""

import json
import re

import numpy as np
import pytest

from fedsim.client.batching import collate
from fedsim.config import scenario_from_dict
from fedsim.data import datasets as D
from fedsim.data.formats.chat import DEFAULT_CHAT_TEMPLATE
from fedsim.data.formats.text import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from fedsim.data.report import warnings
from fedsim.data.tokenize import auto_length
from fedsim.errors import DataError, ScenarioError

IGNORE = -100


def bpe_tokenizer(adds_bos: bool):
    """A byte-level BPE tokenizer built offline: with a post-processor that puts BOS in front (as Llama's) or none
    (as GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Below is an instruction that describes a task. ### Response: hello world"] * 5, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def scenario(tiny_raw, path, **data):
    tiny_raw["data"] = {"source": path, "task_field": None, "test": {"fraction": 0.25}, **data}
    tiny_raw["partition"] = {"method": "iid"}
    tiny_raw["clients"]["num_clients"] = 2
    tiny_raw["clients"]["per_round"] = 2
    return scenario_from_dict(tiny_raw)


def labelled(split, i, pad=0):
    """The tokens of sample i that carry a label, in order."""
    batch = collate(split, [i], pad)
    lab = batch["labels"][0]
    return lab[lab != IGNORE].tolist()


def every_sample(split):
    return [split.sample(i).tolist() for i in range(len(split))]


@pytest.mark.parametrize("adds_bos", [True, False])
def test_a_prompt_is_tokenized_as_the_tokenizer_does_it_at_inference(tmp_path, tiny_raw, adds_bos):
    tok = bpe_tokenizer(adds_bos)
    rows = [{"prompt": f"hello world {i}", "completion": " the task"} for i in range(8)]
    sc = scenario(tiny_raw, write_jsonl(tmp_path / "pc.jsonl", rows), format="prompt_completion", max_seq_len=64)
    data = D.load_data(sc, tokenizer=tok, use_cache=False)
    by_text = {r["prompt"]: r for r in rows}
    seen = 0
    for split in (data.train, data.test):
        for i in range(len(split)):
            s, p = split.sample(i).tolist(), int(split.prompt_len[i])
            text = tok.decode(s[:p], skip_special_tokens=True)
            assert s[:p] == tok(text)["input_ids"]  # what the user's tokenizer(prompt) gives, BOS or not
            assert (s[0] == tok.bos_token_id) == adds_bos
            assert s[p:] == tok(by_text[text]["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seen += 1
    assert seen == 8


def test_a_tokenizer_that_appends_eos_keeps_it_out_of_the_prompt(tiny_scenario):
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    assert tok("ab")["input_ids"][-1] == tok.eos_token_id  # T5's tokenizers end every text with EOS
    data = D.load_data(tiny_scenario, tokenizer=tok, use_cache=False)
    for i in range(5):
        s, p = data.train.sample(i), int(data.train.prompt_len[i])
        assert tok.eos_token_id not in s[:p].tolist() and s[-1] == tok.eos_token_id


def test_truncation_keeps_bos_and_the_response_and_is_counted(tmp_path, tiny_raw):
    tok = bpe_tokenizer(adds_bos=True)
    rows = [{"prompt": "hello world " * (20 if i % 4 == 0 else 1), "completion": " the task"} for i in range(40)]
    sc = scenario(tiny_raw, write_jsonl(tmp_path / "pc.jsonl", rows), format="prompt_completion", max_seq_len=16)
    data = D.load_data(sc, tokenizer=tok, use_cache=False)
    resp = tok(" the task", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for split in (data.train, data.test):
        for s in every_sample(split):
            assert len(s) <= 16 and s[0] == tok.bos_token_id and s[-len(resp):] == resp
    st = data.stats
    assert st["max_seq_len"] == 16 and st["auto"] is False
    assert st["train"]["truncated"] + st["test"]["truncated"] == 10  # every fourth row is long
    assert st["train"]["rows"] + st["test"]["rows"] == 40 and st["train"]["dropped"] == 0
    assert st["train"]["longest"] > 16
    said = warnings(st)
    assert any("lost the start of their prompt" in w and "max_seq_len 16" in w for w in said)


def test_a_response_longer_than_the_length_is_cut_and_said(tmp_path, tiny_raw):
    tok = bpe_tokenizer(adds_bos=True)
    rows = [{"prompt": "hello", "completion": " world" * (30 if i == 0 else 1)} for i in range(8)]
    sc = scenario(tiny_raw, write_jsonl(tmp_path / "pc.jsonl", rows), format="prompt_completion", max_seq_len=12,
                  test={"source": write_jsonl(tmp_path / "t.jsonl", rows[1:3])})
    data = D.load_data(sc, tokenizer=tok, use_cache=False)
    assert data.stats["train"]["response_cut"] == 1
    s = data.train.sample(0).tolist()
    hello = tok("hello")["input_ids"]
    assert len(s) == 12 and s[:2] == [tok.bos_token_id, hello[-1]]  # BOS and the prompt's last token survive
    assert any("lost the end of their response" in w for w in warnings(data.stats))


def test_too_long_drop_leaves_rows_out_and_counts_them(tmp_path, tiny_raw):
    rows = [{"prompt": "x" * (40 if i % 2 else 2), "completion": "y"} for i in range(20)]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    sc = scenario(tiny_raw, path, format="prompt_completion", max_seq_len=16, too_long="drop",
                  test={"source": path})
    data = D.load_data(sc, use_cache=False)
    assert len(data.train) == 10 and data.stats["train"]["dropped"] == 10
    assert all(len(s) <= 16 for s in every_sample(data.train))
    long_only = write_jsonl(tmp_path / "long.jsonl", rows[1::2])
    sc = scenario(tiny_raw, long_only, format="prompt_completion", max_seq_len=16, too_long="drop",
                  test={"source": path})
    with pytest.raises(DataError, match="every training row is longer than max_seq_len 16.*too_long is drop"):
        D.load_data(sc, use_cache=False)


def test_max_seq_len_auto_picks_a_high_percentile_capped_by_the_model(tmp_path, tiny_raw):
    assert auto_length([10] * 99 + [1000], None) == 16  # the one outlier is cut, the rest fit
    assert auto_length(list(range(1, 101)), None) == 104  # the 99th percentile (99), up to a multiple of 8
    assert auto_length([5000] * 10, 512) == 512
    assert auto_length([3], None) == 8
    rows = [{"prompt": "x" * (10 + i), "completion": "y"} for i in range(100)]
    sc = scenario(tiny_raw, write_jsonl(tmp_path / "pc.jsonl", rows), format="prompt_completion")
    assert sc.data.max_seq_len == "auto"  # the default
    data = D.load_data(sc, use_cache=False)
    longest = data.stats["train"]["longest"]
    assert data.stats["auto"] is True and data.max_len % 8 == 0 and longest - 8 < data.max_len <= longest + 8
    tiny_raw["model"]["tiny"]["max_position_embeddings"] = 32
    capped = D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
    assert capped.max_len == 32 and capped.stats["train"]["truncated"] > 0


def test_alpaca_uses_both_templates_and_the_column_map(tmp_path, tiny_raw):
    rows = [{"q": f"Add {i} and 1.", "ctx": (f"{i}" if i % 2 else ""), "a": str(i + 1)} for i in range(12)]
    sc = scenario(tiny_raw, write_jsonl(tmp_path / "a.jsonl", rows), format="alpaca", max_seq_len=512,
                  column_map={"instruction": "q", "input": "ctx", "output": "a"})
    data = D.load_data(sc, use_cache=False)
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    prompts = {tok.decode(s[: int(p)]) for s, p in zip(every_sample(data.train) + every_sample(data.test),
                                                         list(data.train.prompt_len) + list(data.test.prompt_len))}
    assert ALPACA_WITH_INPUT.format(instruction="Add 3 and 1.", input="3") in prompts
    assert ALPACA_NO_INPUT.format(instruction="Add 2 and 1.") in prompts
    assert len(prompts) == 12
    with pytest.raises(ScenarioError, match=r"no column\(s\) \['answer'\].*columns are \['a', 'ctx', 'q'\]"):
        D.load_data(scenario(tiny_raw, sc.data.source, format="alpaca",
                             column_map={"instruction": "q", "output": "answer"}), use_cache=False)


def test_the_instruction_format_says_when_it_leaves_alpacas_input_out(tmp_path, tiny_raw):
    rows = [{"instruction": "Add", "input": f"{i} 1", "output": str(i + 1)} for i in range(12)]
    data = D.load_data(scenario(tiny_raw, write_jsonl(tmp_path / "a.jsonl", rows)), use_cache=False)
    assert any("'input' field" in w and "format: alpaca" in w for w in warnings(data.stats))


def test_a_list_in_a_template_field_is_an_error_naming_the_row_and_field(tmp_path, tiny_raw):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
             "output": "x"}] * 6
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=r"c\.jsonl row \d+ field 'messages' is a list.*format: chat"):
        D.load_data(scenario(tiny_raw, path, prompt_template="{messages}"), use_cache=False)


def chat_rows(n):
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"add {i} 1"},
                          {"role": "assistant", "content": str(i + 1)},
                          {"role": "user", "content": "and twice that?"},
                          {"role": "assistant", "content": str(2 * (i + 1))}]} for i in range(n)]


def test_chat_trains_on_every_assistant_turn_and_nothing_else(tmp_path, tiny_raw):
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    rows = chat_rows(8)
    sc = scenario(tiny_raw, write_jsonl(tmp_path / "c.jsonl", rows), format="chat", max_seq_len=512,
                  test={"source": write_jsonl(tmp_path / "t.jsonl", rows[:2])})
    data = D.load_data(sc, use_cache=False)
    assert data.train.loss_mask is not None
    for i in range(len(data.train)):
        s = data.train.sample(i).tolist()
        text = tok.decode(s)
        # the whole conversation is what apply_chat_template renders with the default template (ChatML + EOS)
        ids = tok.apply_chat_template(rows[i]["messages"], chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=True)
        assert s == list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert text.startswith("<|im_start|>system\nBe brief.")
        replies = [tok(f"{r}</s>\n", add_special_tokens=False)["input_ids"] for r in (i + 1, 2 * (i + 1))]
        assert labelled(data.train, i) == replies[0] + replies[1]  # both replies (each closed by EOS), nothing else
        prompt = tok.decode(s[: int(data.train.prompt_len[i])])
        assert prompt.endswith("and twice that?</s><|im_start|>assistant\n")  # ByT5 drops the newline after </s>


def test_chat_truncation_keeps_the_last_reply_and_the_template_special_tokens(tmp_path, tiny_raw):
    tok = bpe_tokenizer(adds_bos=False)
    template = "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE
    rows = chat_rows(8)
    sc = scenario(tiny_raw, write_jsonl(tmp_path / "c.jsonl", rows), format="chat", max_seq_len=24,
                  chat_template=template)
    data = D.load_data(sc, tokenizer=tok, use_cache=False)
    for i in range(len(data.train)):
        s = data.train.sample(i).tolist()
        reply = s[int(data.train.prompt_len[i]):]
        assert len(s) <= 24 and s[0] == tok.bos_token_id and re.fullmatch(r"\d+</s>\n", tok.decode(reply))
        assert labelled(data.train, i) == reply  # the earlier reply was cut away with the conversation's start
    assert data.stats["train"]["truncated"] == len(data.train)


@pytest.mark.parametrize("messages, match", [
    ("hello", "line 6: field 'messages' is text, but line 1 has a list"),
    ([{"role": "user"}], "field 'messages' item 0 is .*needs a 'role' and a 'content'"),
    ([{"role": "user", "content": "hi"}], "field 'messages' has no assistant turn"),
])
def test_a_conversation_that_does_not_fit_is_an_error_naming_the_row(tmp_path, tiny_raw, messages, match):
    rows = chat_rows(5) + [{"messages": messages}]
    sc = scenario(tiny_raw, write_jsonl(tmp_path / "c.jsonl", rows), format="chat",
                  test={"source": write_jsonl(tmp_path / "t.jsonl", chat_rows(2))})
    with pytest.raises(DataError, match=r"c\.jsonl (row 6 )?" + match):
        D.load_data(sc, use_cache=False)


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path, tiny_raw):
    rewriting = ("{% for m in messages %}{% if loop.last %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
    sc = scenario(tiny_raw, write_jsonl(tmp_path / "c.jsonl", chat_rows(6)), format="chat", chat_template=rewriting)
    with pytest.raises(DataError, match="does not render the conversation incrementally"):
        D.load_data(sc, use_cache=False)


def test_chat_messages_from_another_column(tmp_path, tiny_raw):
    rows = [{"conversation": r["messages"]} for r in chat_rows(6)]
    sc = scenario(tiny_raw, write_jsonl(tmp_path / "c.jsonl", rows), format="chat",
                  column_map={"messages": "conversation"})
    data = D.load_data(sc, use_cache=False)
    assert len(data.train) + len(data.test) == 6 and np.all(data.train.prompt_len > 0)


def test_validate_and_a_run_say_what_was_truncated(tmp_path, tiny_raw, capsys):
    """`fedsim validate` prints the length in force and the warning; a chat run trains, prints the warning once and
    keeps it, with the per-split counts, in its summary."""
    import yaml

    from fedsim.cli import main
    from fedsim.driver import run_scenario

    rows = chat_rows(16)
    sc = scenario(tiny_raw, write_jsonl(tmp_path / "c.jsonl", rows), format="chat", max_seq_len=64)
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(sc.to_dict()))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "max_seq_len 64; the longest training row has" in out
    assert "warning: data: 100.0% of the 12 training rows are longer than max_seq_len 64" in out
    assert main(["validate", str(path), "--set", "data.max_seq_len=auto"]) == 0
    out = capsys.readouterr().out
    assert "max_seq_len auto → " in out and "warning" not in out
    summary = run_scenario(scenario_from_dict(sc.to_dict(), ["rounds=1"]), tmp_path / "run")
    assert summary["data"]["train"]["truncated"] == 12 and summary["data"]["max_seq_len"] == 64
    assert any("longer than max_seq_len 64" in n for n in summary["notes"])
    assert np.isfinite(summary["final/eval/loss"])
    # a merged export carries the chat template training used: inference renders conversations the same way
    from transformers import AutoTokenizer

    from fedsim.export import export_client

    export_client(tmp_path / "run", None, tmp_path / "merged", merged=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    ex = D.get_format(sc.data).render(rows[0], sc.data, tok, "row 1")
    assert tok.apply_chat_template(rows[0]["messages"], tokenize=False) == "".join(
        t for pair in (*ex.context, (ex.prompt, ex.response)) for t in pair)


def test_packed_batches_label_a_conversation_as_single_batches_do(tmp_path, tiny_raw):
    import torch

    from fedsim.models.batches import collate_pack

    sc = scenario(tiny_raw, write_jsonl(tmp_path / "c.jsonl", chat_rows(12)), format="chat", max_seq_len=512)
    data = D.load_data(sc, use_cache=False)
    batches = [np.asarray([0, 3]), np.asarray([5]), np.asarray([1, 2])]
    labels = collate_pack(data.train, batches, data.pad_id, torch.device("cpu"))["labels"]
    for c, b in enumerate(batches):
        single = collate(data.train, b, data.pad_id)
        for j in range(len(b)):
            n = single["labels"].shape[1]
            assert torch.equal(labels[c * 2 + j, :n], single["labels"][j])
            assert (labels[c * 2 + j, n:] == IGNORE).all()
