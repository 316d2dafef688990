"""``instruction``: a prompt from ``data.prompt_template`` (default ``"{instruction}\\n"``) and the response in
``data.response_field``; the loss covers the response (and EOS), evaluation checks it by exact match."""

from __future__ import annotations

from typing import Any

from fedsim.config import DataConfig
from fedsim.data.formats import Example, RowFormat, row_format, template_fields


@row_format("instruction")
class Instruction(RowFormat):
    name = "instruction"
    default_template = "{instruction}\n"

    def fields(self, cfg: DataConfig) -> list[str]:
        return template_fields(cfg.template()) + [cfg.response_field]

    def example(self, row: dict[str, Any], cfg: DataConfig) -> Example:
        template = cfg.template()
        prompt = template.format(**{k: row[k] for k in template_fields(template)})
        return Example(prompt, str(row[cfg.response_field]))
