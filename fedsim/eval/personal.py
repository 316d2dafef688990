"""Personalized evaluation, reduced: each client's accuracy and loss on its local test split with the global adapter
alone and with its personal tensors, summarised over clients (mean, spread, worst 10%) and tabulated per client."""

from __future__ import annotations

from typing import Any

import numpy as np

CONFUSION = ("macro_f1", "mcc")  # the confusion metrics a client's row carries when the scenario asks for them


def _confusion_metrics(sums: dict, kind: str) -> dict[str, float]:
    """``{kind}_macro_f1`` and ``{kind}_mcc`` of one client's local test split, where its sums hold confusion counts
    (``eval.metrics`` names either)."""
    from fedsim.eval.metrics import MacroF1, Matthews

    if not any(k.startswith("confusion/") for k in sums):
        return {}
    return {f"{kind}_{m.name}": m.value(m.matrix(sums)) for m in (MacroF1(), Matthews())}


def personal_metrics(per_client: dict[int, tuple[dict, dict]], labels: dict[int, str] | None = None
                     ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean, standard deviation and worst-10% mean of per-client accuracy on local test splits, with the global
    adapter alone (``eval/local_global/*``) and with each client's personal tensors (``eval/personal/*``); plus
    one table row per client. ``labels``: each client's base precision (a column; and where quantization-aware
    adapters were measured, ``eval/qa/*`` overall and per bit width)."""
    table = []
    for cid in sorted(per_client):
        g, p = per_client[cid]
        row = {"client_id": cid, "num_local_test": int(g["count"]),
               "global_accuracy": g["correct"] / max(g["count"], 1.0),
               "global_loss": g["loss_sum"] / max(g["tokens"], 1.0),
               "personal_accuracy": p["correct"] / max(p["count"], 1.0),
               "personal_loss": p["loss_sum"] / max(p["tokens"], 1.0)}
        row.update(_confusion_metrics(g, "global"))
        row.update(_confusion_metrics(p, "personal"))
        if labels is not None:
            row["base"] = labels[cid]
        for k in ("qa_rel_error", "qa_corr"):
            if k in p:
                row[k] = p[k]
        if "dpa/weight_sum" in p:  # FedDPA-D: the mean instance-wise weight
            row["dynamic_weight"] = p["dpa/weight_sum"] / max(p["count"], 1.0)
        table.append(row)
    out: dict[str, float] = {}
    for kind, prefix in (("global", "eval/local_global"), ("personal", "eval/personal")):
        acc = np.array([r[f"{kind}_accuracy"] for r in table])
        worst = np.sort(acc)[: max(1, int(np.ceil(0.1 * len(acc))))]
        out.update({f"{prefix}/accuracy": float(acc.mean()), f"{prefix}/accuracy_std": float(acc.std()),
                    f"{prefix}/accuracy_worst10": float(worst.mean()),
                    f"{prefix}/loss": float(np.mean([r[f"{kind}_loss"] for r in table]))})
        for name in CONFUSION:
            if all(f"{kind}_{name}" in r for r in table):
                out[f"{prefix}/{name}"] = float(np.mean([r[f"{kind}_{name}"] for r in table]))
    if any("dynamic_weight" in r for r in table):
        out["eval/personal/dynamic_weight"] = float(np.mean([r["dynamic_weight"] for r in table
                                                             if "dynamic_weight" in r]))
    for k in ("qa_rel_error", "qa_corr"):
        # undefined (NaN) for an adapter still at zero, e.g. a client never trained with qa_init: zero
        rows = [r for r in table if k in r and np.isfinite(r[k])]
        if rows:
            out[f"eval/qa/{k.removeprefix('qa_')}"] = float(np.mean([r[k] for r in rows]))
            for label in sorted({r.get("base", "") for r in rows}):
                vals = [r[k] for r in rows if r.get("base", "") == label]
                out[f"eval/qa/{k.removeprefix('qa_')}/{label}"] = float(np.mean(vals))
    return out, table
