"""The data a run trains and evaluates on: rows loaded (:mod:`~fedsim.data.sources`), formatted by the scenario's
row format (:mod:`~fedsim.data.formats`), split into train and test, tokenized once into compact numpy arrays
(:mod:`~fedsim.data.tokenize`) and cached on disk (:mod:`~fedsim.data.cache`), then shared with the workers through
the object store.

Instruction data: the loss covers the response tokens (and EOS) only. Classification data is formatted the same way
with the label name as the response; its accuracy scores each label option.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsim.config import Scenario
from fedsim.data import cache
from fedsim.data.formats import check_fields, check_values, format_rows, get_format, map_columns
from fedsim.data.sources import data_digests, data_files, file_digest, load_rows  # noqa: F401  # re-exported
from fedsim.data.tokenize import auto_length, encode, encode_example, special_prefix, tokenize_split
from fedsim.data.tokenized import TokenizedData, TokenizedSplit  # noqa: F401  # re-exported
from fedsim.errors import DataError, ScenarioError

Rows = list[dict[str, Any]]


def partition_field(scenario: Scenario) -> str | None:
    """The field the partitioner groups by: ``partition.by``, else the label (formats scored by label options) or the
    task field."""
    if scenario.partition.by:
        return scenario.partition.by
    return scenario.data.label_field if get_format(scenario.data).scored_by_options else scenario.data.task_field


def load_data(scenario: Scenario, tokenizer: Any | None = None, use_cache: bool = True) -> TokenizedData:
    """Load, format and tokenize the scenario's data (cached in ``cache_dir()/tokenized`` under a hash of the data
    settings and of the contents of the local files read).

    Raises:
        ScenarioError, DataError: missing files or fields, an empty split.
    """
    gfield = partition_field(scenario)
    path = cache.cache_path(scenario, gfield)
    if use_cache and path.is_file():
        try:
            return cache.load(path)
        except Exception:  # noqa: BLE001 - a damaged entry (truncated, not a zip, wrong arrays) is rebuilt below
            pass
    if tokenizer is None:
        from fedsim.models.tasks import task_for

        tokenizer = task_for(scenario.model).tokenizer(scenario.model)
    train_rows, test_rows = _read_splits(scenario, gfield)
    data = _tokenize(scenario, train_rows, test_rows, _groups(scenario, train_rows, gfield), tokenizer)
    if use_cache:
        try:
            cache.save(path, data)
        except OSError:
            pass  # an unwritable cache only costs time
    return data


def _read_splits(scenario: Scenario, gfield: str | None) -> tuple[Rows, Rows]:
    """Train and test rows, checked for the fields the format reads; the test rows held out of the training rows
    (``data.test.fraction``, seeded) when no test source or split is given, and capped at ``data.test.max_samples``."""
    cfg = scenario.data
    train_rows, test_rows = load_rows(cfg)
    train_rows = map_columns(train_rows, cfg, "training data")
    if test_rows is not None:
        test_rows = map_columns(test_rows, cfg, "test data")
    if cfg.max_train_samples is not None:
        train_rows = train_rows[: cfg.max_train_samples]
    needed = get_format(cfg).fields(cfg)
    check_fields(train_rows, needed, "training data")
    present = [f for f in (cfg.task_field, gfield) if f is not None and f in train_rows[0]]
    check_values(train_rows, needed + present, "data.source")
    if test_rows is not None:
        check_fields(test_rows, needed, "test data")
        check_values(test_rows, needed + [f for f in present if f in test_rows[0]],
                     "data.test.source" if cfg.test.source is not None else f"data split {cfg.test.split!r}")
    if test_rows is None:
        frac = cfg.test.fraction or 0.1
        rng = np.random.default_rng([scenario.seed, 7])
        perm = rng.permutation(len(train_rows))
        n_test = max(1, int(round(frac * len(train_rows))))
        test_rows = [train_rows[i] for i in perm[:n_test]]
        train_rows = [train_rows[i] for i in sorted(perm[n_test:])]
        if not train_rows:
            raise DataError(f"data.source holds {len(perm)} row(s): too few to hold out a test fraction of {frac}; "
                            "add rows or give data.test.source")
    if cfg.test.max_samples is not None and len(test_rows) > cfg.test.max_samples:
        rng = np.random.default_rng([scenario.seed, 11])
        keep = sorted(rng.choice(len(test_rows), size=cfg.test.max_samples, replace=False))
        test_rows = [test_rows[i] for i in keep]
    return train_rows, test_rows


def _groups(scenario: Scenario, train_rows: Rows, gfield: str | None) -> list[str | None]:
    """Each training row's value of the partition field (None for every row when there is no such field).

    Raises:
        ScenarioError: a split that needs the field, and the data does not have it.
    """
    if gfield is None:
        return [None] * len(train_rows)
    if gfield not in train_rows[0]:
        if scenario.partition.method in ("dirichlet", "shards", "natural") or scenario.partition.by:
            raise ScenarioError("partition.by", f"field {gfield!r} is not in the training data "
                                f"(fields: {sorted(train_rows[0])})", "name an existing label/category field")
        return [None] * len(train_rows)
    return [str(r[gfield]) for r in train_rows]


def _tokenize(scenario: Scenario, train_rows: Rows, test_rows: Rows, train_groups: list[str | None],
              tokenizer: Any) -> TokenizedData:
    """Format both splits and tokenize them (``max_seq_len: auto`` resolved from the training rows), with the names
    their integer codes refer to and what fitting them to the length did (``stats``)."""
    cfg = scenario.data
    fmt = get_format(cfg)
    train_f = format_rows(train_rows, cfg, "training data", tokenizer)
    test_f = format_rows(test_rows, cfg, "test data", tokenizer)
    task_names = sorted({t for _, t in train_f + test_f if t is not None})
    group_names = sorted({g for g in train_groups if g is not None})
    label_names = sorted({ex.label for ex, _ in train_f + test_f}) if fmt.scored_by_options else []
    task_index = {t: i for i, t in enumerate(task_names)}
    group_index = {g: i for i, g in enumerate(group_names)}
    label_index = {lab: i for i, lab in enumerate(label_names)}
    prefix, eos = special_prefix(tokenizer), tokenizer.eos_token_id
    enc_train = [encode_example(ex, tokenizer, prefix, eos) for ex, _ in train_f]
    enc_test = [encode_example(ex, tokenizer, prefix, eos) for ex, _ in test_f]
    auto = cfg.max_seq_len == "auto"
    cap = model_max_length(scenario, tokenizer)
    max_len = auto_length([len(e) for e in enc_train], cap) if auto else int(cfg.max_seq_len)

    def codes(formatted: list, groups: list[str | None]) -> list[tuple[int, int, int]]:
        return [(label_index.get(ex.label, -1), task_index[t] if t is not None else -1,
                 group_index[g] if g is not None else -1) for (ex, t), g in zip(formatted, groups)]

    drop = cfg.too_long == "drop"
    train, train_stats = tokenize_split(enc_train, codes(train_f, train_groups), max_len, drop)
    test, test_stats = tokenize_split(enc_test, codes(test_f, [None] * len(test_f)), max_len, drop)
    for name, split, st in (("training", train, train_stats), ("test", test, test_stats)):
        if not len(split):
            raise DataError(f"every {name} row is longer than max_seq_len {max_len} (the longest has {st.longest} "
                            "tokens) and data.too_long is drop: raise data.max_seq_len or set it to auto")
    stats = {"max_seq_len": max_len, "auto": auto, "model_max": cap, "train": train_stats.as_dict(), "test": test_stats.as_dict(),
             "notes": fmt.advice(train_rows, cfg)}
    return TokenizedData(
        train=train, test=test, task_names=task_names, group_names=group_names, label_names=label_names,
        options=[np.asarray(encode(tokenizer, lab) + [eos], dtype=np.int32) for lab in label_names],
        pad_id=int(tokenizer.pad_token_id), eos_id=int(eos), max_len=max_len, stats=stats,
    )


def model_max_length(scenario: Scenario, tokenizer: Any) -> int | None:
    """The longest input the model takes: the tokenizer's ``model_max_length`` (when set: transformers' sentinel
    for none is ~1e30) and the positions of the built-in tiny model or of a ``model.config`` stand-in."""
    from fedsim.models.base import position_limit

    cap = getattr(tokenizer, "model_max_length", None)
    caps = [int(cap)] if isinstance(cap, int) and 0 < cap < 1_000_000 else []
    limit = position_limit(scenario.model)
    if limit is not None:
        caps.append(limit)
    return min(caps) if caps else None
