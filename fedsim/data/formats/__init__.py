"""The row format extension point: how one data row becomes a prompt and a target.

A row format reads the fields of a row (named by the ``data`` section: ``prompt_template``, ``response_field``,
``label_field``) and returns an :class:`Example`: the prompt text, the response text the loss covers, and — for
formats scored over a fixed set of label options — the label. Built-ins: ``instruction``
(:mod:`fedsim.data.formats.instruction`) and ``classification`` (:mod:`fedsim.data.formats.classification`); a new
one is a subclass of :class:`RowFormat` registered with ``@row_format("name")`` (docs/architecture.md, "How to add").
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, ClassVar

from fedsim import registry
from fedsim.config import DataConfig
from fedsim.errors import DataError, ScenarioError

row_format = registry.decorator("row_format")


@dataclass(frozen=True)
class Example:
    """One formatted row: the prompt, the response the loss covers, and its label name ('' when unlabelled)."""

    prompt: str
    response: str
    label: str = ""


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


def template_fields(template: str) -> list[str]:
    """The field names a prompt template reads."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


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


def check_values(rows: list[dict[str, Any]], fields: list[str], where: str) -> None:
    """Every row has a value for every field the formatting reads (not only the first row).

    Raises:
        DataError: naming the first row without one (counting rows from 1, as they come in the file).
    """
    for i, row in enumerate(rows, start=1):
        for f in fields:
            if missing(row.get(f)):
                raise DataError(f"{where} row {i} has no value for {f!r} (missing, null or an empty cell); "
                                "fill it in or drop the row")


def get_format(cfg: DataConfig) -> RowFormat:
    """The row format ``data.format`` names."""
    return registry.get("row_format", cfg.format)()


def format_rows(rows: list[dict[str, Any]], cfg: DataConfig, where: str) -> list[tuple[str, str, str | None, str]]:
    """Rows → (prompt, response, task or None, label name or '') tuples, in the scenario's row format."""
    fmt = get_format(cfg)
    check_fields(rows, fmt.fields(cfg), where)
    has_task = cfg.task_field is not None and cfg.task_field in rows[0]
    out = []
    for r in rows:
        ex = fmt.example(r, cfg)
        out.append((ex.prompt, ex.response, str(r[cfg.task_field]) if has_task else None, ex.label))
    return out
