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

from fedsim.config import DataConfig, Scenario
from fedsim.data import cache
from fedsim.data.formats import check_fields, check_values, format_rows, get_format, map_columns
from fedsim.data.formats.classification import check_pair
from fedsim.data.sources import data_digests, data_files, file_digest, load_rows  # noqa: F401  # re-exported
from fedsim.data.tokenize import (
    _Progress,
    auto_length,
    encode,
    encode_example,
    encode_inputs,
    encode_texts,
    fit_inputs,
    fit_rows,
    special_prefix,
    tokenize_split,
)
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
    """Load, format and tokenize the scenario's data, cached in ``cache_dir()/tokenized`` under a key of everything
    that shapes the tokens (:func:`~fedsim.data.cache.cache_key`: the data settings, the contents of the local files
    read and of the tokenizer, the model task); a damaged or foreign entry is rebuilt.

    Raises:
        ScenarioError, DataError: missing files or fields, an empty split, a tokenizer without a token the format
            needs, a length the model cannot take.
    """
    task, tokenizer, path, key = cache_entry(scenario, tokenizer)
    if use_cache and path.is_file():
        data = cache.load(path, key, len(tokenizer))
        if data is not None:
            return data
    gfield = partition_field(scenario)
    train_rows, test_rows = _read_splits(scenario, gfield)
    data = _tokenize(scenario, train_rows, test_rows, _groups(scenario, train_rows, gfield), tokenizer,
                     task.encodes_inputs)
    if use_cache:
        try:
            cache.save(path, data, key)
        except OSError:
            pass  # an unwritable cache only costs time
    return data


def cache_entry(scenario: Scenario, tokenizer: Any | None = None) -> tuple[Any, Any, Any, str]:
    """(model task, tokenizer — the model's unless given —, the cache entry's path, its key) of the scenario's data."""
    from fedsim.models.tasks import task_for

    task = task_for(scenario.model)
    if tokenizer is None:
        tokenizer = task.tokenizer(scenario.model)
    key = cache.cache_key(scenario, partition_field(scenario), tokenizer, task.name)
    return task, tokenizer, cache.cache_path(key), key


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
              tokenizer: Any, classifier: bool) -> TokenizedData:
    """Format both splits and tokenize them (``max_seq_len: auto`` resolved from the training rows), with the names
    their integer codes refer to and what fitting them to the length did (``stats``). ``classifier``: the rows are a
    sequence classifier's inputs (:func:`~fedsim.data.tokenize.fit_inputs`), else a causal LM's prompt and response.

    Raises:
        ScenarioError: a token the format needs that the tokenizer lacks, a pair the model cannot read, a length the
            model's positions cannot hold. DataError: every row of a split dropped.
    """
    from fedsim.models.tokenizer import end_token, pad_token

    cfg = data_config(scenario, classifier)
    fmt = get_format(cfg)
    check_pair(cfg, classifier)
    source = scenario.model.tokenizer or scenario.model.name
    pad = pad_token(tokenizer, repr(source))
    try:
        eos = end_token(tokenizer, repr(source))
    except ScenarioError:
        if not classifier:
            raise
        eos = pad  # a classifier's input ends as the tokenizer ends it: no response, no end token of its own
    train_f = format_rows(train_rows, cfg, "training data", tokenizer)
    test_f = format_rows(test_rows, cfg, "test data", tokenizer)
    task_names = sorted({t for _, t in train_f + test_f if t is not None})
    group_names = sorted({g for g in train_groups if g is not None})
    label_names = sorted({ex.label for ex, _ in train_f + test_f}) if fmt.scored_by_options else []
    task_index = {t: i for i, t in enumerate(task_names)}
    group_index = {g: i for i, g in enumerate(group_names)}
    label_index = {lab: i for i, lab in enumerate(label_names)}

    def codes(formatted: list, groups: list[str | None]) -> np.ndarray:
        return np.array([(label_index.get(ex.label, -1), task_index[t] if t is not None else -1,
                          group_index[g] if g is not None else -1) for (ex, t), g in zip(formatted, groups)],
                        dtype=np.int64).reshape(-1, 3)

    meta = {"training": codes(train_f, train_groups), "test": codes(test_f, [None] * len(test_f))}
    cap = model_max_length(scenario, tokenizer)
    auto = cfg.max_seq_len == "auto"
    if not auto and cap is not None and int(cfg.max_seq_len) > cap:
        raise ScenarioError("data.max_seq_len", f"{cfg.max_seq_len} tokens per row, but the model takes at most {cap}",
                            f"set data.max_seq_len to {cap} or less, or to auto")
    max_len, splits = _encode_and_fit(tokenizer, {"training": train_f, "test": test_f}, meta, cfg, cap, classifier, eos)
    (train, train_stats), (test, test_stats) = splits["training"], splits["test"]
    stats = {"max_seq_len": max_len, "auto": auto, "model_max": cap, "train": train_stats.as_dict(),
             "test": test_stats.as_dict(), "notes": fmt.advice(train_rows, cfg)}
    return TokenizedData(
        train=train, test=test, task_names=task_names, group_names=group_names, label_names=label_names,
        options=[np.asarray(encode(tokenizer, lab) + [eos], dtype=np.int32) for lab in label_names],
        pad_id=int(pad), eos_id=int(eos), max_len=max_len, stats=stats,
    )


def _encode_and_fit(tokenizer: Any, formatted: dict[str, list], meta: dict[str, np.ndarray], cfg: DataConfig,
                    cap: int | None, classifier: bool, eos: int) -> tuple[int, dict[str, tuple[Any, Any]]]:
    """(max_seq_len in force, each split fitted to it with its :class:`~fedsim.data.tokenize.SplitStats`).

    Raises:
        DataError: every row of a split dropped.
    """
    auto, drop = cfg.max_seq_len == "auto", cfg.too_long == "drop"
    progress = _Progress(sum(len(f) for f in formatted.values()), "tokenizing")
    try:
        if classifier:
            encoded = {name: _inputs(tokenizer, rows, progress) for name, rows in formatted.items()}
            max_len = auto_length(encoded["training"][2].lengths, cap) if auto else int(cfg.max_seq_len)
            splits = {name: fit_inputs(tokenizer, *encoded[name], max_len, drop, meta[name]) for name in encoded}
        else:
            prefix = special_prefix(tokenizer)
            encoded = {name: _prompts(tokenizer, rows, prefix, eos, progress) for name, rows in formatted.items()}
            max_len = auto_length(encoded["training"].lengths, cap) if auto else int(cfg.max_seq_len)
            splits = {name: encoded[name].fit(max_len, drop, meta[name]) for name in encoded}
    finally:
        progress.close()
    for name, (split, st) in splits.items():
        if not len(split):
            raise DataError(f"every {name} row is longer than max_seq_len {max_len} (the longest has {st.longest} "
                            "tokens) and data.too_long is drop: raise data.max_seq_len or set it to auto")
    return max_len, splits


def data_config(scenario: Scenario, classifier: bool) -> DataConfig:
    """The data section as tokenization reads it: a classifier's prompt is the format's ``input_template`` (the text
    alone) unless ``data.prompt_template`` is set."""
    cfg = scenario.data
    template = getattr(get_format(cfg), "input_template", None)
    if classifier and cfg.prompt_template is None and template is not None:
        return cfg.model_copy(update={"prompt_template": template})
    return cfg


def _inputs(tokenizer: Any, formatted: list, progress: Any) -> tuple[list[str], list[str] | None, Any]:
    """A classifier's rows: (first texts, second texts or None, their encoding)."""
    firsts = [ex.prompt for ex, _ in formatted]
    pairs = [ex.pair for ex, _ in formatted] if formatted and formatted[0][0].pair is not None else None
    return firsts, pairs, encode_inputs(tokenizer, firsts, pairs, progress=progress)


class _Encoded:
    """A causal LM's split, encoded and not yet fitted: plain rows as flat prompts and responses (each ending with
    the end token), or a chat's rendered rows one by one (:class:`~fedsim.data.tokenize.Encoded`)."""

    def __init__(self, prefix: list[int], prompts: Any = None, responses: Any = None, rendered: list | None = None
                 ) -> None:
        self.prefix, self.prompts, self.responses, self.rendered = prefix, prompts, responses, rendered

    @property
    def lengths(self) -> np.ndarray:
        if self.rendered is not None:
            return np.asarray([len(e) for e in self.rendered], dtype=np.int64)
        return len(self.prefix) + self.prompts.lengths + self.responses.lengths

    def fit(self, max_len: int, drop: bool, meta: np.ndarray) -> tuple[TokenizedSplit, Any]:
        if self.rendered is not None:
            return tokenize_split(self.rendered, [tuple(m) for m in meta.tolist()], max_len, drop)
        return fit_rows(self.prefix, self.prompts, self.responses, max_len, drop, meta)


def _prompts(tokenizer: Any, formatted: list, prefix: list[int], eos: int, progress: Any) -> _Encoded:
    """A causal LM's rows: prompts and responses by batched calls; a chat's rendered rows one by one."""
    if any(ex.rendered for ex, _ in formatted):
        out = [encode_example(ex, tokenizer, prefix, eos) for ex, _ in formatted]
        progress.advance(len(formatted))
        return _Encoded(prefix, rendered=out)
    prompts = encode_texts(tokenizer, [ex.prompt for ex, _ in formatted], progress)
    responses = encode_texts(tokenizer, [ex.response for ex, _ in formatted])
    return _Encoded(prefix, prompts, responses.with_end(eos))


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
