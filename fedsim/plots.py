"""Figures written into run directories (matplotlib, Agg backend, imported lazily).

This file runs on its own too (``python fedsim/plots.py INPUT.npz``, without importing the fedsim package): a run's
driver draws its partition heatmap in such a child process, so that matplotlib and the rendered figure (~45 MB)
never sit in the driver's memory while the workers train.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
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


def partition_heatmap_in_background(hist: np.ndarray, group_names: list[str], path: Path,
                                    title: str) -> Callable[[], None]:
    """Start drawing :func:`partition_heatmap` in a child process; return a function that waits for it.

    Raises (from the returned function):
        OSError: the child could not write ``path`` (its last line of error output is the message).
    """
    spec = path.with_name(path.name + ".input.npz")
    meta = json.dumps({"names": list(group_names), "path": str(path), "title": title}).encode()
    np.savez(spec, hist=hist, meta=np.frombuffer(meta, dtype=np.uint8))
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(spec)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)

    def wait() -> None:
        _, err = child.communicate()
        spec.unlink(missing_ok=True)
        if child.returncode != 0:
            lines = [x for x in (err or "").strip().splitlines() if x.strip()]
            raise OSError(f"drawing {path} failed: {lines[-1] if lines else f'exit status {child.returncode}'}")

    return wait


def _draw_from_file(spec: str) -> None:
    with np.load(spec, allow_pickle=False) as z:
        hist, meta = z["hist"], json.loads(bytes(z["meta"]).decode())
    Path(spec).unlink()
    partition_heatmap(hist, meta["names"], Path(meta["path"]), meta["title"])


if __name__ == "__main__":
    _draw_from_file(sys.argv[1])
