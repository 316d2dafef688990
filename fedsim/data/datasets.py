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
from fedsim.data.formats import check_fields, check_values, format_rows, get_format
from fedsim.data.sources import data_digests, data_files, file_digest, load_rows  # noqa: F401  # re-exported
from fedsim.data.tokenize import encode, tokenize_split
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
    """Format both splits and tokenize them, with the names their integer codes refer to."""
    cfg = scenario.data
    train_f = format_rows(train_rows, cfg, "training data")
    test_f = format_rows(test_rows, cfg, "test data")
    task_names = sorted({t for _, _, t, _ in train_f + test_f if t is not None})
    group_names = sorted({g for g in train_groups if g is not None})
    label_names: list[str] = []
    if get_format(cfg).scored_by_options:
        label_names = sorted({lab for *_, lab in train_f + test_f})
    task_index = {t: i for i, t in enumerate(task_names)}
    group_index = {g: i for i, g in enumerate(group_names)}
    label_index = {lab: i for i, lab in enumerate(label_names)}
    max_len = cfg.max_seq_len
    return TokenizedData(
        train=tokenize_split(train_f, train_groups, tokenizer, max_len, task_index, group_index, label_index),
        test=tokenize_split(test_f, [None] * len(test_f), tokenizer, max_len, task_index, group_index, label_index),
        task_names=task_names, group_names=group_names, label_names=label_names,
        options=[np.asarray(encode(tokenizer, lab) + [tokenizer.eos_token_id], dtype=np.int32) for lab in label_names],
        pad_id=int(tokenizer.pad_token_id), eos_id=int(tokenizer.eos_token_id),
    )
