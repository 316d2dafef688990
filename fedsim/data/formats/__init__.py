"""The row format extension point: how one data row becomes a prompt and a target.

A row format reads the fields of a row (named by the ``data`` section: ``prompt_template``, ``response_field``,
``label_field``, after ``column_map`` renamed your columns) and returns an :class:`Example`: the prompt text, the
response text the loss covers, and — for formats scored over a fixed set of label options — the label; a conversation
also has earlier turns (``context``). Built-ins: ``instruction`` (:mod:`fedsim.data.formats.instruction`),
``alpaca`` and ``prompt_completion`` (:mod:`fedsim.data.formats.text`), ``chat`` (:mod:`fedsim.data.formats.chat`)
and ``classification`` (:mod:`fedsim.data.formats.classification`); a new one is a subclass of :class:`RowFormat`
registered with ``@row_format("name")`` (docs/architecture.md, "How to add").
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from typing import Any, ClassVar

from fedsim import registry
from fedsim.config import DataConfig
from fedsim.data.origins import Origins, numbered
from fedsim.errors import DataError, ScenarioError

row_format = registry.decorator("row_format")


@dataclass(frozen=True)
class Example:
    """One formatted row: the prompt, the response the loss covers, and its label name ('' when unlabelled).

    A conversation (``rendered``: text a chat template wrote, special tokens included) keeps its earlier turns in
    ``context``: (text before the reply, the assistant's reply) pairs, in order, before ``prompt`` and ``response``
    (the last reply); the loss covers every reply. A sentence pair's second text is ``pair`` (a classifier encodes
    the two as the tokenizer's pair; a causal LM reads both through the template)."""

    prompt: str
    response: str
    label: str = ""
    context: tuple[tuple[str, str], ...] = ()
    rendered: bool = False
    pair: str | None = None  # a classifier's second text (``data.text_pair``), encoded as the tokenizer's pair


class RowFormat:
    """How rows of one shape become examples.

    Attributes:
        default_template: the prompt template when ``data.prompt_template`` is not set.
        scored_by_options: evaluation picks the most likely of the data's label names (classification), instead of
            checking the generated response.
    """

    name: ClassVar[str] = ""
    default_template: ClassVar[str] = "{text}\n"
    scored_by_options: ClassVar[bool] = False

    def fields(self, cfg: DataConfig) -> list[str]:
        """The fields every row must have."""
        raise NotImplementedError

    def example(self, row: dict[str, Any], cfg: DataConfig) -> Example:
        """The example of one row (its fields are present: :func:`check_fields` ran)."""
        raise NotImplementedError

    def render(self, row: dict[str, Any], cfg: DataConfig, tokenizer: Any, where: str) -> Example:
        """The example of one row, for formats that need the tokenizer (a chat template); by default
        :meth:`example`. ``where`` names the row in errors."""
        return self.example(row, cfg)

    def check_row(self, row: dict[str, Any], cfg: DataConfig, where: str) -> None:
        """Raise :class:`~fedsim.errors.DataError` naming ``where`` and the field when the row does not fit the
        format. By default: every field a template fills is text or a number (a list or a mapping in a template would
        train on its Python repr)."""
        for f in self.fields(cfg):
            check_scalar(row.get(f), f, where)

    def advice(self, rows: list[dict[str, Any]], cfg: DataConfig) -> list[str]:
        """Things worth saying about the data in this format (a field the template leaves out, say); none by default."""
        return []


def template_fields(template: str) -> list[str]:
    """The field names a prompt template reads."""
    return list(_template_fields(template))


@functools.lru_cache(maxsize=64)
def _template_fields(template: str) -> tuple[str, ...]:  # parsed once per template, not once per row
    return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


def check_fields(rows: list[dict[str, Any]], needed: list[str], where: str) -> None:
    """The first row has every needed field.

    Raises:
        DataError: no rows. ScenarioError: fields missing (naming them and the row's fields).
    """
    if not rows:
        raise DataError(f"{where} holds no rows")
    missing = [f for f in needed if f not in rows[0]]
    if missing:
        raise ScenarioError(
            "data", f"{where} has no field(s) {missing}; its fields are {sorted(rows[0])}",
            "set data.prompt_template / data.response_field / data.label_field / data.task_field to existing fields",
        )


def missing(value: Any) -> bool:
    """None, or NaN (an empty CSV cell)."""
    return value is None or (isinstance(value, float) and value != value)


def check_scalar(value: Any, field: str, where: str) -> None:
    """A template fills ``field`` with text: a list or a mapping is an error naming the row and the field."""
    if isinstance(value, (list, tuple, dict)):
        kind = "a mapping" if isinstance(value, dict) else "a list"
        hint = (" — a conversation (a list of {role, content}) goes with data.format: chat"
                if isinstance(value, (list, tuple)) and value and isinstance(value[0], dict) else "")
        raise DataError(f"{where} field {field!r} is {kind}, not text: a template would fill in its Python repr"
                        f"{hint}; point the format at a text field (data.column_map) or use a format that reads it")


def check_values(rows: list[dict[str, Any]], fields: list[str], origins: Origins) -> None:
    """Every row has a value for every field the formatting reads (not only the first row).

    Raises:
        DataError: naming the first row without one by its file and its row there (``origins``).
    """
    for i, row in enumerate(rows):
        for f in fields:
            if missing(row.get(f)):
                raise DataError(f"{origins.name(i)} has no value for {f!r} (missing, null or an empty cell); "
                                "fill it in or drop the row")


def get_format(cfg: DataConfig) -> RowFormat:
    """The row format ``data.format`` names."""
    return registry.get("row_format", cfg.format)()


def map_columns(rows: list[dict[str, Any]], cfg: DataConfig, where: str) -> list[dict[str, Any]]:
    """``data.column_map`` applied: each of the format's fields gets the value of the column it names.

    Raises:
        ScenarioError: a named column is not in the data (naming the data's columns).
    """
    if not cfg.column_map or not rows:
        return rows
    absent = {f: c for f, c in cfg.column_map.items() if c not in rows[0]}
    if absent:
        raise ScenarioError("data.column_map", f"{where} has no column(s) {sorted(absent.values())} "
                            f"(mapped to {sorted(absent)}); its columns are {sorted(rows[0])}",
                            "map each format field to an existing column")
    pairs = list(cfg.column_map.items())
    return [{**r, **{f: r[c] for f, c in pairs}} for r in rows]


def format_rows(rows: list[dict[str, Any]], cfg: DataConfig, where: str, tokenizer: Any = None,
                origins: Origins | None = None, fmt: RowFormat | None = None) -> list[tuple[Example, str | None]]:
    """Rows → (example, task or None) in the row format ``fmt`` (the run's resolved one; default: the one
    ``data.format`` names); each row checked first (:meth:`RowFormat.check_row`).

    Errors name a row by its file and its row there (``origins``; without them, ``where`` and the row's number in
    ``rows``, from 1).

    Raises:
        DataError: a row that does not fit the format, naming the row and the field.
    """
    fmt = fmt or get_format(cfg)
    check_fields(rows, fmt.fields(cfg), where)
    origins = origins if origins is not None else numbered(where, len(rows))
    has_task = cfg.task_field is not None and cfg.task_field in rows[0]
    out = []
    for i, r in enumerate(rows):
        at = origins.at(i)
        try:
            fmt.check_row(r, cfg, at)  # type: ignore[arg-type]  # a Place: put into words when an error shows it
            example = fmt.render(r, cfg, tokenizer, at)  # type: ignore[arg-type]
        except DataError as e:
            if str(at) in str(e):
                raise
            raise DataError(f"{at}: {e}") from None  # a format's error that does not say which row (a label, say)
        out.append((example, str(r[cfg.task_field]) if has_task else None))
    return out
