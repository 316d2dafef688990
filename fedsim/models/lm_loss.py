"""The causal-LM loss, with the LM head run only where a label is scored.

transformers' ``model(input_ids, labels=labels).loss`` computes the logits of every position — (B, T, vocabulary)
floats — and then ignores those of the prompt. In instruction tuning most positions are prompt: fedsim asks the
model for the logits at the positions whose next token carries a label in some row of the batch
(``logits_to_keep``, which transformers' causal LMs take) and computes the same loss from them: the mean next-token
cross-entropy over the labelled tokens, in float32, as transformers' ``ForCausalLMLoss`` does. Training, packed
training and evaluation all go through :func:`labelled_logits`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

IGNORE = -100  # the label of a position that is not scored (prompt, padding), as transformers' losses take it
Forward = Callable[..., Any]  # model(**kwargs) -> an output with .logits


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (PEFT-wrapped) causal LM's forward accepts ``logits_to_keep`` (transformers' models do)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cached = getattr(inner, "_fedsim_logits_to_keep", None)
    if cached is None:
        cached = "logits_to_keep" in inspect.signature(inner.forward).parameters
        inner._fedsim_logits_to_keep = cached
    return cached


def labelled_logits(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                    forward: Forward | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the positions t whose token t + 1 is labelled in some row: (B, P, V) and (B, P), the
    targets ``IGNORE`` where a row has no label there. Right padding (fedsim's batches): no attention mask needed.

    ``forward`` calls the model (default ``model(**kwargs)``; e.g. ``torch.func.functional_call`` with parameter
    overrides)."""
    forward = forward or model
    target = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = (target != IGNORE).any(dim=0).nonzero().squeeze(1)  # (P,)
    if takes_logits_to_keep(model):
        logits = forward(input_ids=input_ids, logits_to_keep=keep).logits
    else:
        logits = forward(input_ids=input_ids).logits[:, :-1][:, keep]
    return logits, target[:, keep]


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   forward: Forward | None = None) -> torch.Tensor:
    """The mean next-token loss over the batch's labelled tokens (NaN without any, as transformers')."""
    logits, target = labelled_logits(model, input_ids, labels, forward)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE)


def pack_losses(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, n: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed pass's causal-LM losses: ``n`` clients' row blocks of equal size, one after another. Returns each
    client's mean next-token loss over its own labelled tokens (n,) — what :func:`causal_lm_loss` gives for its batch
    alone (NaN without a label) — and how many tokens that is (n,)."""
    logits, target = labelled_logits(model, input_ids, labels)  # the LM head at the pack's labelled positions
    return block_means(logits, target, n)


def block_means(logits: torch.Tensor, target: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 cross-entropy of ``logits`` (rows, ..., classes) against ``target`` (rows, ...), averaged within
    each of ``n`` equal row blocks over its targets that are not ``IGNORE``: ((n,) means, (n,) counts)."""
    each = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE, reduction="none").view(n, -1)
    count = (target != IGNORE).view(n, -1).sum(dim=1)
    return each.sum(dim=1) / count, count  # 0/0 = nan for a block without labels, as for one client alone
