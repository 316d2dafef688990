"""``alpaca`` and ``prompt_completion``: the two text formats users bring most.

``alpaca`` (Stanford Alpaca's ``instruction`` / ``input`` / ``output``): the prompt is Alpaca's own template — the one
with ``### Input:`` for rows whose ``input`` is non-empty, the one without for the others (``data.prompt_template``
replaces both); the response is ``output``. ``prompt_completion`` (TRL's prompt–completion form): the prompt is
``prompt`` (or ``data.prompt_template`` over the row's fields), the response ``completion``. Other column names map
with ``data.column_map``. The loss covers the response (and EOS), as for ``instruction``.
"""

from __future__ import annotations

from typing import Any

from fedsim.config import DataConfig
from fedsim.data.formats import Example, RowFormat, check_scalar, missing, row_format, template_fields

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@row_format("alpaca")
class Alpaca(RowFormat):
    name = "alpaca"
    default_template = ALPACA_WITH_INPUT

    def fields(self, cfg: DataConfig) -> list[str]:
        if cfg.prompt_template is not None:
            return template_fields(cfg.prompt_template) + ["output"]
        return ["instruction", "output"]  # input is optional: a row without one takes the no-input template

    def check_row(self, row: dict[str, Any], cfg: DataConfig, where: str) -> None:
        super().check_row(row, cfg, where)
        check_scalar(row.get("input"), "input", where)

    def example(self, row: dict[str, Any], cfg: DataConfig) -> Example:
        if cfg.prompt_template is not None:
            template = cfg.prompt_template
        else:
            has_input = not missing(row.get("input")) and str(row["input"]).strip() != ""
            template = ALPACA_WITH_INPUT if has_input else ALPACA_NO_INPUT
        prompt = template.format(**{k: row[k] for k in template_fields(template)})
        return Example(prompt, str(row["output"]))


@row_format("prompt_completion")
class PromptCompletion(RowFormat):
    name = "prompt_completion"
    default_template = "{prompt}"

    def fields(self, cfg: DataConfig) -> list[str]:
        return template_fields(cfg.template()) + ["completion"]

    def example(self, row: dict[str, Any], cfg: DataConfig) -> Example:
        template = cfg.template()
        prompt = template.format(**{k: row[k] for k in template_fields(template)})
        return Example(prompt, str(row["completion"]))
