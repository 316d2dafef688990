"""Generation-based evaluation on a worker: batched, left-padded generation with the KV cache (greedy, or sampled and
seeded), stopped at EOS or ``max_new_tokens``; the decoded generations and references go to the generative metrics
(:mod:`fedsim.eval.text_metrics`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedsim.config.training import GenerateConfig
from fedsim.data.tokenized import TokenizedData, TokenizedSplit
from fedsim.eval.text_metrics import GenerationOutputs
from fedsim.models.base import seed_torch, set_training


def left_padded(split: TokenizedSplit, indices: Sequence[int], pad_id: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples' prompts, left-padded: (input_ids, attention_mask), (B, T)."""
    prompts = [split.sample(int(i))[: int(split.prompt_len[int(i)])] for i in indices]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.from_numpy(p.astype(np.int64))
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def until_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    """The tokens before the first EOS."""
    out = []
    for t in tokens:
        if t == eos_id:
            break
        out.append(int(t))
    return out


@torch.no_grad()
def generate_batch(model: torch.nn.Module, data: TokenizedData, indices: Sequence[int] | np.ndarray,
                   tokenizer: Any, cfg: GenerateConfig, device: torch.device, seed: int,
                   split: TokenizedSplit | None = None) -> tuple[GenerationOutputs, list[dict[str, Any]]]:
    """Generate for a batch of samples of ``split`` (default: the global test set).

    Returns:
        The outputs the generative metrics read, and per sample ``{index, task, prompt, prediction, reference}``.
    """
    split = data.test if split is None else split
    set_training(model, False)
    ids, mask = left_padded(split, indices, data.pad_id, device)
    kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample,
                              "eos_token_id": data.eos_id, "pad_token_id": data.pad_id, "use_cache": True}
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:  # greedy; unset the model's own sampling defaults, which generate() would warn about
        kwargs.update(temperature=None, top_p=None, top_k=None)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the training RNG stays where it was
        seed_torch(seed, device)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    new = out[:, ids.shape[1]:].cpu().tolist()
    predictions, references, samples = [], [], []
    for row, i in enumerate(indices):
        s, p = split.sample(int(i)), int(split.prompt_len[int(i)])
        pred = tokenizer.decode(until_eos(new[row], data.eos_id), skip_special_tokens=True).strip()
        ref = tokenizer.decode(until_eos(s[p:].tolist(), data.eos_id), skip_special_tokens=True).strip()
        predictions.append(pred)
        references.append(ref)
        t = int(split.task[int(i)])
        samples.append({"index": int(i), "task": data.task_names[t] if t >= 0 else None,
                        "prompt": tokenizer.decode(s[:p].tolist(), skip_special_tokens=True),
                        "prediction": pred, "reference": ref})
    tasks = np.asarray(split.task[np.asarray(indices, dtype=np.int64)])
    return GenerationOutputs(predictions, references, tasks, data.task_names), samples
