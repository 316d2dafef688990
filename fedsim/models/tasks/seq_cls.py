"""Sequence classification: a model with a classification head (``AutoModelForSequenceClassification``: BERT,
DistilBERT, RoBERTa, DeBERTa-v2, and decoders with a score head such as Llama, Qwen2 or GPT-2), LoRA on its layers
and the head trained in full beside the adapter (PEFT's ``SEQ_CLS``: the head in ``modules_to_save``).

The input is each row's prompt as its row format renders it (``data.format: classification``: the template with the
text, without the answer); the target is the row's label, by its index in the data's sorted label names. The loss is
the cross-entropy of the head's logits; evaluation reads the predicted class (accuracy, macro-F1, Matthews through
the metric extension point) and the log-likelihood of the true one (the loss).

The head: ``num_labels`` outputs (``model.num_labels``, or the classifier's own when the model already is one), built
seeded by ``model.seed`` where the checkpoint has none, in the compute dtype, never quantized. Every client trains
it with its adapter and the server averages it weighted by sample counts — for every strategy, the personalized ones
included (their personal parts are adapters; the head stays global) — and sends it with each payload; communication
counts it both ways.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsim.config import ModelConfig
from fedsim.errors import ScenarioError
from fedsim.models import base, batches, lm_loss
from fedsim.models.tasks import Forward, ModelTask, architectures, model_task

# PEFT's SEQ_CLS_HEAD_NAMES, plus the layers a classifier puts under its head and initialises with it (DistilBERT's
# pre_classifier, DeBERTa-v2's ContextPooler — a top-level `pooler`; BERT's pretrained pooler lies inside `bert` and is
# not one): left frozen at their random start, they would cap what the head learns
HEADS = ("pre_classifier", "pooler", "classifier", "score")


@model_task("seq_cls")
class SequenceClassification(ModelTask):
    """``AutoModelForSequenceClassification`` (the tiny model: ``LlamaForSequenceClassification``), PEFT task type
    ``SEQ_CLS``."""

    name = "seq_cls"
    peft_task_type = "SEQ_CLS"
    classes = ("AutoModelForSequenceClassification", "LlamaForSequenceClassification")
    packable = True  # each client's head in the pass: fedsim.client.packed
    encodes_inputs = True
    head_names = HEADS

    def build(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
        n = num_labels(cfg)
        model = base.build_base_model(cfg, device, self.classes, num_labels=n)
        if getattr(model.config, "pad_token_id", None) is None:  # decoders find each row's last token by the pad id
            model.config.pad_token_id = self.tokenizer(cfg).pad_token_id
        return model

    def tokenizer(self, cfg: ModelConfig) -> Any:
        return base.load_tokenizer(cfg)

    def modules_to_save(self, model: torch.nn.Module) -> list[str]:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        return [h for h in HEADS if isinstance(getattr(inner, h, None), torch.nn.Module)]

    def check(self, cfg: ModelConfig, data: Any) -> None:
        names = list(getattr(data, "label_names", []) or [])
        if not names:
            raise ScenarioError("data.format", "model.task seq_cls trains a classifier on labelled rows, but the data "
                                "has no labels", "use data.format: classification with a label column")
        n = num_labels(cfg)
        if len(names) > n:
            raise ScenarioError("model.num_labels", f"the data has {len(names)} labels ({', '.join(names[:5])}"
                                f"{', ...' if len(names) > 5 else ''}) but the head has {n} outputs",
                                f"set model.num_labels: {len(names)}")

    def refusal(self, scenario: Any, strategy: Any) -> tuple[str, str, str] | None:
        """What a trained head rules out: it is averaged by the server beside any aggregating strategy (a strategy that
        aggregates nothing — local-only training — keeps each client's head with its adapter), but it is neither
        clipped and noised (privacy), bounded (robust rules), attacked (model poisoning) nor drift-corrected
        (SCAFFOLD's control variates cover the adapter only); and a classifier generates nothing."""
        head = "the classifier head trains in full and the server averages it beside the adapter"
        if scenario.privacy is not None:
            return ("privacy", f"{head}, unclipped and without noise: the accountant's ε would not cover it",
                    "remove the privacy section, or fine-tune a causal LM (model.task: causal_lm)")
        if scenario.strategy.robust is not None:
            return ("strategy.robust", f"robust rules bound the adapter's updates, but {head} as a plain mean",
                    "remove strategy.robust, or fine-tune a causal LM")
        bad = scenario.clients.malicious
        if bad is not None and bad.attack not in ("label_flip", "nan"):
            return ("clients.malicious.attack", f"model poisoning ({bad.attack}) alters the adapter's update, not the "
                    "head", "use attack: label_flip (data poisoning), or fine-tune a causal LM")
        objective = scenario.strategy.client_objective
        if objective is not None and objective.name == "scaffold":
            return ("strategy.client_objective", f"SCAFFOLD corrects the adapter's drift with control variates, but "
                    f"{head} without one: it would train uncorrected (and cost 1.4x FedIT's traffic, not SCAFFOLD's "
                    "2x)", "use another client objective (fedprox) with a classifier, or fine-tune a causal LM")
        if scenario.generation() is not None or scenario.eval.harness is not None:
            key = "eval.harness" if scenario.eval.harness is not None else "eval.generate"
            return (key, "a sequence classifier predicts a class, it generates no text", f"remove {key}")
        return None

    def collate(self, split: Any, indices: Any, pad_id: int, device: torch.device | str = "cpu"
                ) -> dict[str, torch.Tensor]:
        return batches.collate_prompts(split, indices, pad_id, device)

    def pack_collate(self, split: Any, client_batches: Any, pad_id: int, device: torch.device | str = "cpu"
                     ) -> dict[str, torch.Tensor]:
        return batches.collate_prompts_pack(split, client_batches, pad_id, device)

    def pack_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_loss.block_means(self._logits(model, batch), batch["labels"], n)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def _logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], forward: Forward | None = None
                ) -> torch.Tensor:
        forward = forward or model
        extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        return forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits.float()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], forward: Forward | None = None
             ) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self._logits(model, batch, forward), batch["labels"])

    def token_scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        logp, _, hit, _ = self.score(model, batch)
        return logp, hit

    def score(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        logits = self._logits(model, batch)
        labels = batch["labels"]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1))  # (B, 1)
        predicted = logits.argmax(dim=-1)
        return logp, torch.ones_like(logp, dtype=torch.bool), (predicted == labels).unsqueeze(-1), predicted


def num_labels(cfg: ModelConfig) -> int:
    """The head's outputs: ``model.num_labels``, else those of a model that already is a sequence classifier.

    Raises:
        ScenarioError: neither says (a base model without a classification head).
    """
    if cfg.num_labels is not None:
        return cfg.num_labels
    archs = architectures(cfg)
    if any(a.endswith("ForSequenceClassification") for a in archs):
        n = getattr(base.hf_config(cfg, SequenceClassification.classes[0]), "num_labels", None)
        if n:
            return int(n)
    raise ScenarioError("model.num_labels", f"{cfg.name} has no classification head to take its number of labels "
                        "from", "set model.num_labels to the number of classes in the data")
