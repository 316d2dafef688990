"""Build or load the base model and its tokenizer, and read the shapes of its layers.

``model.name: tiny`` builds a small Llama-architecture model from config with a byte-level tokenizer that needs no
files (transformers' ByT5Tokenizer), so tests and the quickstart download nothing. Any other name is a Hugging Face hub
id or a local directory, loaded with ``from_pretrained``. Which transformers class a model is built as is the model
task's choice (:mod:`fedsim.models.tasks`); the functions here take it by name.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import torch

from fedsim.config import ModelConfig
from fedsim.errors import ScenarioError
from fedsim.types import ModuleShape

TINY = "tiny"


def is_tiny(cfg: ModelConfig) -> bool:
    return cfg.name == TINY


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of the model (pad token falls back to EOS)."""
    if is_tiny(cfg):
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.name, revision=cfg.revision)
    except Exception as e:
        raise ScenarioError("model.name", f"cannot load the tokenizer of {cfg.name!r}: {e.__class__.__name__}: {e}",
                            "give a hub id you can reach or a local directory saved with save_pretrained") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def set_training(model: torch.nn.Module, training: bool) -> None:
    """Put the model — the PEFT wrapper and every module under it — in training (or evaluation) mode; training and
    evaluation each set the mode they need as they start. Switches only when needed (``Module.train`` walks every
    submodule). The base's own mode
    is what counts: PEFT's wrapper is created in training mode around a base loaded in evaluation mode, and checking
    the wrapper alone once left the base in evaluation mode until a first evaluation switched everything — on a
    worker that had not evaluated yet, gradient checkpointing and the base's own dropout were silently off."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if model.training != training or inner.training != training:
        model.train(training)


def tiny_config(cfg: ModelConfig) -> Any:
    """The LlamaConfig of the built-in tiny model (byte-level vocabulary of ByT5: 384 ids, pad 0, eos 1)."""
    from transformers import LlamaConfig

    t = cfg.tiny
    return LlamaConfig(
        vocab_size=384, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        tie_word_embeddings=False, initializer_range=t.init_std,
    )


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (bf16 there is ~100× slower), bfloat16 on GPUs that support it, else float16."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


CAUSAL_LM = ("AutoModelForCausalLM", "LlamaForCausalLM")  # (auto class, tiny model's class) of a causal LM


def build_base_model(cfg: ModelConfig, device: torch.device | str = "cpu", classes: tuple[str, str] = CAUSAL_LM
                     ) -> torch.nn.Module:
    """Build (tiny, seeded) or load (hub/local) the base model, frozen, in eval mode, on ``device``.

    ``classes``: the transformers auto class a hub or local model loads with, and the class the tiny model is built
    as (default: a causal LM)."""
    import transformers

    auto_class, tiny_class = classes
    device = torch.device(device)
    dtype = resolve_dtype(cfg, device)
    if is_tiny(cfg):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.tiny.init_seed)
            model = getattr(transformers, tiny_class)(tiny_config(cfg))
        model = model.to(device=device, dtype=dtype)
    else:
        try:
            model = getattr(transformers, auto_class).from_pretrained(cfg.name, revision=cfg.revision, dtype=dtype)
        except Exception as e:
            raise ScenarioError("model.name", f"cannot load {cfg.name!r}: {e.__class__.__name__}: {e}",
                                "give a hub id you can reach or a local directory saved with save_pretrained") from None
        model = model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model


OUTPUT_LAYERS = ("lm_head",)  # what "all-linear" leaves out, as PEFT leaves out the output embedding


def peft_matches(name: str, target: tuple[str, ...] | str) -> bool:
    """PEFT's rule (``check_target_module_exists``) for whether the module at ``name`` is adapted: a regular
    expression matches the full name; a list entry is the full name or a suffix of it after a dot."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return name in target or any(name.endswith(f".{t}") for t in target)


def target_shapes(cfg: ModelConfig) -> dict[str, ModuleShape]:
    """Module path → (d_in, d_out) of every linear layer LoRA adapts, by PEFT's own matching of
    ``model.target_modules`` (a list, a regular expression, or ``all-linear``).

    Raises:
        ScenarioError: the model's config cannot be read, no module matches, or a listed name matches none (each
            with the model's near misses).
    """
    linear = linear_shapes(cfg)
    target = cfg.target_modules
    if target == "all-linear":
        names = [n for n in linear if n.split(".")[-1] not in OUTPUT_LAYERS]
    else:
        names = [n for n in linear if peft_matches(n, target)]
    ends = sorted({n.split(".")[-1] for n in linear})
    if not isinstance(target, str):
        for t in target:
            if not any(peft_matches(n, (t,)) for n in linear):
                raise ScenarioError("model.target_modules", f"{t!r} matches no linear layer of {cfg.name}"
                                    + _near(t, ends), f"use names the model has: {', '.join(ends)}")
    if not names:
        raise ScenarioError("model.target_modules", f"the regular expression {target!r} matches no linear layer's "
                            f"full name (e.g. {next(iter(linear), '?')!r})",
                            f"match full names, e.g. '.*\\.(q_proj|v_proj)', or list names: {', '.join(ends)}")
    return dict(sorted((n, ModuleShape(d_in=linear[n][0], d_out=linear[n][1])) for n in names))


def _near(name: str, candidates: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f" (near misses: {', '.join(close)})" if close else ""


def decoder_linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every linear layer inside the decoder blocks — the layers a quantized base quantizes (the
    rule of :func:`fedsim.models.quant.quantizable_layers`)."""
    return {n: (d_out, d_in) for n, (d_in, d_out) in linear_shapes(cfg).items() if ".layers." in f".{n}"}


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Module path → (d_in, d_out) of every ``nn.Linear`` of the model, from a build on the meta device (no weights),
    remembered under ``cache_dir()/shapes`` by the model's identity: the driver needs only these numbers, and
    importing transformers' modelling code to get them costs it ~3 s and ~110 MB on every run.

    Raises:
        ScenarioError: the model's config cannot be read.
    """
    import json
    from importlib.metadata import version

    from fedsim.paths import cache_dir

    if is_tiny(cfg):
        ident: Any = cfg.tiny.model_dump(mode="json")
    elif os.path.isfile(os.path.join(cfg.name, "config.json")):  # a local directory: its config's contents
        with open(os.path.join(cfg.name, "config.json"), "rb") as f:
            ident = hashlib.sha256(f.read()).hexdigest()
    else:  # a hub id, at a revision (the tokenized cache keys it the same way)
        ident = [cfg.name, cfg.revision]
    blob = json.dumps({"model": ident, "transformers": version("transformers")}, sort_keys=True)
    path = cache_dir() / "shapes" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"
    try:
        return {k: (int(v[0]), int(v[1])) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        pass  # not cached yet, or unreadable: build it
    shapes = {n: (m.in_features, m.out_features) for n, m in _meta_model(cfg).named_modules()
              if isinstance(m, torch.nn.Linear)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(shapes))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next run the build
    return shapes


def _meta_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if is_tiny(cfg):
        hf_cfg = tiny_config(cfg)
    else:
        try:
            hf_cfg = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision)
        except Exception as e:
            raise ScenarioError("model.name", f"cannot read the config of {cfg.name!r}: {e.__class__.__name__}: {e}",
                                "give a hub id you can reach or a local directory saved with save_pretrained") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_cfg)


def configure_threads(num_threads: int) -> None:
    """Pin torch's intra-op threads (so that every backend computes identically)."""
    torch.set_num_threads(num_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))
