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
from fedsim.data.formats import RowFormat, check_fields, check_values, format_rows, get_format, map_columns
from fedsim.data.formats.classification import check_pair
from fedsim.data.origins import Origins
from fedsim.data.sources import (  # noqa: F401  # data_digests, data_files, file_digest, load_rows: re-exported
    data_digests,
    data_files,
    file_digest,
    load_rows,
    load_rows_with_origins,
)
from fedsim.data.tokenize import (
    CHUNK,
    Flat,
    _Progress,
    auto_length,
    encode,
    encode_example,
    encode_inputs,
    encode_texts,
    fit_inputs,
    fit_rows,
    tokenize_split,
)
from fedsim.data.tokenized import TokenizedData, TokenizedSplit  # noqa: F401  # re-exported
from fedsim.errors import DataError, ScenarioError
from fedsim.models.tokenizer import end_token, pad_token, special_ends

Rows = list[dict[str, Any]]


def partition_field(scenario: Scenario, fmt: RowFormat | None = None) -> str | None:
    """The field the partitioner groups by: ``partition.by``, else the label (formats scored by label options) or the
    task field. ``fmt``: the run's resolved row format (default: the one ``data.format`` names)."""
    if scenario.partition.by:
        return scenario.partition.by
    fmt = fmt or get_format(scenario.data)
    return scenario.data.label_field if fmt.scored_by_options else scenario.data.task_field


def load_data(scenario: Scenario, tokenizer: Any | None = None, use_cache: bool = True, fmt: RowFormat | None = None,
              task: Any = None) -> TokenizedData:
    """Load, format and tokenize the scenario's data, cached in ``cache_dir()/tokenized`` under a key of everything
    that shapes the tokens (:func:`~fedsim.data.cache.cache_key`: the data settings, the contents of the local files
    read and of the tokenizer, the model task); a damaged or foreign entry is rebuilt. ``fmt``, ``task``: the run's
    resolved row format and model task (:class:`fedsim.components.Components`; default: those the scenario names).

    Raises:
        ScenarioError, DataError: missing files or fields, an empty split, a tokenizer without a token the format
            needs, a length the model cannot take.
    """
    fmt = fmt or get_format(scenario.data)
    task, tokenizer, path, key = cache_entry(scenario, tokenizer, task, fmt)
    if use_cache and path.is_file():
        data = cache.load(path, key, len(tokenizer))
        if data is not None:
            return data
    gfield = partition_field(scenario, fmt)
    train_rows, test_rows, train_from, test_from = _read_splits(scenario, gfield, fmt)
    data = _tokenize(scenario, (train_rows, train_from), (test_rows, test_from),
                     _groups(scenario, train_rows, gfield), tokenizer, task.encodes_inputs, fmt)
    if use_cache:
        try:
            cache.save(path, data, key)
        except OSError:
            pass  # an unwritable cache only costs time
    return data


def cache_entry(scenario: Scenario, tokenizer: Any | None = None, task: Any = None, fmt: RowFormat | None = None
                ) -> tuple[Any, Any, Any, str]:
    """(model task — ``task``, or the one the scenario names —, tokenizer — the model's unless given —, the cache
    entry's path, its key) of the scenario's data."""
    from fedsim.models.tasks import task_for

    task = task or task_for(scenario.model)
    if tokenizer is None:
        tokenizer = task.tokenizer(scenario.model)
    key = cache.cache_key(scenario, partition_field(scenario, fmt), tokenizer, task.name)
    return task, tokenizer, cache.cache_path(key), key


def _read_splits(scenario: Scenario, gfield: str | None, fmt: RowFormat) -> tuple[Rows, Rows, Origins, Origins]:
    """Train and test rows, checked for the fields the format reads, and where each came from (for errors); the test
    rows held out of the training rows (``data.test.fraction``, seeded) when no test source or split is given, and
    capped at ``data.test.max_samples``."""
    cfg = scenario.data
    train_rows, test_rows, train_from, test_from = load_rows_with_origins(cfg)
    train_rows = map_columns(train_rows, cfg, "training data")
    if test_rows is not None:
        test_rows = map_columns(test_rows, cfg, "test data")
    if cfg.max_train_samples is not None:
        train_rows, train_from = train_rows[: cfg.max_train_samples], train_from.take(slice(0, cfg.max_train_samples))
    needed = fmt.fields(cfg)
    check_fields(train_rows, needed, "training data")
    present = [f for f in (cfg.task_field, gfield) if f is not None and f in train_rows[0]]
    check_values(train_rows, needed + present, train_from)
    if test_rows is not None:
        assert test_from is not None
        check_fields(test_rows, needed, "test data")
        check_values(test_rows, needed + [f for f in present if f in test_rows[0]], test_from)
    if test_rows is None:
        frac = cfg.test.fraction or 0.1
        rng = np.random.default_rng([scenario.seed, 7])
        perm = rng.permutation(len(train_rows))
        n_test = max(1, int(round(frac * len(train_rows))))
        kept = np.sort(perm[n_test:])
        test_rows, test_from = [train_rows[i] for i in perm[:n_test]], train_from.take(perm[:n_test])
        train_rows, train_from = [train_rows[i] for i in kept], train_from.take(kept)
        if not train_rows:
            raise DataError(f"data.source holds {len(perm)} row(s): too few to hold out a test fraction of {frac}; "
                            "add rows or give data.test.source")
    assert test_from is not None
    if cfg.test.max_samples is not None and len(test_rows) > cfg.test.max_samples:
        rng = np.random.default_rng([scenario.seed, 11])
        keep = np.sort(rng.choice(len(test_rows), size=cfg.test.max_samples, replace=False))
        test_rows, test_from = [test_rows[i] for i in keep], test_from.take(keep)
    return train_rows, test_rows, train_from, test_from


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


def _tokenize(scenario: Scenario, train: tuple[Rows, Origins], test: tuple[Rows, Origins],
              train_groups: list[str | None], tokenizer: Any, classifier: bool, fmt: RowFormat) -> TokenizedData:
    """Format both splits and tokenize them (``max_seq_len: auto`` resolved from the training rows), with the names
    their integer codes refer to and what fitting them to the length did (``stats``). ``classifier``: the rows are a
    sequence classifier's inputs (:func:`~fedsim.data.tokenize.fit_inputs`), else a causal LM's prompt and response.
    Rows are formatted and encoded :data:`~fedsim.data.tokenize.CHUNK` at a time: what a split holds while it is
    tokenized is its arrays, its labels and tasks.

    Raises:
        ScenarioError: a token the format needs that the tokenizer lacks, a pair the model cannot read, a length the
            model's positions cannot hold. DataError: every row of a split dropped.
    """
    cfg = data_config(scenario, classifier, fmt)
    check_pair(cfg, classifier)
    pad, eos = _specials(scenario, tokenizer, classifier)
    cap = model_max_length(scenario, tokenizer)
    auto = cfg.max_seq_len == "auto"
    if not auto and cap is not None and int(cfg.max_seq_len) > cap:
        raise ScenarioError("data.max_seq_len", f"{cfg.max_seq_len} tokens per row, but the model takes at most {cap}",
                            f"set data.max_seq_len to {cap} or less, or to auto")
    encoder = _Encoder(tokenizer, cfg, classifier, eos, fmt)
    (train_rows, _), (test_rows, _) = train, test
    progress = _Progress(len(train_rows) + len(test_rows), "tokenizing")
    try:
        enc = {name: encoder.split(rows, origins, where, progress) for name, (rows, origins), where in
               (("training", train, "training data"), ("test", test, "test data"))}
    finally:
        progress.close()
    task_names = sorted({t for e in enc.values() for t in e.tasks if t is not None})
    group_names = sorted({g for g in train_groups if g is not None})
    label_names = sorted({lab for e in enc.values() for lab in e.labels}) if fmt.scored_by_options else []
    index = {"label": {x: i for i, x in enumerate(label_names)}, "task": {t: i for i, t in enumerate(task_names)},
             "group": {g: i for i, g in enumerate(group_names)}}

    def codes(e: _EncodedSplit, groups: list[str | None]) -> np.ndarray:
        return np.array([(index["label"].get(lab, -1), index["task"][t] if t is not None else -1,
                          index["group"][g] if g is not None else -1) for lab, t, g in zip(e.labels, e.tasks, groups)],
                        dtype=np.int64).reshape(-1, 3)

    meta = {"training": codes(enc["training"], train_groups), "test": codes(enc["test"], [None] * len(test_rows))}
    max_len = auto_length(enc["training"].lengths, cap) if auto else int(cfg.max_seq_len)
    splits = {name: e.fit(max_len, cfg.too_long == "drop", meta[name]) for name, e in enc.items()}
    for name, (split, st) in splits.items():
        if not len(split):
            raise DataError(f"every {name} row is longer than max_seq_len {max_len} (the longest has {st.longest} "
                            "tokens) and data.too_long is drop: raise data.max_seq_len or set it to auto")
    (train, train_stats), (test, test_stats) = splits["training"], splits["test"]
    stats = {"max_seq_len": max_len, "auto": auto, "model_max": cap, "train": train_stats.as_dict(),
             "test": test_stats.as_dict(), "notes": fmt.advice(train_rows, cfg)}
    return TokenizedData(
        train=train, test=test, task_names=task_names, group_names=group_names, label_names=label_names,
        options=[np.asarray(encode(tokenizer, lab) + [eos], dtype=np.int32) for lab in label_names],
        pad_id=int(pad), eos_id=int(eos), max_len=max_len, stats=stats,
    )


def _specials(scenario: Scenario, tokenizer: Any, classifier: bool) -> tuple[int, int]:
    """(pad id, end id): the tokenizer's or their substitutes (:mod:`fedsim.models.tokenizer`). A classifier's input
    ends as the tokenizer ends it, so it needs no end token of its own.

    Raises:
        ScenarioError: a causal LM's tokenizer without an end token, any tokenizer without a token to pad with.
    """
    source = repr(scenario.model.tokenizer or scenario.model.name)
    pad = pad_token(tokenizer, source)
    try:
        return pad, end_token(tokenizer, source)
    except ScenarioError:
        if not classifier:
            raise
        return pad, pad


def data_config(scenario: Scenario, classifier: bool, fmt: RowFormat) -> DataConfig:
    """The data section as tokenization reads it: a classifier's prompt is the format's ``input_template`` (the text
    alone) unless ``data.prompt_template`` is set."""
    cfg = scenario.data
    template = getattr(fmt, "input_template", None)
    if classifier and cfg.prompt_template is None and template is not None:
        return cfg.model_copy(update={"prompt_template": template})
    return cfg


class _EncodedSplit:
    """A split encoded and not yet fitted to the length: its rows' label names and tasks, and their tokens — a
    classifier's inputs, a causal LM's flat prompts and responses (each ending with the end token), or a chat's
    rendered rows one by one (:class:`~fedsim.data.tokenize.Encoded`)."""

    def __init__(self, encoder: _Encoder, rows: Rows, origins: Origins, where: str) -> None:
        self.encoder, self.rows, self.origins, self.where = encoder, rows, origins, where
        self.labels: list[str] = []
        self.tasks: list[str | None] = []
        self.parts: dict[str, list] = {"inputs": [], "prompts": [], "responses": [], "rendered": []}

    def flat(self, key: str) -> Any:
        """The encoded parts of ``key`` joined into one (the parts then let go: one copy at a time)."""
        if len(self.parts[key]) != 1:
            self.parts[key] = [Flat.join(self.parts[key])]
        return self.parts[key][0]

    @property
    def lengths(self) -> np.ndarray:
        if self.encoder.classifier:
            return np.concatenate([p.lengths for p in self.parts["inputs"]]) if self.parts["inputs"] else np.zeros(0)
        if self.parts["rendered"]:
            return np.asarray([len(e) for e in self.parts["rendered"]], dtype=np.int64)
        prompts, responses = self.flat("prompts"), self.flat("responses")
        return len(self.encoder.prefix) + prompts.lengths + responses.lengths

    def texts(self, indices: np.ndarray) -> tuple[list[str], list[str] | None]:
        """A classifier's (first texts, second texts or None) of the rows at ``indices``, formatted again."""
        formatted = [format_rows([self.rows[int(i)]], self.encoder.cfg, self.where, self.encoder.tokenizer,
                                 self.origins.take([int(i)]), self.encoder.fmt)[0][0] for i in indices]
        pairs = [ex.pair for ex in formatted] if formatted and formatted[0].pair is not None else None
        return [ex.prompt for ex in formatted], pairs

    def fit(self, max_len: int, drop: bool, meta: np.ndarray) -> tuple[TokenizedSplit, Any]:
        if self.encoder.classifier:
            return fit_inputs(self.encoder.tokenizer, self.texts, self.flat("inputs"), max_len, drop, meta)
        if self.parts["rendered"]:
            return tokenize_split(self.parts["rendered"], [tuple(m) for m in meta.tolist()], max_len, drop)
        return fit_rows(self.encoder.prefix, self.flat("prompts"), self.flat("responses"), max_len, drop, meta)


class _Encoder:
    """Formats and encodes a split's rows :data:`~fedsim.data.tokenize.CHUNK` at a time."""

    def __init__(self, tokenizer: Any, cfg: DataConfig, classifier: bool, eos: int, fmt: RowFormat) -> None:
        self.tokenizer, self.cfg, self.classifier, self.eos, self.fmt = tokenizer, cfg, classifier, eos, fmt
        self.prefix = [] if classifier else special_ends(tokenizer)[0]  # BOS, CLS: what tokenizer(text) puts in front

    def split(self, rows: Rows, origins: Origins, where: str, progress: Any) -> _EncodedSplit:
        out = _EncodedSplit(self, rows, origins, where)
        for s in range(0, len(rows), CHUNK):
            formatted = format_rows(rows[s : s + CHUNK], self.cfg, where, self.tokenizer,
                                    origins.take(slice(s, s + CHUNK)), self.fmt)
            out.labels += [ex.label for ex, _ in formatted]
            out.tasks += [t for _, t in formatted]
            examples = [ex for ex, _ in formatted]
            if self.classifier:
                pairs = [ex.pair for ex in examples] if examples[0].pair is not None else None
                out.parts["inputs"].append(encode_inputs(self.tokenizer, [ex.prompt for ex in examples], pairs))
            elif any(ex.rendered for ex in examples):
                out.parts["rendered"] += [encode_example(ex, self.tokenizer, self.prefix, self.eos) for ex in examples]
            else:
                out.parts["prompts"].append(encode_texts(self.tokenizer, [ex.prompt for ex in examples]))
                out.parts["responses"].append(
                    encode_texts(self.tokenizer, [ex.response for ex in examples]).with_end(self.eos))
            progress.advance(len(rows[s : s + CHUNK]))
        return out


def model_max_length(scenario: Scenario, tokenizer: Any) -> int | None:
    """The longest input the model takes: the tokenizer's ``model_max_length`` (when set: transformers' sentinel
    for none is ~1e30) and the positions its config has (:func:`fedsim.models.base.position_limit`)."""
    from fedsim.models.base import position_limit

    cap = getattr(tokenizer, "model_max_length", None)
    caps = [int(cap)] if isinstance(cap, int) and 0 < cap < 1_000_000 else []
    limit = position_limit(scenario.model)
    if limit is not None:
        caps.append(limit)
    return min(caps) if caps else None
