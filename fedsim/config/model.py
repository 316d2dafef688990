"""The ``model`` section: which base model, which layers LoRA adapts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fedsim.config.base import Frozen

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TinyModelConfig(Frozen):
    """Size of the built-in tiny Llama-architecture model (random init, byte-level vocabulary)."""

    hidden_size: int = Field(64, ge=8, le=4096)
    intermediate_size: int = Field(128, ge=8, le=16384)
    num_layers: int = Field(2, ge=1, le=64)
    num_heads: int = Field(4, ge=1, le=64)
    max_position_embeddings: int = Field(512, ge=16, le=32768)
    init_seed: int = Field(1234, ge=0)
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
    hub name or a local directory loaded with ``from_pretrained``."""

    name: str = "tiny"
    tiny: TinyModelConfig = TinyModelConfig()
    # PEFT's forms: a list of names (a module matches one by its full name or by a name suffix after a dot), a regular
    # expression (matched against the full module name), or "all-linear" (every linear layer but the output layer)
    target_modules: tuple[str, ...] | str = DEFAULT_TARGET_MODULES
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    revision: str | None = None
    trust_remote_code: bool = False

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

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "scenario files may not execute code; load models whose architecture is part of transformers"
            )
        return v
