"""Adapters on disk, in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path

from fedsim.config import Scenario
from fedsim.lora.merge import ExportedAdapter
from fedsim.lora.ops import HEAD_PREFIX
from fedsim.models.base import fan_in_fan_out
from fedsim.models.tasks import ModelTask


def save_peft_adapter(adapter: ExportedAdapter, scenario: Scenario, path: Path, task: ModelTask | None = None
                      ) -> None:
    """Write the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), loadable with
    ``PeftModel.from_pretrained(base, path)`` on the same base model. The config is written without importing PEFT
    (with transformers, 3 s at the end of every run): the settings that differ from ``LoraConfig``'s defaults, which
    PEFT fills in when it loads the file (a test reads it back with PEFT and compares). ``task``: the model task
    (default: a causal LM)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = peft_config_dict(adapter, scenario, task)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tensors = {**adapter.tensors, **{k[len(HEAD_PREFIX):]: v for k, v in adapter.head.items()}}  # PEFT's keys
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"), metadata={"format": "pt"})


def peft_config_dict(adapter: ExportedAdapter, scenario: Scenario, task: ModelTask | None = None) -> dict:
    """The adapter's ``peft.LoraConfig`` settings, as its ``adapter_config.json`` holds them (``fan_in_fan_out`` for
    GPT-2's ``Conv1D`` layers)."""
    if task is None:
        from fedsim.models.tasks.causal_lm import CausalLM

        task = CausalLM()
    lora = adapter.lora
    extra: dict = {"fan_in_fan_out": True} if fan_in_fan_out(scenario.model, task.classes[0], task.head_names) else {}
    heads = sorted({k[len(HEAD_PREFIX):].split(".")[0] for k in adapter.head})
    if heads:
        extra["modules_to_save"] = heads
    return {"peft_type": "LORA", "task_type": task.peft_task_type, "base_model_name_or_path": scenario.model.name,
            "r": lora.rank, "lora_alpha": lora.alpha, "use_rslora": lora.rslora,
            "rank_pattern": dict(adapter.rank_pattern), "alpha_pattern": dict(adapter.alpha_pattern),
            "target_modules": target if isinstance(target := scenario.model.target_modules, str) else sorted(target),
            "lora_dropout": scenario.model.lora_dropout,
            "bias": "none", "inference_mode": False, **extra}
