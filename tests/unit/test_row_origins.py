"""A data error names the file and the row in it, never the row's place in the shuffled train/test split (#45 point
8); a conversation that opens with an assistant message trains on the replies after it."""

import json
import re

import pytest

from fedsim.config import scenario_from_dict
from fedsim.data import datasets as D
from fedsim.errors import DataError

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
RAISING = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}"
           "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}assistant: {% endif %}")


def write_jsonl(path, rows, blank_after=()):
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps(r))
        if i in blank_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def scenario(tiny_raw, source, **data):
    tiny_raw["data"] = {"source": source, "task_field": None, "test": {"fraction": 0.25}, **data}
    if source is None:
        del tiny_raw["data"]["source"]
    tiny_raw["partition"] = {"method": "iid"}
    tiny_raw["clients"]["num_clients"] = 2
    tiny_raw["clients"]["per_round"] = 2
    return scenario_from_dict(tiny_raw)


def instruction(i):
    return {"instruction": f"q{i}", "output": f"a{i}"}


def labelled(i):
    return {"text": f"t{i}", "label": i % 2}


def triples(i):
    return {"input": [f"dog | age | {i}"], "target": "a dog"}


# (a good row of the format, the row-4 fault, the scenario's data settings, what the error says after the place)
CASES = {
    "a list output": (instruction, {"instruction": "q", "output": ["a", "b"]}, {},
                      "line 4: field 'output' is a list, but .*line 1 has text"),
    "a mapping output": (instruction, {"instruction": "q", "output": {"a": 1}}, {},
                         "line 4: field 'output' is a mapping, but .*line 1 has text"),
    "a null output": (instruction, {"instruction": "q", "output": None}, {}, "has no value for 'output'"),
    "messages as text": (lambda i: GOOD_CHAT, {"messages": "hello"}, {"format": "chat"},
                         "line 4: field 'messages' is text, but line 1 has a list"),
    "a message without content": (lambda i: GOOD_CHAT, {"messages": [{"role": "user"}]}, {"format": "chat"},
                                  "field 'messages' item 0 .*needs a 'role' and a 'content'"),
    "no assistant turn": (lambda i: GOOD_CHAT, {"messages": [{"role": "user", "content": "hi"}]}, {"format": "chat"},
                          "field 'messages' has no assistant turn"),
    "a template that raises": (lambda i: GOOD_CHAT, {"messages": [{"role": "tool", "content": "x"},
                                                                  {"role": "assistant", "content": "y"}]},
                               {"format": "chat", "chat_template": RAISING},
                               ": the chat template cannot render this conversation.*tools are not supported"),
    "an unknown label": (labelled, {"text": "t", "label": 7},
                         {"format": "classification", "prompt_template": "{text}\n", "label_names": {0: "no", 1: "yes"}},
                         ": label 7 is not in data.label_names"),
    "a nested triple": (triples, {"input": [["dog", "age", "3"]], "target": "a dog"},
                        {"format": "data_to_text", "response_field": "target"}, r"field 'input\[\]' is a list"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_row_is_named_by_its_file_and_row(tmp_path, tiny_raw, case):
    good, bad, settings, says = CASES[case]
    rows = [good(i) for i in range(40)]
    rows[3] = bad
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as e:
        D.load_data(scenario(tiny_raw, path, **settings), use_cache=False)
    message = str(e.value)
    place = " " if says.startswith("line 4") else " row 4" if says.startswith(":") else " row 4 "
    assert re.search(re.escape(f"{path}{place}") + says, message), message
    assert "training data row" not in message and "test data row" not in message


def test_a_jsonl_row_after_blank_lines_gives_its_line_too(tmp_path, tiny_raw):
    rows = [instruction(i) for i in range(40)]
    rows[3] = {"instruction": "q", "output": None}
    path = write_jsonl(tmp_path / "data.jsonl", rows, blank_after=(0, 1))
    with pytest.raises(DataError, match=re.escape(f"{path} row 4 (line 6) has no value for 'output'")):
        D.load_data(scenario(tiny_raw, path), use_cache=False)
    # with blank lines, the reader itself fails on a field that changes kind, counting rows from 0 in a block
    rows[3] = {"instruction": "q", "output": ["a"]}
    path = write_jsonl(tmp_path / "data.jsonl", rows, blank_after=(0, 1))
    with pytest.raises(DataError, match=re.escape(f"{path} line 6: field 'output' is a list, but line 1 has text")):
        D.load_data(scenario(tiny_raw, path), use_cache=False)
    rows[3] = {"instruction": "q", "output": 5}  # text and numbers: left to the reader, which fails here
    path = write_jsonl(tmp_path / "data.jsonl", rows, blank_after=(0, 1))
    with pytest.raises(DataError, match=re.escape(f"{path} line 6: field 'output' is a number, but line 1 has text")):
        D.load_data(scenario(tiny_raw, path), use_cache=False)


def test_a_row_of_the_second_file_of_a_glob_is_named_in_that_file(tmp_path, tiny_raw):
    write_jsonl(tmp_path / "a.jsonl", [GOOD_CHAT] * 30)
    rows = [GOOD_CHAT] * 10
    rows[3] = {"messages": [{"role": "user", "content": "hi"}]}
    second = write_jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{second} row 4 field 'messages' has no assistant turn")):
        D.load_data(scenario(tiny_raw, str(tmp_path / "*.jsonl"), format="chat"), use_cache=False)
    # across files the reader turns a list into its JSON text without a word: a field that changes kind is refused
    write_jsonl(tmp_path / "a.jsonl", [instruction(i) for i in range(30)])
    rows = [instruction(i) for i in range(10)]
    rows[3] = {"instruction": "q", "output": ["a"]}
    write_jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{second} line 4: field 'output' is a list, but "
                                                  f"{tmp_path / 'a.jsonl'} line 1 has text")):
        D.load_data(scenario(tiny_raw, str(tmp_path / "*.jsonl")), use_cache=False)


def test_a_csv_row_a_test_file_and_a_source_of_several_are_named_in_their_files(tmp_path, tiny_raw):
    csv = tmp_path / "c.csv"
    csv.write_text("text,label\n" + "".join(f"t{i},{'' if i == 3 else i % 2}\n" for i in range(20)))
    with pytest.raises(DataError, match=re.escape(f"{csv} row 4 has no value for 'label'")):
        D.load_data(scenario(tiny_raw, str(csv), format="classification", prompt_template="{text}\n"),
                    use_cache=False)
    test_rows = [GOOD_CHAT] * 10
    test_rows[3] = {"messages": [{"role": "user", "content": "hi"}]}
    test_path = write_jsonl(tmp_path / "test.jsonl", test_rows)
    with pytest.raises(DataError, match=re.escape(f"{test_path} row 4 field 'messages' has no assistant turn")):
        D.load_data(scenario(tiny_raw, write_jsonl(tmp_path / "train.jsonl", [GOOD_CHAT] * 30), format="chat",
                             test={"source": test_path, "max_samples": 8}), use_cache=False)
    second = [labelled(i) for i in range(20)]
    second[3] = {"text": "t", "label": 7}
    sources = {"one": {"source": write_jsonl(tmp_path / "one.jsonl", [labelled(i) for i in range(20)])},
               "two": {"source": write_jsonl(tmp_path / "two.jsonl", second)}}
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'two.jsonl'} row 4: label 7 is not in")):
        D.load_data(scenario(tiny_raw, None, sources=sources, task_field="task", format="classification",
                             prompt_template="{text}\n", label_names={0: "no", 1: "yes"}), use_cache=False)


def test_a_conversation_opening_with_the_assistant_trains_on_the_replies_after(tmp_path, tiny_raw):
    opener = {"messages": [{"role": "assistant", "content": "Hello! Ask me a sum."},
                           {"role": "user", "content": "add 1 1"}, {"role": "assistant", "content": "2"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [opener] * 12)
    data = D.load_data(scenario(tiny_raw, path, format="chat", max_seq_len=512), use_cache=False)
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    for i in range(len(data.train)):
        s = data.train.sample(i).tolist()
        prompt, reply = tok.decode(s[: int(data.train.prompt_len[i])]), tok.decode(s[int(data.train.prompt_len[i]):])
        assert "Hello! Ask me a sum." in prompt and "add 1 1" in prompt  # the opener is context
        assert reply.startswith("2")
    alone = {"messages": [{"role": "assistant", "content": "Hello!"}]}
    rows = [opener] * 12
    rows[3] = alone
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'o.jsonl'} row 4 field 'messages' has no assistant "
                                                  "turn after its opening message")):
        D.load_data(scenario(tiny_raw, write_jsonl(tmp_path / "o.jsonl", rows), format="chat"), use_cache=False)
