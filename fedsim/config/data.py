"""The ``data`` and ``partition`` sections: where rows come from, how they are formatted, how clients split them."""

from __future__ import annotations

import string
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fedsim import registry
from fedsim.config.base import Frozen


class SyntheticConfig(Frozen):
    """Built-in procedurally generated multi-task instruction data (see :mod:`fedsim.data.synthetic`)."""

    tasks: tuple[str, ...] = ("add", "reverse", "sort", "upper", "count")
    """the built-in toy tasks: add, reverse, sort, upper, count"""
    num_train: int = Field(2000, ge=1, le=10_000_000)
    """training rows"""
    num_test: int = Field(400, ge=1, le=1_000_000)
    """test rows"""
    seed: int = Field(0, ge=0)
    """the seed of the rows"""

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        known = registry.names("synthetic_task")
        unknown = [t for t in v if t not in known]
        if unknown:
            raise ValueError(f"unknown synthetic task(s) {unknown}; choose from {known}")
        if not v:
            raise ValueError(f"needs at least one task; choose from {known}")
        return v


class TestSplitConfig(Frozen):
    """Where the global test set comes from: a separate source (file or hub split) or a held-out fraction."""

    source: str | None = None
    """a file (or hub data set) of test rows"""
    split: str | None = None
    """a split of the hub data set"""
    fraction: float | None = Field(None, gt=0.0, lt=1.0)
    """a share of the training rows held out instead"""
    max_samples: int | None = Field(None, ge=1)
    """at most this many test rows"""


class SourceConfig(Frozen):
    """One named source of ``data.sources``: a file, directory, glob or hub data set whose rows all belong to one task
    (the name, written into each row's ``data.task_field``), with its own columns and its own test rows."""

    source: str
    """a local file, directory or glob, or a hub id"""
    subset: str | None = None
    """the hub data set's subset"""
    split: str = "train"
    """the hub data set's split"""
    columns: tuple[str, ...] | None = None  # None: data.columns
    test_source: str | None = None  # its test rows: a local file (or a hub data set)
    test_split: str | None = None  # ... or a split of its hub data set
    max_samples: int | None = Field(None, ge=1)  # its first rows only

    def has_test(self) -> bool:
        return self.test_source is not None or self.test_split is not None


class DataConfig(Frozen):
    """Training data: source, format and field names, and how long a tokenized row may be.

    ``column_map`` renames your columns to the names the format reads (``{instruction: question, output: answer}``:
    the format's field ← your column). ``max_seq_len``: tokens per row, or ``auto`` (the 99th percentile of the
    training rows' lengths, rounded up to a multiple of 8 and capped by the model's maximum). ``too_long``: a row
    longer than that loses the start of its prompt (``truncate``: the special tokens in front and the response stay) or
    is left out (``drop``); either way validation and the run's summary count them per split.
    ``chat_template``: a Jinja chat template for ``format: chat`` (default: the tokenizer's own, else ChatML).
    ``text_pair``: for sentence-pair classification, the field of the second text: a classifier (``model.task:
    seq_cls``) encodes the template's text and it as the tokenizer's pair (separator, segment ids); a causal LM reads
    both through ``prompt_template``, which must name it.
    ``sources``: several sources, one per task (``{cola: {source: cola/train.tsv, columns: [text, label], test_source:
    cola/dev.tsv}, mr: {...}}``), read one after another, each row's ``task_field`` set to its source's name — tasks as
    client groups with ``partition: {method: natural, by: task}`` (or a Dirichlet over them). Instead of ``source``.
"""

    source: str = "synthetic"
    """synthetic, a hub id, or a local .json/.jsonl/.csv/.tsv/.parquet file, directory or glob"""
    sources: dict[str, SourceConfig] | None = None
    """one source per task instead of source ({task: {source, columns, ...}}); each row tagged with its task's name in
    task_field"""
    synthetic: SyntheticConfig = SyntheticConfig()
    """the built-in toy tasks (source: synthetic)"""
    format: str = "instruction"  # a registered row format (fedsim.data.formats)
    split: str = "train"
    """the hub data set's split"""
    subset: str | None = None
    """the hub data set's subset (its configuration)"""
    columns: tuple[str, ...] | None = None
    """the column names of a header-less CSV/TSV"""
    prompt_template: str | None = None
    """the prompt, with {field} placeholders"""
    response_field: str = "output"
    """the field the loss covers"""
    label_field: str = "label"
    """classification: the label's field"""
    text_pair: str | None = None  # classification: the field of a sentence pair's second text (MNLI's hypothesis)
    label_names: dict[int | str, str] | None = None
    """classification: label value → its name"""
    task_field: str | None = "task"
    """the field that names a row's task (per-task metrics, natural splits); null: none"""
    test: TestSplitConfig = TestSplitConfig()
    """the test split: a file, a hub split or a held-out fraction"""
    max_seq_len: Annotated[int, Field(ge=8, le=65536)] | Literal["auto"] = "auto"
    """tokens per row, or auto (the longest row's, from the data)"""
    too_long: Literal["truncate", "drop"] = "truncate"
    """a longer row is truncated or dropped"""
    column_map: dict[str, str] | None = None
    """the format's field → your column"""
    chat_template: str | None = None
    """chat: a Jinja chat template instead of the tokenizer's"""
    max_train_samples: int | None = Field(None, ge=1)
    """the first rows only"""

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> DataConfig:
        if self.sources is None:
            return self
        if not self.sources:
            raise ValueError("data.sources is empty: name at least one task and its source")
        if self.source != "synthetic":
            raise ValueError("give data.source or data.sources, not both (data.sources names a source per task)")
        if self.task_field is None:
            raise ValueError("data.sources writes each source's name into the rows' task field, but data.task_field "
                             "is null: set data.task_field (e.g. task)")
        with_test = [n for n, s in self.sources.items() if s.has_test()]
        if with_test and len(with_test) != len(self.sources):
            missing = sorted(set(self.sources) - set(with_test))
            raise ValueError(f"data.sources {with_test} give their test rows and {missing} do not: give test_source "
                             "(or test_split) for every source, or for none (then data.test.fraction holds rows out)")
        if with_test and (self.test.source is not None or self.test.split is not None):
            raise ValueError("the test rows come from data.sources' test_source/test_split: remove data.test.source "
                             "and data.test.split")
        return self

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str, info: ValidationInfo) -> str:
        if info.context and info.context.get("strategy") is False:  # a worker: the driver checked the names (a
            return v.lower()  # format registered in a notebook is not in this process's registry)
        known = registry.names("row_format")
        if v.lower() not in known:
            raise ValueError(f"unknown data format {v!r}; choose from {', '.join(known)}")
        return v.lower()

    @field_validator("prompt_template")
    @classmethod
    def _plain_placeholders(cls, v: str | None) -> str | None:
        if v is None:
            return v
        for _, name, spec, conv in string.Formatter().parse(v):
            if name is None:
                continue
            if not name.isidentifier() or spec or conv:
                raise ValueError(
                    f"placeholder {{{name}}} is not a plain field name; use {{field}} with the column name only"
                )
        return v

    def template(self) -> str:
        """The prompt template in force: ``prompt_template``, else the format's own default."""
        if self.prompt_template is not None:
            return self.prompt_template
        return registry.get("row_format", self.format).default_template


class PartitionConfig(Frozen):
    """How training samples are split over clients (non-IID)."""

    method: Literal["iid", "dirichlet", "shards", "natural", "quantity"] = "iid"
    """iid, dirichlet (label skew), shards, natural (one group per client) or quantity"""
    alpha: float = Field(0.5, gt=0.0, le=1e6)
    """dirichlet: the concentration (smaller: more skewed)"""
    by: str | None = None
    """the field a skewed split groups by"""
    shards_per_client: int = Field(2, ge=1, le=10_000)
    """shards: label shards per client"""
    min_samples: int = Field(1, ge=1)
    """the fewest rows a client may hold"""
