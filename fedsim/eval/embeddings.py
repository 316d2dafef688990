"""FedDPA-D's instance-wise weights: prompt embeddings from the base with the local adapter, and their cosine
similarity to a client's training instances."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedsim.data.tokenized import TokenizedSplit
from fedsim.models.base import set_training


@torch.no_grad()
def prompt_embeddings(model: torch.nn.Module, split: TokenizedSplit, indices: Sequence[int] | np.ndarray,
                      pad_id: int, device: torch.device, kind: str = "last", batch_size: int = 32) -> torch.Tensor:
    """The last layer's hidden state of each sample's prompt (``last``: at its last token; ``mean``: averaged over
    its tokens), (N, hidden), float32. Prompts are right-padded, so no prompt token sees a pad."""
    set_training(model, False)  # training sets its own mode when it starts
    out = []
    idx = [int(i) for i in indices]
    for s in range(0, len(idx), batch_size):
        chunk = idx[s: s + batch_size]
        prompts = [split.sample(i)[: max(1, int(split.prompt_len[i]))] for i in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        hidden = model(input_ids=ids.to(device), output_hidden_states=True).hidden_states[-1].float()
        lengths = torch.as_tensor([len(p) for p in prompts], device=hidden.device)
        if kind == "last":
            out.append(hidden[torch.arange(len(chunk), device=hidden.device), lengths - 1])
        else:
            mask = (torch.arange(width, device=hidden.device)[None, :] < lengths[:, None]).float()
            out.append((hidden * mask[..., None]).sum(1) / lengths[:, None])
    return torch.cat(out).cpu()


def similarity_weights(test_emb: torch.Tensor, ref_emb: torch.Tensor, refs: list[np.ndarray],
                       max_weight: float) -> torch.Tensor:
    """FedDPA-D's instance-wise weight of each test instance: ``max_weight`` × the mean cosine similarity of its
    embedding to those of its reference instances (``refs[i]``: rows of ``ref_emb``), (N,)."""
    weights = []
    for i, rows in enumerate(refs):
        sims = torch.nn.functional.cosine_similarity(test_emb[i][None, :], ref_emb[torch.as_tensor(rows)], dim=1)
        weights.append(max_weight * sims.mean())
    return torch.stack(weights) if weights else torch.zeros(0)
