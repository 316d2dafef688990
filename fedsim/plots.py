"""Figures written into run directories (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def partition_heatmap(hist: np.ndarray, group_names: list[str], path: Path, title: str) -> None:
    """Clients × groups heatmap of sample counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_clients, num_groups = hist.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * num_clients, 24), min(1.5 + 0.4 * num_groups, 12)))
    im = ax.imshow(hist.T, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("client")
    ax.set_ylabel("group")
    if group_names and num_groups <= 40:
        ax.set_yticks(range(num_groups))
        ax.set_yticklabels(group_names)
    if num_clients <= 50:
        ax.set_xticks(range(num_clients))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
