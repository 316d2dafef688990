"""Figures written into run and sweep directories (matplotlib, Agg backend, imported lazily).

This file runs on its own too (``python fedsim/plots.py INPUT.npz`` or ``python fedsim/plots.py --curves RUN_DIR``,
without importing the fedsim package): a run's driver draws its partition heatmap and its curves in such a child
process, so that matplotlib and the rendered figures (~45 MB) never sit in the driver's memory.

- :func:`draw_runs`: per round, accuracy and loss, per-task accuracy, cumulative communication, time split into
  train / aggregate / evaluate (and ε when the runs have differential privacy) — one run (``curves.png``) or several
  overlaid (``fedsim plot RUN_DIR RUN_DIR ...``).
- :func:`draw_sweep`: a sweep's final values against its first key (mean ± std over seeds) and every point's curves.
"""

from __future__ import annotations

import itertools
import json
import os
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


_CALLS = itertools.count()


def partition_heatmap_in_background(hist: np.ndarray, group_names: list[str], path: Path,
                                    title: str) -> Callable[[], None]:
    """Start drawing :func:`partition_heatmap` in a child process; return a function that waits for it.

    Raises (from the returned function):
        OSError: the child could not write ``path`` (its last line of error output is the message).
    """
    # a name of its own per call: a child still reading an earlier run's (a run that failed at start, on a busy
    # machine) deleted the next run's input at one shared name
    spec = path.with_name(f"{path.name}.input.{os.getpid()}-{next(_CALLS)}.npz")
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


def read_rows(run_dir: Path) -> list[dict]:
    """A run's ``metrics.jsonl`` rows (a torn last line, from a killed run, is skipped)."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def draw_runs(runs: list[tuple[str, list[dict]]], path: Path, title: str = "") -> None:
    """Per-round curves of one or more runs, each run a colour (see the module's docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    private = any("privacy/epsilon" in r for _, rows in runs for r in rows)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several = len(runs) > 1
    for i, (label, rows) in enumerate(runs):
        c = colors[i % len(colors)]
        ax[0].plot(*_series(rows, "eval/accuracy"), marker="o", ms=3, color=c, label=label)
        ax[1].plot(*_series(rows, "eval/loss"), color=c, label=f"{label} eval" if several else "eval")
        ax[1].plot(*_series(rows, "train/loss"), color=c, ls="--", label=f"{label} train" if several else "train")
        tasks = sorted({k for r in rows for k in r if k.startswith("eval/task/") and k.endswith("/accuracy")})
        for j, key in enumerate(tasks):
            name = key.removeprefix("eval/task/").removesuffix("/accuracy")
            ax[2].plot(*_series(rows, key), color=c if several else colors[j % len(colors)],
                       ls=["-", "--", ":", "-."][j % 4] if several else "-",
                       label=f"{label} {name}" if several else name)
        rr = [r for r in rows if r.get("round", 0) >= 1]
        comm = [(r.get("comm/total_up_params", 0.0) + r.get("comm/total_down_params", 0.0)) / 1e6 for r in rr]
        ax[3].plot([r["round"] for r in rr], comm, color=c, label=label)
        if several:
            ax[4].plot(*_series(rows, "time/fit_s"), color=c, label=f"{label} train + aggregate")
            ax[4].plot(*_series(rows, "time/eval_s"), color=c, ls=":", label=f"{label} evaluate")
        else:
            _time_bars(ax[4], rr)
        if private:
            ax[5].plot(*_series(rows, "privacy/epsilon"), color=c, label=label)
    titles = ("eval accuracy", "loss", "per-task eval accuracy", "cumulative communication (M params, up + down)",
              "time per round (s)", "privacy spent ε" if private else "")
    from matplotlib.ticker import MaxNLocator

    for a, t in zip(ax, titles):
        a.set_title(t)
        a.set_xlabel("round")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        if a.lines or a.patches:
            a.legend(fontsize=7)
    if not private:
        ax[5].axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _time_bars(ax, rows: list[dict]) -> None:
    """One run's time per round as stacked bars: training, aggregation, evaluation."""
    xs = [r["round"] for r in rows]
    bottom = np.zeros(len(rows))
    for key, label in (("time/train_s", "train"), ("time/aggregate_s", "aggregate"), ("time/eval_s", "evaluate")):
        ys = np.array([float(r.get(key) or 0.0) for r in rows])
        ax.bar(xs, ys, bottom=bottom, label=label)
        bottom += ys


def draw_sweep(rows: list[dict], keys: list[str], curves: dict[str, list[list[dict]]], path: Path) -> None:
    """A sweep: final accuracy, round time and communication against the first swept key (a line per value of the
    others; mean ± std over seeds as error bars), and each point's eval accuracy and loss per round (mean over seeds,
    the band ± std). ``rows``: ``sweep_runs.csv``'s rows (one per run); ``curves``: point label → its runs' rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, others = keys[0], keys[1:]
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.5))
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r[k]) for k in others), {}).setdefault(str(r[x_key]), []).append(r)
    for group, by_x in groups.items():
        label = ", ".join(f"{k}={v}" for k, v in zip(others, group)) or None
        xs = list(by_x)
        for ax, metric, t in zip(axes, ("final_accuracy", "round_time_s", "comm_params"),
                                 ("final eval accuracy", "round time (s, median)", "communication (params)")):
            vals = [[float(r[metric]) for r in by_x[x]] for x in xs]
            ax.errorbar(xs, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], marker="o", capsize=3,
                        label=label)
            ax.set_xlabel(x_key)
            ax.set_title(t)
            ax.grid(alpha=0.3)
    for point, runs in curves.items():
        for ax, key in zip(axes[3:], ("eval/accuracy", "eval/loss")):
            series = [dict(zip(*_series(r, key))) for r in runs]
            rounds = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not rounds:
                continue
            vals = np.array([[s[x] for x in rounds] for s in series])
            mean, std = vals.mean(axis=0), vals.std(axis=0)
            ax.plot(rounds, mean, label=point)
            ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
            ax.set_title(f"{key} per round (mean ± std over seeds)")
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_in_child(run_dir: Path) -> Path:
    """Draw ``run_dir/curves.png`` in a child process (matplotlib stays out of the driver).

    Raises:
        OSError: the child failed (its last line of error output is the message).
    """
    path = Path(run_dir) / "curves.png"
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--curves", str(run_dir)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        lines = [x for x in (done.stderr or "").strip().splitlines() if x.strip()]
        raise OSError(f"drawing {path} failed: {lines[-1] if lines else f'exit status {done.returncode}'}")
    return path


def _draw_from_file(spec: str) -> None:
    with np.load(spec, allow_pickle=False) as z:
        hist, meta = z["hist"], json.loads(bytes(z["meta"]).decode())
    Path(spec).unlink()
    partition_heatmap(hist, meta["names"], Path(meta["path"]), meta["title"])


if __name__ == "__main__":
    if sys.argv[1] == "--curves":
        run = Path(sys.argv[2])
        draw_runs([(run.name, read_rows(run))], run / "curves.png", title=run.name)
    else:
        _draw_from_file(sys.argv[1])
