"""The tokenized-data cache: one ``.npz`` per key of everything that shapes the tokens (the data settings — format,
template, column map, length, ``too_long``, chat template —, the contents of the local files read, the tokenizer's
contents, the model task), under ``cache_dir()/tokenized``. An entry holds its own key: a damaged entry, or one whose
key or ids do not fit (written by another version, copied from elsewhere), is rebuilt, never used."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import Scenario
from fedsim.data.sources import data_digests
from fedsim.data.tokenized import TokenizedData, TokenizedSplit
from fedsim.paths import cache_dir

CACHE_VERSION = 3  # 2: special tokens as the tokenizer adds them, loss masks, stats and max_len; 3: the tokenizer's
# contents and the model task in the key, the key inside the entry, classifier inputs with segment ids


_ARRAYS = ("ids", "offsets", "prompt_len", "label", "task", "group")
_OPTIONAL = ("loss_mask", "token_type")


def cache_path(key: str) -> Path:
    """Where the tokenized data of a key (:func:`cache_key`) is cached."""
    return cache_dir() / "tokenized" / f"{key}.npz"


def cache_key(scenario: Scenario, group_field: str | None, tokenizer: Any, task: str) -> str:
    """The data settings, the contents (SHA-256) of every local file read, the tokenizer's contents
    (:func:`~fedsim.models.tokenizer.fingerprint`: not its path) and the model task (a classifier's rows are encoded
    otherwise); ``group_field``: the partition field."""
    from fedsim.models.tokenizer import fingerprint

    blob = json.dumps({
        "v": CACHE_VERSION, "data": scenario.data.model_dump(mode="json"), "by": group_field, "seed": scenario.seed,
        "files": data_digests(scenario.data), "tokenizer": fingerprint(tokenizer), "task": task,
        "positions": position_cap(scenario),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def position_cap(scenario: Scenario) -> int | None:
    """The model's positions, which cap ``max_seq_len: auto`` (:func:`~fedsim.models.base.position_limit`)."""
    from fedsim.models.base import position_limit

    return position_limit(scenario.model)


def save(path: Path, data: TokenizedData, key: str) -> None:
    """Write the entry (whole or not at all: a temporary file renamed over it), with its key."""
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        s = getattr(data, split)
        for f in _ARRAYS:
            arrays[f"{split}.{f}"] = getattr(s, f)
        for f in _OPTIONAL:
            if getattr(s, f) is not None:
                arrays[f"{split}.{f}"] = getattr(s, f)
    for i, o in enumerate(data.options):
        arrays[f"option.{i}"] = o
    meta = {"key": key, "task_names": data.task_names, "group_names": data.group_names, "label_names": data.label_names,
            "pad_id": data.pad_id, "eos_id": data.eos_id, "max_len": data.max_len, "stats": data.stats}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load(path: Path, key: str, vocab_size: int) -> TokenizedData | None:
    """The entry at ``path``, or None when it cannot serve: damaged (truncated, not a zip, arrays missing or of the
    wrong shape), written under another key, or holding ids the tokenizer does not have (``vocab_size``)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.pop("key", None) != key:
                return None
            splits = {}
            for split in ("train", "test"):
                extra = {f: z[f"{split}.{f}"] if f"{split}.{f}" in z.files else None for f in _OPTIONAL}
                splits[split] = TokenizedSplit(**{f: z[f"{split}.{f}"] for f in _ARRAYS}, **extra)
            options = [z[f"option.{i}"] for i in range(len(meta["label_names"]))]
        data = TokenizedData(train=splits["train"], test=splits["test"], options=options, **meta)
    except Exception:  # noqa: BLE001 - whatever a damaged file raises (zipfile, numpy, json, a missing key)
        return None
    return data if all(_consistent(s, vocab_size) for s in (data.train, data.test)) else None


def _consistent(split: TokenizedSplit, vocab_size: int) -> bool:
    """The arrays agree with each other and every id is the tokenizer's."""
    n, total = len(split.prompt_len), len(split.ids)
    o = split.offsets
    if len(o) != n + 1 or o[0] != 0 or o[-1] != total or (n and np.any(np.diff(o) < 0)):
        return False
    if any(len(getattr(split, f)) != n for f in ("label", "task", "group")):
        return False
    if any(getattr(split, f) is not None and len(getattr(split, f)) != total for f in _OPTIONAL):
        return False
    return not total or (int(split.ids.min()) >= 0 and int(split.ids.max()) < vocab_size)
