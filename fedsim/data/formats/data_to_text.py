"""``data_to_text``: WebNLG-style rows — a list of (subject | predicate | object) triples in ``input`` and the text
that verbalises them in ``data.response_field`` (GEM/web_nlg: ``target``). The prompt is ``data.prompt_template``
(default ``"{input}\\n"``) with the triples joined by `` ; `` (a single string is used as it is); the loss covers the
response, and evaluation generates it (``eval.metrics``: bleu, rouge_l, chrf, ...)."""

from __future__ import annotations

from typing import Any

from fedsim.config import DataConfig
from fedsim.data.formats import Example, RowFormat, check_scalar, row_format, template_fields

SEPARATOR = " ; "


@row_format("data_to_text")
class DataToText(RowFormat):
    name = "data_to_text"
    default_template = "{input}\n"

    def fields(self, cfg: DataConfig) -> list[str]:
        return template_fields(cfg.template()) + [cfg.response_field]

    def check_row(self, row: dict[str, Any], cfg: DataConfig, where: str) -> None:
        for f in self.fields(cfg):
            value = row.get(f)
            if isinstance(value, (list, tuple)) and f != cfg.response_field:
                for item in value:
                    check_scalar(item, f"{f}[]", where)  # a triple is text, never a nested list
            else:
                check_scalar(value, f, where)

    def example(self, row: dict[str, Any], cfg: DataConfig) -> Example:
        template = cfg.template()
        values = {k: SEPARATOR.join(str(x) for x in row[k]) if isinstance(row[k], (list, tuple)) else row[k]
                  for k in template_fields(template)}
        return Example(template.format(**values), str(row[cfg.response_field]))
