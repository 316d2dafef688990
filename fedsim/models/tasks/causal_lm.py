"""The causal language model task: instruction tuning, with the loss on the response tokens only
(:mod:`fedsim.models.lm_loss` runs the LM head at the labelled positions alone)."""

from __future__ import annotations

from typing import Any

import torch

from fedsim.config import ModelConfig
from fedsim.models import base, lm_loss
from fedsim.models.tasks import Forward, ModelTask, model_task


@model_task("causal_lm")
class CausalLM(ModelTask):
    """``AutoModelForCausalLM`` (the tiny model: ``LlamaForCausalLM``), PEFT task type ``CAUSAL_LM``."""

    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    packable = True

    def build(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
        return base.build_base_model(cfg, device, self.classes)

    def tokenizer(self, cfg: ModelConfig) -> Any:
        return base.load_tokenizer(cfg)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], forward: Forward | None = None
             ) -> torch.Tensor:
        return lm_loss.causal_lm_loss(model, batch["input_ids"], batch["labels"], forward)

    def token_scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-likelihood of the labels and whether the argmax hit them, at the positions where some row
        has a label (B, P), masked where a row has none. The LM head runs at those positions only
        (:func:`~fedsim.models.lm_loss.labelled_logits`): the logits of a whole batch, (B, T, vocabulary) in float32,
        are most of an evaluation's memory, and a prompt's positions have no label to score."""
        logits, target = lm_loss.labelled_logits(model, batch["input_ids"], batch["labels"])
        logits = logits.float()
        valid = target != lm_loss.IGNORE
        safe = target.clamp(min=0)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        hit = logits.argmax(dim=-1) == safe
        return logp.masked_fill(~valid, 0.0), hit | ~valid
