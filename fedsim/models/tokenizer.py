"""The tokenizer a run uses, and the special tokens a row format needs from it.

``model.name: tiny`` and config stand-ins use a byte-level tokenizer that needs no files: ByT5's vocabulary (384 ids:
pad 0, EOS 1, unk 2, the 256 bytes from 3, then 125 ``<extra_id_N>``) as a fast tokenizer built with the
``tokenizers`` library. It encodes and decodes exactly as transformers' ``ByT5Tokenizer`` does, except that
``tokenizer(text)`` appends nothing: what a causal model is trained on is the prompt as ``tokenizer(prompt)`` gives
it, and the exported tokenizer (``tokenizer.json``, loaded by ``AutoTokenizer``) gives the same ids at inference.

Real tokenizers differ in the tokens they have: BERT's WordPiece has no EOS and no BOS (its ``[SEP]`` ends a
sequence), GPT-2's byte-level BPE has no pad token, Llama's SentencePiece puts BOS in front, T5's appends EOS.
:func:`end_token` and :func:`pad_token` pick the token a format needs, or its standard substitute, or say in one line
what to set.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedsim.config import ModelConfig
from fedsim.config.paths import HUB_OR_LOCAL
from fedsim.errors import ScenarioError

BYTE_LEVEL = "byte-level"  # the tokenizer of the tiny model and of config stand-ins (ByT5's: 384 ids, pad 0, eos 1)
BYTE_VOCAB = 384
EXTRA_IDS = 125


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters (what ``pre_tokenizers.ByteLevel`` emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def byte_level_tokenizer() -> Any:
    """The byte-level tokenizer: ByT5's ids (byte b is b + 3), special tokens stripped of the spaces around them as
    ByT5 does, invalid UTF-8 dropped when decoding (ByT5's ``errors="ignore"``), nothing appended by
    ``tokenizer(text)``; a pair is joined by EOS, the second text with segment id 1."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = _bytes_to_unicode()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{chars[b]: b + 3 for b in range(256)}}
    vocab.update({f"<extra_id_{i}>": 259 + i for i in range(EXTRA_IDS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=True) for t in ("<pad>", "</s>", "<unk>")])
    tok.add_special_tokens([AddedToken(f"<extra_id_{i}>", normalized=False) for i in range(EXTRA_IDS)])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("\ufffd", "")])
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A </s> $B:1", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=[f"<extra_id_{i}>" for i in range(EXTRA_IDS)])


def tokenizer_source(cfg: ModelConfig) -> str:
    """Where the tokenizer comes from: ``model.tokenizer``, else the byte-level one for the tiny model and config
    stand-ins, else the model's own (hub id or directory)."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    return BYTE_LEVEL if cfg.name == "tiny" or cfg.config is not None else cfg.name  # tiny, or a stand-in


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of the model, with a pad token (:func:`pad_token`'s substitute where it has none).

    Raises:
        ScenarioError: it cannot be loaded, or has no token to pad with.
    """
    source = tokenizer_source(cfg)
    if source == BYTE_LEVEL:
        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg.tokenizer is not None else "model.name"
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision if cfg.tokenizer is None else None)
    except Exception as e:
        raise ScenarioError(key, f"cannot load the tokenizer of {source!r}: {e.__class__.__name__}: {e}",
                            HUB_OR_LOCAL) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.convert_ids_to_tokens(pad_token(tok, source))
    return tok


def _first(tokenizer: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def end_token(tokenizer: Any, source: str = "the tokenizer") -> int:
    """The token that ends a response (generation stops there): EOS, else the separator that ends a sequence in the
    tokenizer's own encoding (BERT's ``[SEP]``).

    Raises:
        ScenarioError: it has neither.
    """
    eos = _first(tokenizer, "eos_token_id", "sep_token_id")
    if eos is None:
        raise ScenarioError("model.tokenizer", f"{source} has no end-of-sequence token (no eos_token, no sep_token): "
                            "a response must end with one for the model to learn where to stop",
                            "use a tokenizer with one, or add it (tokenizer.add_special_tokens({'eos_token': '</s>'}) "
                            "and save_pretrained) and set model.tokenizer to that directory")
    return eos


def pad_token(tokenizer: Any, source: str = "the tokenizer") -> int:
    """The padding id: the tokenizer's pad token, else EOS (GPT-2), the separator or unk (padding is never attended
    and never labelled, so any of them serves).

    Raises:
        ScenarioError: it has none of them.
    """
    pad = _first(tokenizer, "pad_token_id", "eos_token_id", "sep_token_id", "unk_token_id")
    if pad is None:
        raise ScenarioError("model.tokenizer", f"{source} has no pad, EOS, separator or unknown token to pad "
                            "batches with", "add a pad token (tokenizer.add_special_tokens({'pad_token': '<pad>'}) "
                            "and save_pretrained) and set model.tokenizer to that directory")
    return pad


def fingerprint(tokenizer: Any) -> str:
    """A digest of everything in a tokenizer that shapes the ids it gives (its vocabulary and rules, special tokens,
    chat template, the flags that add BOS/EOS), not of where it was loaded from: two directories holding the same
    tokenizer share cached data, one edited file does not."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # a slow (Python) tokenizer: its vocabulary and added tokens
        vocab = tokenizer.get_vocab()
        body = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]))
    flags = {k: getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token", "do_lower_case",
                                                       "padding_side", "truncation_side", "model_max_length")}
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps({"class": type(tokenizer).__name__, "body": body, "special": special,
                       "chat": getattr(tokenizer, "chat_template", None), "flags": flags,
                       "pad": tokenizer.pad_token_id}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def special_ends(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(the special tokens ``tokenizer(text)`` puts in front of a text, those it appends): ([BOS], []) for Llama,
    ([CLS], [SEP]) for BERT, ([], [EOS]) for T5, ([], []) for GPT-2 and the byte-level tokenizer."""
    probe = "a b"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k], full[k + len(plain):]
    bos = getattr(tokenizer, "bos_token_id", None)  # a tokenizer that merges across the boundary: its flag decides
    return ([bos] if bos is not None and getattr(tokenizer, "add_bos_token", False) else []), []


def for_inference(tokenizer: Any) -> Any:
    """A causal LM's tokenizer as exported: ``tokenizer(prompt)`` gives what the simulator trained on — the special
    tokens in front, nothing appended. A tokenizer that appends (T5's EOS, BERT's SEP) has that taken out of its
    post-processor (fast tokenizers; ``add_eos_token`` where it has the flag); ByT5's slow tokenizer becomes the
    byte-level one (the same ids). Returns the tokenizer unchanged when nothing is appended, or when no rule can be
    changed (then a caller says so: :func:`special_ends` still finds the appended tokens)."""
    lead, tail = special_ends(tokenizer)
    if not tail:
        return tokenizer
    if type(tokenizer).__name__ == "ByT5Tokenizer":
        return byte_level_tokenizer()
    if getattr(tokenizer, "add_eos_token", False):
        tokenizer.add_eos_token = False
        if not special_ends(tokenizer)[1]:
            return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    names = tokenizer.convert_ids_to_tokens(lead)
    front = " ".join([*names, ""]) if names else ""
    rules = Tokenizer.from_str(backend.to_str())
    rules.post_processor = processors.TemplateProcessing(
        single=f"{front}$A", pair=f"{front}$A $B:1", special_tokens=sorted(set(zip(names, lead))))
    # a generic fast tokenizer: a model's own class (BertTokenizer, ...) would rebuild its post-processor on loading
    specials = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                                   "cls_token", "mask_token") if getattr(tokenizer, k, None)}
    inputs = [n for n in tokenizer.model_input_names if n != "token_type_ids"]  # a causal LM takes no segments
    out = PreTrainedTokenizerFast(tokenizer_object=rules, model_input_names=inputs,
                                  padding_side=tokenizer.padding_side, **specials)
    out.chat_template = getattr(tokenizer, "chat_template", None)
    return out
