"""``chat``: conversations as TRL's conversational format — a ``messages`` list of ``{role, content}`` — rendered with
the tokenizer's chat template (``apply_chat_template``), the loss on the assistant's turns only.

The template is ``data.chat_template`` if given, else the tokenizer's own, else :data:`DEFAULT_CHAT_TEMPLATE`
(ChatML, each message closed by the tokenizer's EOS token so that a model learns where a reply ends). Each assistant
reply is the text the template adds for it (an assistant message that opens a conversation answers nothing: it is
context, not trained): the conversation up to the reply rendered with the generation prompt,
then with the reply, and the difference trained. A template that does not render conversations incrementally (one
that rewrites earlier turns) is refused with the reason. The rendered text carries the template's own special tokens
(BOS, say), so it is tokenized without adding more — as ``apply_chat_template(..., tokenize=True)`` does.
"""

from __future__ import annotations

from typing import Any

from fedsim.config import DataConfig
from fedsim.data.formats import Example, RowFormat, row_format
from fedsim.errors import DataError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_template(cfg: DataConfig, tokenizer: Any) -> str:
    """The template a conversation is rendered with: the scenario's, the tokenizer's, or the default."""
    return cfg.chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


@row_format("chat")
class Chat(RowFormat):
    name = "chat"
    default_template = ""

    def fields(self, cfg: DataConfig) -> list[str]:
        return ["messages"]

    def check_row(self, row: dict[str, Any], cfg: DataConfig, where: str) -> None:
        msgs = row.get("messages")
        if not isinstance(msgs, (list, tuple)) or not msgs:
            raise DataError(f"{where} field 'messages' is {type(msgs).__name__}, not a list of {{role, content}} "
                            "messages; give each row a non-empty list (or map your column with data.column_map)")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where} field 'messages' item {j} is {m!r:.80}: each message needs a 'role' and a "
                                "'content', both text")
        if not any(m["role"] == "assistant" for m in msgs[1:]):
            opener = " after its opening message" if msgs[0]["role"] == "assistant" else ""
            raise DataError(f"{where} field 'messages' has no assistant turn{opener}: nothing to train on (roles: "
                            f"{[m['role'] for m in msgs]}); a reply needs a message before it")

    def example(self, row: dict[str, Any], cfg: DataConfig) -> Example:
        raise DataError("format: chat renders conversations with the tokenizer (RowFormat.render)")

    def render(self, row: dict[str, Any], cfg: DataConfig, tokenizer: Any, where: str) -> Example:
        template = chat_template(cfg, tokenizer)
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        done, pairs = "", []
        for j in range(1, last + 1):  # an opening assistant message answers nothing: it is context
            if msgs[j]["role"] != "assistant":
                continue
            before = _render(tokenizer, template, msgs[:j], True, where)
            upto = _render(tokenizer, template, msgs[: j + 1], False, where)
            if not before.startswith(done) or not upto.startswith(before):
                raise DataError(f"{where}: the chat template does not render the conversation incrementally (it "
                                "rewrites earlier turns), so the assistant's turns cannot be told apart; set "
                                "data.chat_template to one that appends each message")
            pairs.append((before[len(done):], upto[len(before):]))
            done = upto
        *context, (prompt, response) = pairs
        return Example(prompt, response, context=tuple(context), rendered=True)


def _render(tokenizer: Any, template: str, msgs: list[dict[str, str]], generation: bool, where: str) -> str:
    extra = {}
    if getattr(tokenizer, "eos_token", None) is None:  # BERT's WordPiece: its separator ends a message
        extra["eos_token"] = getattr(tokenizer, "sep_token", None) or ""
    try:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation, **extra)
    except Exception as e:  # noqa: BLE001 - jinja2's errors, and templates raising their own
        raise DataError(f"{where}: the chat template cannot render this conversation: {e.__class__.__name__}: {e} "
                        "(fix the row, or set data.chat_template)") from None
