"""The tokenized-data cache: one ``.npz`` per (data settings, model, contents of the local files read), under
``cache_dir()/tokenized``; a damaged entry is rebuilt."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from fedsim.config import Scenario
from fedsim.data.sources import data_digests
from fedsim.data.tokenized import TokenizedData, TokenizedSplit
from fedsim.paths import cache_dir

CACHE_VERSION = 2  # 2: special tokens as the tokenizer adds them, loss masks, stats and max_len


_ARRAYS = ("ids", "offsets", "prompt_len", "label", "task", "group")


def cache_path(scenario: Scenario, group_field: str | None) -> Path:
    """Where the scenario's tokenized data is cached (``group_field``: the partition field, part of the key)."""
    return cache_dir() / "tokenized" / f"{cache_key(scenario, group_field)}.npz"


def cache_key(scenario: Scenario, group_field: str | None) -> str:
    """The settings and the contents (SHA-256) of every local file read: an edited file is read anew."""
    blob = json.dumps({
        "v": CACHE_VERSION, "data": scenario.data.model_dump(mode="json"), "model": scenario.model.name,
        "revision": scenario.model.revision, "by": group_field, "seed": scenario.seed,
        "files": data_digests(scenario.data),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save(path: Path, data: TokenizedData) -> None:
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        s = getattr(data, split)
        for f in _ARRAYS:
            arrays[f"{split}.{f}"] = getattr(s, f)
        if s.loss_mask is not None:
            arrays[f"{split}.loss_mask"] = s.loss_mask
    for i, o in enumerate(data.options):
        arrays[f"option.{i}"] = o
    meta = {"task_names": data.task_names, "group_names": data.group_names, "label_names": data.label_names,
            "pad_id": data.pad_id, "eos_id": data.eos_id, "max_len": data.max_len, "stats": data.stats}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load(path: Path) -> TokenizedData:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        splits = {}
        for split in ("train", "test"):
            mask = z[f"{split}.loss_mask"] if f"{split}.loss_mask" in z.files else None
            splits[split] = TokenizedSplit(**{f: z[f"{split}.{f}"] for f in _ARRAYS}, loss_mask=mask)
        options = [z[f"option.{i}"] for i in range(len(meta["label_names"]))]
    return TokenizedData(train=splits["train"], test=splits["test"], options=options, **meta)
