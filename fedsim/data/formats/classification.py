"""``classification``: a prompt from ``data.prompt_template`` (default ``"{text}\\nLabel: "``) and the label's name as
the response (``data.label_names`` maps raw labels to names); evaluation scores each label name as an option and
picks the most likely."""

from __future__ import annotations

from typing import Any

from fedsim.config import DataConfig
from fedsim.data.formats import Example, RowFormat, row_format, template_fields
from fedsim.errors import DataError, ScenarioError


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
    input_template = "{text}"  # a classifier's input: the text alone (its head reads the answer)
    scored_by_options = True

    def fields(self, cfg: DataConfig) -> list[str]:
        pair = [cfg.text_pair] if cfg.text_pair and cfg.text_pair not in template_fields(cfg.template()) else []
        return template_fields(cfg.template()) + pair + [cfg.label_field]

    def example(self, row: dict[str, Any], cfg: DataConfig) -> Example:
        template = cfg.template()
        prompt = template.format(**{k: row[k] for k in template_fields(template)})
        label = label_name(cfg, row[cfg.label_field])
        return Example(prompt, label, label, pair=str(row[cfg.text_pair]) if cfg.text_pair else None)


def check_pair(cfg: DataConfig, classifier: bool) -> None:
    """``data.text_pair`` fits the model: a classifier encodes it as the pair's second text, so the template must
    not read it too; a causal LM reads only the template, so the template must read it.

    Raises:
        ScenarioError: naming the template and the fix.
    """
    if cfg.text_pair is None:
        return
    if cfg.format != "classification":
        raise ScenarioError("data.text_pair", f"sentence pairs are a classification input, not data.format {cfg.format}",
                            "use data.format: classification, or name both fields in data.prompt_template")
    reads = cfg.text_pair in template_fields(cfg.template())
    if classifier and reads:
        raise ScenarioError("data.text_pair", f"the template {cfg.template()!r} reads {cfg.text_pair!r}, which a "
                            "classifier also encodes as the pair's second text", "leave that field out of "
                            "data.prompt_template (it gives the first text)")
    if not classifier and not reads:
        raise ScenarioError("data.text_pair", f"a causal LM reads only the prompt template {cfg.template()!r}, which "
                            f"does not name {cfg.text_pair!r}", "name both texts in data.prompt_template, e.g. "
                            f"'{{text}}\\n{{{cfg.text_pair}}}\\nLabel: ' (or use model.task: seq_cls)")
