"""Shared fixtures: an isolated cache, tiny scenarios, Ray instances (a test's own, always shut down, or one shared
by consecutive tests), and helpers for tests that start processes."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
from typing import Any

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 3,
    "rounds": 2,
    "model": {"name": "tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2}},
    "data": {"source": "synthetic", "synthetic": {"tasks": ["add", "upper", "count"], "num_train": 240,
                                                   "num_test": 48}, "max_seq_len": 24},
    "partition": {"method": "dirichlet", "by": "task", "alpha": 1.0, "min_samples": 5},
    "clients": {"num_clients": 8, "per_round": 3, "lora": {"rank": 4, "alpha": 8}},
    "training": {"local_steps": 3, "batch_size": 8, "lr": 0.005},
    "eval": {"every": 1, "batch_size": 16},
    "resources": {"backend": "local", "num_workers": 2, "num_cpus": 1},
    "logging": {"console": False, "plots": False, "wandb": {"mode": "disabled"}},
}


# offline stand-ins of other architectures (model.config: randomly initialised, byte-level tokenizer), no dropout so
# that packed and sequential training compute the same
GPT2 = {"name": "openai-community/gpt2", "target_modules": ["c_attn", "c_proj", "c_fc"],
        "config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64,
                   "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}


# encoder classifiers (model.task seq_cls, a fresh two-way head)
ROBERTA = {"name": "FacebookAI/roberta-base", "task": "seq_cls", "num_labels": 2, "target_modules": ["query", "value"],
           "config": {"model_type": "roberta", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "intermediate_size": 64, "max_position_embeddings": 80, "hidden_dropout_prob": 0.0,
                      "attention_probs_dropout_prob": 0.0}}
DISTILBERT = {"name": "distilbert/distilbert-base-multilingual-cased", "task": "seq_cls", "num_labels": 2,
              "target_modules": ["q_lin", "v_lin"],
              "config": {"model_type": "distilbert", "dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64,
                         "max_position_embeddings": 80, "dropout": 0.0, "attention_dropout": 0.0,
                         "seq_classif_dropout": 0.0}}


@contextlib.contextmanager
def reaped(proc: subprocess.Popen, pattern: str):
    """Whatever the test's outcome, nothing it started outlives it: the run ``proc`` (signal tests run a million
    rounds) and every process whose command line names ``pattern`` (the run's own Ray temp dir)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        subprocess.run(["pkill", "-9", "-f", pattern], capture_output=True)


def said(stderr: str) -> list[str]:
    """The lines of a command's stderr that are not start-up progress (``fedsim: starting Ray…``, ...): what it
    reported — an error is one of them, and one line."""
    return [line for line in stderr.strip().splitlines() if not (line.startswith("fedsim: ") and line.endswith("…"))]


def outlived(pattern: str) -> list[str]:
    """The processes whose command line names ``pattern`` that are still running once a stopping run has had up to
    60 s to end them (Ray ends its processes a moment after the driver returns; a busy machine takes longer)."""
    import time

    for _ in range(300):
        left = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.2)
    return left


def classifier_raw(raw: dict[str, Any], tmp_path, model: dict[str, Any]) -> dict[str, Any]:
    """``raw`` turned into a sequence classification scenario: ``model``, a two-label news CSV whose prompt is the
    text alone, an IID split."""
    raw["model"] = copy.deepcopy(model)
    raw["data"] = news_data(tmp_path, rows=80)
    raw["data"]["prompt_template"] = "{title}: {body}"
    raw["partition"] = {"method": "iid"}
    return raw


def news_data(tmp_path, rows: int = 60, test_fraction: float = 0.25) -> dict[str, Any]:
    """A ``data`` section for a header-less two-label news CSV written into ``tmp_path`` (classification)."""
    lines = [f'{1 + i % 2},"title {i}","text number {i}"' for i in range(rows)]
    (tmp_path / "news.csv").write_text("\n".join(lines) + "\n")
    return {"source": str(tmp_path / "news.csv"), "format": "classification", "columns": ["label", "title", "body"],
            "prompt_template": "{title}: {body}\nTopic: ", "label_names": {1: "World", 2: "Sports"},
            "task_field": None, "test": {"fraction": test_fraction}}


CORPUS = ["the quick brown fox jumps over the lazy dog", "a man is playing a guitar on the street",
          "Below is an instruction that describes a task", "### Response: the answer is yes", "hello world 42"] * 4


def _train_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "wordpiece":  # BERT: [CLS] text [SEP], pairs with segment ids, no EOS, no BOS
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials,
                                                                  show_progress=False))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                           special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return tok, {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                     "mask_token": "[MASK]", "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    if kind in ("bpe", "t5"):  # GPT-2: byte-level BPE, EOS only (no pad); T5-like: EOS appended
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        eos = "<|endoftext|>" if kind == "bpe" else "</s>"
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=[eos, "<pad>"] if kind == "t5"
                                                            else [eos], show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        if kind == "t5":
            tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                               special_tokens=[("</s>", tok.token_to_id("</s>"))])
            return tok, {"eos_token": "</s>", "pad_token": "<pad>"}
        return tok, {"eos_token": eos, "bos_token": eos}
    # SentencePiece-style (Llama): Metaspace, BOS in front, EOS not appended
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok, {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def offline_tokenizer(kind: str, path) -> str:
    """A real tokenizer of one family, trained offline with the ``tokenizers`` library on a few sentences and saved
    with save_pretrained into ``path`` (as a user's directory): ``wordpiece`` (BERT: [CLS] text [SEP], no EOS/BOS),
    ``bpe`` (GPT-2: byte-level, no pad), ``sentencepiece`` (Llama: Metaspace, BOS in front), ``t5`` (EOS appended)."""
    from transformers import PreTrainedTokenizerFast

    tok, specials = _train_tokenizer(kind)
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["FEDSIM_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedsim-cache"))


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves the environment as it found it: fedsim's command line, called in this process (``main``),
    sets its quiet defaults (HF_DATASETS_DISABLE_PROGRESS_BARS=1, ...) in ``os.environ``, which every later
    subprocess would inherit — a ``--verbose`` child then showed no progress bar."""
    before = dict(os.environ)
    yield
    for key in set(os.environ) - set(before):
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture
def tiny_raw() -> dict[str, Any]:
    """A fresh copy of a tiny scenario mapping (1-layer model, 240 samples, 8 clients, local backend)."""
    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_scenario(tiny_raw):
    from fedsim.config import scenario_from_dict

    return scenario_from_dict(tiny_raw)


_SHARED_RAY = {"up": False}  # whether the Ray instance of this process is the one shared_ray started


@pytest.fixture
def ray_session():
    """A Ray instance of the test's own: the shared one stopped before (the run starts Ray as a user's run does),
    and Ray shut down after the test, whatever happened."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _SHARED_RAY["up"] = False
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def shared_ray():
    """One Ray instance for consecutive tests that only run scenarios on it (#44: a start costs ~3-4 s), started the
    way a run starts it (fedsim's ``init_ray``: lean head, preloaded modules, pyarrow hidden) with logical CPUs for
    four tiny runs at once. A run that finds Ray started leaves it running and kills its own actors. Tests about
    starting Ray, its environment or its processes use ``ray_session`` (which stops this one first)."""
    import ray

    from fedsim.config import scenario_from_dict
    from fedsim.runtime.ray.pool import init_ray

    if not (_SHARED_RAY["up"] and ray.is_initialized()):
        if ray.is_initialized():
            ray.shutdown()
        raw = copy.deepcopy(TINY)
        raw["resources"]["backend"] = "ray"
        init_ray(scenario_from_dict(raw), runs=4)
        _SHARED_RAY["up"] = True
    yield


@pytest.fixture(autouse=True, scope="session")
def _stop_shared_ray():
    yield
    if _SHARED_RAY["up"]:
        import ray

        ray.shutdown()


# -- a full disk, for real: a size-limited tmpfs (#38, #45) ------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 16 MB tmpfs mounted at a temporary directory (None where mounting is not allowed)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode
    yield mnt if ok == 0 else None
    if ok == 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill_disk(directory):
    """Take every free byte of the filesystem holding ``directory`` (a real ENOSPC from then on)."""
    with open(directory / "filler", "wb", buffering=0) as f:  # unbuffered: a failed write leaves nothing to flush
        for size in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
