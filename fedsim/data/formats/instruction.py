"""``instruction``: a prompt from ``data.prompt_template`` (default ``"{instruction}\\n"``) and the response in
``data.response_field``; the loss covers the response (and EOS), evaluation checks it by exact match."""

from __future__ import annotations

from typing import Any

from fedsim.config import DataConfig
from fedsim.data.formats import Example, RowFormat, missing, row_format, template_fields


@row_format("instruction")
class Instruction(RowFormat):
    name = "instruction"
    default_template = "{instruction}\n"

    def fields(self, cfg: DataConfig) -> list[str]:
        return template_fields(cfg.template()) + [cfg.response_field]

    def advice(self, rows: list[dict[str, Any]], cfg: DataConfig) -> list[str]:
        """Rows with an Alpaca ``input`` the template does not read: it would be dropped without a word."""
        if "input" in template_fields(cfg.template()):
            return []
        n = sum(1 for r in rows if not missing(r.get("input")) and str(r["input"]).strip())
        if not n:
            return []
        return [f"{n} of {len(rows)} rows have an 'input' field that the prompt template {cfg.template()!r} does not "
                "read: it is left out of training; use data.format: alpaca (Alpaca's templates) or put {input} in "
                "data.prompt_template"]

    def example(self, row: dict[str, Any], cfg: DataConfig) -> Example:
        template = cfg.template()
        prompt = template.format(**{k: row[k] for k in template_fields(template)})
        return Example(prompt, str(row[cfg.response_field]))
