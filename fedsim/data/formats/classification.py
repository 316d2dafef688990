"""``classification``: a prompt from ``data.prompt_template`` (default ``"{text}\\nLabel: "``) and the label's name as
the response (``data.label_names`` maps raw labels to names); evaluation scores each label name as an option and
picks the most likely."""

from __future__ import annotations

from typing import Any

from fedsim.config import DataConfig
from fedsim.data.formats import Example, RowFormat, row_format, template_fields
from fedsim.errors import DataError


def label_name(cfg: DataConfig, raw: Any) -> str:
    """The name of a raw label (``data.label_names``, by value, by string or by integer).

    Raises:
        DataError: ``data.label_names`` does not name it.
    """
    if cfg.label_names is None:
        return str(raw)
    for key in (raw, str(raw)):
        if key in cfg.label_names:
            return cfg.label_names[key]
    try:
        ik = int(raw)
        if ik in cfg.label_names:
            return cfg.label_names[ik]
    except (TypeError, ValueError):
        pass
    raise DataError(f"label {raw!r} is not in data.label_names {sorted(map(str, cfg.label_names))}")


@row_format("classification")
class Classification(RowFormat):
    name = "classification"
    default_template = "{text}\nLabel: "
    scored_by_options = True

    def fields(self, cfg: DataConfig) -> list[str]:
        return template_fields(cfg.template()) + [cfg.label_field]

    def example(self, row: dict[str, Any], cfg: DataConfig) -> Example:
        template = cfg.template()
        prompt = template.format(**{k: row[k] for k in template_fields(template)})
        label = label_name(cfg, row[cfg.label_field])
        return Example(prompt, label, label)
