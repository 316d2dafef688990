"""The model task extension point: what kind of model a run fine-tunes, and what it computes.

A model task builds the base model and its tokenizer, names the PEFT task type and the modules PEFT trains in full
beside the adapters (``modules_to_save``: a classification head, say), and computes the training loss and the
token-level scores that evaluation reduces into metrics. Today's task is ``causal_lm``
(:mod:`fedsim.models.tasks.causal_lm`); a new one is a subclass of :class:`ModelTask` registered with
``@model_task("name")`` in a module of this package or of a user's own (see docs/architecture.md, "How to add").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from fedsim import registry
from fedsim.config import ModelConfig
from fedsim.errors import ScenarioError
from fedsim.models import batches, lm_loss
from fedsim.models.base import CAUSAL_LM, hf_config, is_tiny

model_task = registry.decorator("model_task")

Forward = Callable[..., Any]  # model(**kwargs) -> an output with .logits


class ModelTask(ABC):
    """What a run fine-tunes. Instances are small and picklable: the driver resolves one and ships it to every worker.

    Attributes:
        name: the registered name.
        peft_task_type: PEFT's ``task_type`` for the exported adapter (``CAUSAL_LM``, ``SEQ_CLS``, ...).
        classes: the transformers auto class a model of this task is loaded and built with, and the class the
            built-in tiny model is built as.
        packable: whether clients of this task can be trained together in one pass (:mod:`fedsim.client.packed`).
    """

    name: ClassVar[str] = ""
    peft_task_type: ClassVar[str] = ""
    classes: ClassVar[tuple[str, str]] = CAUSAL_LM  # (transformers auto class, the tiny model's class)
    head_names: ClassVar[tuple[str, ...]] = ()  # names of the modules it may train in full (never adapted)
    packable: ClassVar[bool] = False
    encodes_inputs: ClassVar[bool] = False  # rows are encoded as the model's whole input (``tokenizer(text[, pair])``,
    # special tokens at both ends) with the label beside them, not as a prompt the model continues

    @abstractmethod
    def build(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The frozen base model, in eval mode, on ``device``."""

    @abstractmethod
    def tokenizer(self, cfg: ModelConfig) -> Any:
        """The model's tokenizer (with a pad token)."""

    def modules_to_save(self, model: torch.nn.Module) -> list[str]:
        """Modules trained in full beside the adapters (PEFT's ``modules_to_save``: a classification head), by their
        paths in the base model; none by default. Every client trains them; the server averages them (weighted by
        sample counts) and sends them with the adapter."""
        return []

    def check(self, cfg: ModelConfig, data: Any) -> None:
        """Refuse data this task cannot train on (:class:`~fedsim.errors.ScenarioError`); the driver calls it once
        the data is tokenized (``data``: :class:`~fedsim.data.tokenized.TokenizedData`). Accepts anything by
        default."""
        return None

    def refusal(self, scenario: Any, strategy: Any) -> tuple[str, str, str] | None:
        """(scenario key, why, fix) when the scenario asks for what this task cannot do with ``strategy``, or None
        (the default: anything goes). The components check calls it before a run starts."""
        return None

    def collate(self, split: Any, indices: Any, pad_id: int, device: torch.device | str = "cpu"
                ) -> dict[str, torch.Tensor]:
        """A batch of ``split``'s rows ``indices``: right-padded ``input_ids``, ``attention_mask`` and the
        ``labels`` the task's loss reads (default: token labels on the response, :func:`fedsim.models.batches.collate`)."""
        return batches.collate(split, indices, pad_id, device)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What a batch's mean loss is a mean over (its labelled tokens, by default): micro-batches of one step are
        weighted by it."""
        return int((batch["labels"][:, 1:] != batches.IGNORE).sum())

    def score(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What evaluation reads from one batch: (log-likelihood of each scored target (B, P), which are valid
        (B, P), whether the model's argmax hit each (B, P), the predicted class per row (B,) or None when the task
        does not predict classes itself). Default: :meth:`token_scores` over the labelled tokens."""
        logp, hit = self.token_scores(model, batch)
        return logp, batch["labels"][:, 1:] != batches.IGNORE, hit, None

    def pack_collate(self, split: Any, client_batches: Any, pad_id: int, device: torch.device | str = "cpu"
                     ) -> dict[str, torch.Tensor]:
        """A packed pass's batch (:mod:`fedsim.client.packed`, for a ``packable`` task): the clients' batches one
        after another, each filled with unlabelled rows up to the same number of rows, so that client k's rows are
        block k (default: the causal LM's, :func:`fedsim.models.batches.collate_pack`)."""
        return batches.collate_pack(split, client_batches, pad_id, device)

    def pack_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], n: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n`` clients' losses of a packed batch: each client's :meth:`loss` over its own block (n,) — what
        that client's batch alone would give — and what each is a mean over (n,): labelled tokens by default."""
        return lm_loss.pack_losses(model, batch["input_ids"], batch["labels"], n)

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], forward: Forward | None = None
             ) -> torch.Tensor:
        """The training loss of a collated batch (``forward``: how to call the model, default ``model(**kw)``)."""

    @abstractmethod
    def token_scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-likelihood of each labelled token, whether the argmax hit it), both (B, P), for evaluation."""


def task_for(cfg: ModelConfig) -> ModelTask:
    """The model task of a model section: ``model.task``, or with ``auto`` the one its architecture names (a
    ``...ForSequenceClassification`` is ``seq_cls``; anything else, and the tiny model, ``causal_lm``).

    Raises:
        ScenarioError: an unknown task, or a config that cannot be read.
    """
    name = cfg.task
    if name == "auto":
        archs = architectures(cfg)
        name = "seq_cls" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"
    return registry.get("model_task", name)()


def architectures(cfg: ModelConfig) -> list[str]:
    """The ``architectures`` the model's config names ([] for the tiny model and a stand-in mapping without them);
    a local config is read as JSON, a hub id's through transformers (cached by the hub client)."""
    import json
    import os

    if is_tiny(cfg):
        return []
    if isinstance(cfg.config, dict):
        return list(cfg.config.get("architectures") or [])
    path = cfg.config if cfg.config is not None else cfg.name
    path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return list(json.load(f).get("architectures") or [])
        except (OSError, ValueError, AttributeError) as e:
            key = "model.config" if cfg.config is not None else "model.name"
            raise ScenarioError(key, f"cannot read {path}: {e}", "give a config.json saved by transformers") from None
    return list(getattr(hf_config(cfg, None), "architectures", None) or [])
