"""Build or load the base model and its tokenizer, and read the shapes of its layers.

``model.name: tiny`` builds a small Llama-architecture model from config with a byte-level tokenizer that needs no
files (ByT5's vocabulary: :mod:`fedsim.models.tokenizer`), so tests and the quickstart download nothing. Any other name is a Hugging Face hub
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
from fedsim.config.paths import HUB_OR_LOCAL
from fedsim.errors import ScenarioError
from fedsim.models.tokenizer import BYTE_LEVEL, BYTE_VOCAB, load_tokenizer, tokenizer_source  # noqa: F401  # re-exported
from fedsim.types import ModuleShape

TINY = "tiny"


def is_tiny(cfg: ModelConfig) -> bool:
    return cfg.name == TINY and cfg.config is None


def is_standin(cfg: ModelConfig) -> bool:
    """A randomly initialised model built from ``model.config`` (no weights are loaded)."""
    return cfg.config is not None


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


def build_base_model(cfg: ModelConfig, device: torch.device | str = "cpu", classes: tuple[str, str] = CAUSAL_LM,
                     num_labels: int | None = None) -> torch.nn.Module:
    """Build (tiny or a config stand-in, seeded) or load (hub/local) the base model, frozen, in eval mode, on
    ``device``.

    ``classes``: the transformers auto class a model loads with, and the class the tiny model is built as (default:
    a causal LM). ``num_labels``: a classification head's outputs (a head the checkpoint lacks is initialised seeded
    by ``model.seed``, the same on every worker).

    Raises:
        ScenarioError: the model cannot be loaded or built, or its architecture is not of the auto class.
    """
    import transformers

    auto_class, tiny_class = classes
    device = torch.device(device)
    dtype = resolve_dtype(cfg, device)
    hf_cfg = hf_config(cfg, auto_class)  # its architecture checked before any weight is read
    if num_labels is not None:
        hf_cfg.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny.init_seed if is_tiny(cfg) else cfg.seed)
        if is_tiny(cfg):
            model = getattr(transformers, tiny_class)(hf_cfg).to(dtype=dtype)
        elif is_standin(cfg):
            model = getattr(transformers, auto_class).from_config(hf_cfg).to(dtype=dtype)
        else:
            try:
                model = getattr(transformers, auto_class).from_pretrained(cfg.name, revision=cfg.revision, dtype=dtype,
                                                                          config=hf_cfg)
            except Exception as e:
                raise ScenarioError("model.name", f"cannot load {cfg.name!r}: {e.__class__.__name__}: {e}",
                                    HUB_OR_LOCAL
                                    ) from None
    model = model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model


def hf_config(cfg: ModelConfig, auto_class: str | None = CAUSAL_LM[0]) -> Any:
    """The transformers config the model is built or loaded with: the tiny model's, a stand-in's (``model.config``),
    or the hub / local model's own; its architecture checked against ``auto_class`` (None: not checked).

    Raises:
        ScenarioError: the config cannot be read or built, or names a model of another kind (a sequence classifier
            loaded as a causal LM would lose its classifier).
    """
    if is_tiny(cfg):
        return tiny_config(cfg)
    if is_standin(cfg):
        hf_cfg = standin_config(cfg)
    else:
        from transformers import AutoConfig

        try:
            hf_cfg = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision)
        except Exception as e:
            raise ScenarioError("model.name", f"cannot read the config of {cfg.name!r}: {e.__class__.__name__}: {e}",
                                HUB_OR_LOCAL) from None
    if auto_class is not None:
        check_architecture(cfg, hf_cfg, auto_class)
    return hf_cfg


def standin_config(cfg: ModelConfig) -> Any:
    """The config of a stand-in: ``model.config``'s fields on top of the ``model_type``'s defaults, or a local
    ``config.json``. With the byte-level tokenizer the vocabulary is the tokenizer's (384 ids, unless the config sets
    ``vocab_size``), and the padding and end-of-sequence ids are the tokenizer's unless the mapping sets them."""
    from transformers import AutoConfig

    given: dict[str, Any] = dict(cfg.config) if isinstance(cfg.config, dict) else {}
    try:
        if isinstance(cfg.config, dict):
            kwargs = {k: v for k, v in given.items() if k != "model_type"}
            hf_cfg = AutoConfig.for_model(given["model_type"], **kwargs)
        else:
            hf_cfg = AutoConfig.from_pretrained(cfg.config)
    except Exception as e:
        raise ScenarioError("model.config", f"cannot build a config from {cfg.config!r}: {e.__class__.__name__}: {e}",
                            "give a model_type transformers knows (e.g. llama, gpt2, roberta) and that type's "
                            "field names, or a config.json saved by transformers") from None
    if tokenizer_source(cfg) == BYTE_LEVEL:
        if "vocab_size" not in given and isinstance(cfg.config, dict):
            hf_cfg.vocab_size = BYTE_VOCAB
        if getattr(hf_cfg, "vocab_size", BYTE_VOCAB) < BYTE_VOCAB:
            raise ScenarioError("model.config", f"vocab_size {hf_cfg.vocab_size} is smaller than the byte-level "
                                f"tokenizer's {BYTE_VOCAB} ids", f"set vocab_size ≥ {BYTE_VOCAB}, or give "
                                "model.tokenizer")
        for key, value in (("pad_token_id", 0), ("eos_token_id", 1)):
            if key not in given:
                setattr(hf_cfg, key, value)
    return hf_cfg


def position_limit(cfg: ModelConfig) -> int | None:
    """The positions the model has (None when its config says nothing, or cannot be read here: a hub id out of
    reach). RoBERTa-style models number positions from the padding id + 1."""
    if is_tiny(cfg):
        return cfg.tiny.max_position_embeddings
    try:
        hf_cfg = standin_config(cfg) if is_standin(cfg) else hf_config(cfg, None)
    except ScenarioError:
        return None
    n = getattr(hf_cfg, "max_position_embeddings", None) or getattr(hf_cfg, "n_positions", None)
    if not n:
        return None
    if getattr(hf_cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text"):
        n -= (getattr(hf_cfg, "pad_token_id", None) or 0) + 1
    return int(n)


# the heads of models fedsim would load as something else, and the task that fits (or None)
TASK_HEADS = {"ForSequenceClassification": "seq_cls", "ForTokenClassification": None,
              "ForQuestionAnswering": None, "ForMultipleChoice": None}


def check_architecture(cfg: ModelConfig, hf_cfg: Any, auto_class: str) -> None:
    """Refuse a model whose ``architectures`` names a task head that ``auto_class`` would drop (a sequence
    classifier loaded as a causal LM: its trained classifier discarded, a random LM head made up)."""
    if auto_class != CAUSAL_LM[0]:
        return
    for arch in getattr(hf_cfg, "architectures", None) or []:
        for head, task in TASK_HEADS.items():
            if arch.endswith(head):
                fix = (f"set model.task: {task} (or leave it auto)" if task else
                       "fedsim has no model task for it: use a causal LM or a sequence classifier")
                raise ScenarioError("model.task", f"{cfg.name} is a {arch}: loading it as a causal LM would drop "
                                    "its head and score through a random LM head", fix)


def peft_matches(name: str, target: tuple[str, ...] | str) -> bool:
    """PEFT's rule (``check_target_module_exists``) for whether the module at ``name`` is adapted: a regular
    expression matches the full name; a list entry is the full name or a suffix of it after a dot."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return name in target or any(name.endswith(f".{t}") for t in target)


def is_conv1d(layer: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and its family): a linear layer storing its weight as (d_in, d_out)."""
    return type(layer).__name__ == "Conv1D" and type(layer).__module__.startswith("transformers")


def is_linear(layer: torch.nn.Module) -> bool:
    """A layer LoRA adapts as a linear map: ``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(layer, torch.nn.Linear) or is_conv1d(layer)


def weight_matrix(layer: torch.nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight of a linear layer (or of the base layer under a PEFT wrapper) — for a ``Conv1D`` a
    transposed view of its (d_in, d_out) storage, so that adding a ΔW in place updates the layer."""
    layer = getattr(layer, "base_layer", layer)
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def in_blocks(name: str) -> bool:
    """Whether a module lies inside the model's repeated blocks (``model.layers.3``, ``transformer.h.0``,
    ``encoder.layer.11``): the layers a quantized base quantizes — embeddings, heads and the classifier stay."""
    return re.search(r"(^|\.)\d+(\.|$)", name) is not None


def head_exclusion(head_modules: list[str] | tuple[str, ...]) -> str | None:
    """PEFT's exclusion of the modules inside ``modules_to_save`` from LoRA's targets, as a regular expression over
    full module names (None without a head)."""
    if not head_modules:
        return None
    return rf"(.*\.)?({'|'.join(re.escape(m) for m in head_modules)})(\..*)?"


def target_shapes(cfg: ModelConfig, auto_class: str = CAUSAL_LM[0], heads: tuple[str, ...] = ()
                  ) -> dict[str, ModuleShape]:
    """Module path → (d_in, d_out) of every linear layer LoRA adapts, by PEFT's own matching of
    ``model.target_modules`` (a list, a regular expression, or ``all-linear``: every linear layer but the output
    layer and, for a classifier, its head). ``heads``: the modules a model task trains in full; nothing inside them
    is adapted, whatever the form (PEFT's rule for ``modules_to_save``).

    Raises:
        ScenarioError: the model's config cannot be read, no module matches, or a listed name matches none (each
            with the model's near misses).
    """
    linear, outputs = linear_shapes(cfg, auto_class), linear_shapes(cfg, auto_class, part="heads")
    target = cfg.target_modules
    inside = head_exclusion(heads)
    linear = {n: s for n, s in linear.items() if inside is None or not re.fullmatch(inside, n)}
    if target == "all-linear":
        names = [n for n in linear if not any(n == h or n.startswith(f"{h}.") for h in outputs)]
    else:
        names = [n for n in linear if peft_matches(n, target)]
    ends = sorted({n.split(".")[-1] for n in linear})
    if target != "all-linear":
        _refuse_other_matches(cfg, target, linear_shapes(cfg, auto_class, part="others"), ends)
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


def _refuse_other_matches(cfg: ModelConfig, target: tuple[str, ...] | str, others: dict[str, str],
                          ends: list[str]) -> None:
    """PEFT would try to adapt every module the target matches and fail on one that is not a linear layer (an
    activation, a block, an embedding): say so first, by name."""
    for name, kind in others.items():
        if peft_matches(name, target):
            raise ScenarioError("model.target_modules", f"{target!r} matches {name} of {cfg.name}, a {kind}: LoRA "
                                "adapts linear layers only", f"match linear layers alone (names: {', '.join(ends)})")


def _near(name: str, candidates: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f" (near misses: {', '.join(close)})" if close else ""


def decoder_linear_shapes(cfg: ModelConfig, auto_class: str = CAUSAL_LM[0]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every linear layer inside the model's blocks — the layers a quantized base quantizes (the
    rule of :func:`fedsim.models.quant.quantizable_layers`)."""
    return {n: (d_out, d_in) for n, (d_in, d_out) in linear_shapes(cfg, auto_class).items() if in_blocks(n)}


def fan_in_fan_out(cfg: ModelConfig, auto_class: str = CAUSAL_LM[0], heads: tuple[str, ...] = ()) -> bool:
    """Whether the layers LoRA adapts store their weights as (d_in, d_out) (GPT-2's ``Conv1D``): PEFT's
    ``fan_in_fan_out``, written into an exported adapter's config."""
    conv = set(linear_shapes(cfg, auto_class, part="conv1d"))
    return any(n in conv for n in target_shapes(cfg, auto_class, heads))


def linear_shapes(cfg: ModelConfig, auto_class: str = CAUSAL_LM[0], part: str = "shapes") -> Any:
    """Module path → (d_in, d_out) of every linear layer (``nn.Linear`` or ``Conv1D``) of the model, from a build on
    the meta device (no weights), remembered under ``cache_dir()/shapes`` by the model's identity: the driver needs
    only these numbers, and importing transformers' modelling code to get them costs it ~3 s and ~110 MB on every
    run. ``part="heads"``: instead the names of the output layers ``all-linear`` leaves out (PEFT's rule: the output
    embedding, or a classifier's head); ``part="conv1d"``: the names of the ``Conv1D`` layers; ``part="others"``:
    every other module's class name, by its path; ``part="params"``: the model's parameter count (tied weights
    once).

    Raises:
        ScenarioError: the model's config cannot be read.
    """
    import json
    from importlib.metadata import version

    from fedsim.paths import cache_dir

    if is_tiny(cfg):
        ident: Any = cfg.tiny.model_dump(mode="json")
    elif isinstance(cfg.config, dict):
        ident = [cfg.config, tokenizer_source(cfg)]
    elif cfg.config is not None or os.path.isfile(os.path.join(cfg.name, "config.json")):  # a local config file
        path = cfg.config if cfg.config is not None else cfg.name
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(path, "rb") as f:
            ident = [hashlib.sha256(f.read()).hexdigest(), tokenizer_source(cfg)]
    else:  # a hub id, at a revision (the tokenized cache keys it the same way)
        ident = [cfg.name, cfg.revision]
    blob = json.dumps({"model": ident, "class": auto_class, "v": 4, "transformers": version("transformers")},
                      sort_keys=True, default=str)
    path = cache_dir() / "shapes" / f"{hashlib.sha256(blob.encode()).hexdigest()[:24]}.json"
    try:
        entry = json.loads(path.read_text())
        got = entry["found"]
        found = {"shapes": {k: (int(v[0]), int(v[1])) for k, v in got["shapes"].items()},
                 "heads": [str(h) for h in got["heads"]], "conv1d": [str(c) for c in got["conv1d"]],
                 "others": {str(k): str(v) for k, v in got["others"].items()}, "params": int(got["params"])}
        if entry["digest"] != _digest(found):  # edited by hand, or damaged: a wrong shape would fail much later
            raise ValueError("the entry does not match its digest")
    except (OSError, ValueError, TypeError, IndexError, AttributeError, KeyError):
        found = _meta_shapes(cfg, auto_class)  # not cached yet, unreadable or altered: build it
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"found": found, "digest": _digest(found)}))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs the next run the build
    return found[part]


def _digest(found: dict[str, Any]) -> str:
    """A shapes-cache entry's own check: the SHA-256 of its contents as JSON (tuples as lists)."""
    import json

    return hashlib.sha256(json.dumps(found, sort_keys=True, default=list).encode()).hexdigest()


def _meta_shapes(cfg: ModelConfig, auto_class: str) -> dict[str, Any]:
    """The linear layers' (d_in, d_out), the output heads and the ``Conv1D`` layers of the model built on the meta
    device."""
    import transformers

    hf_cfg = hf_config(cfg, auto_class)
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(hf_cfg)
    shapes, conv1d, others = {}, [], {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            shapes[n] = (m.in_features, m.out_features)
        elif is_conv1d(m):
            shapes[n] = (int(m.weight.shape[0]), int(m.weight.shape[1]))
            conv1d.append(n)
        elif n:
            others[n] = type(m).__name__
    names = {id(m): n for n, m in model.named_modules()}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [names[id(out)]] if out is not None and id(out) in names else []
    if not heads:  # PEFT's SEQ_CLS_HEAD_NAMES
        heads = [h for h in ("score", "classifier") if isinstance(getattr(model, h, None), torch.nn.Module)][:1]
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return {"shapes": shapes, "heads": heads, "conv1d": conv1d, "others": others, "params": int(params)}


def configure_threads(num_threads: int) -> None:
    """Pin torch's intra-op threads (so that every backend computes identically)."""
    torch.set_num_threads(num_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(num_threads))


def seed_torch(seed: int, device: torch.device) -> None:
    """Seed torch's random stream on ``device``: the CPU generator, and the CUDA device's when it is one.

    ``torch.manual_seed`` would also queue a lazy seeding of every CUDA, XPU and MTIA device not yet initialised,
    formatting the caller's stack each time: ~1 ms per client at a Ray worker's stack depth, on a CPU-only run."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
