"""A round's row of ``metrics.jsonl``: what trained and failed, communication (per round and cumulative), the
clients' declared metrics as example-weighted means, the simulated clock, and the time spent."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from fedsim.federation.rounds import RoundResult

COMM = ("comm/up_params", "comm/down_params", "comm/up_bytes", "comm/down_bytes")


def round_row(result: RoundResult, totals: dict[str, float], sim_before: float, t0: float) -> dict[str, Any]:
    """The round's row before evaluation: what trained and failed, communication (``totals``: the cumulative
    counts, carried forward), the clients' declared metrics, the simulated clock (``sim_before``: its total before
    the round) and the time spent since ``t0`` (the driver adds the run's notes and the evaluation)."""
    row = _training(result)
    row["clients/dropped"] = len(result.gone)
    row["clients/worker"] = {str(res.client_id): res.worker for res, _ in result.ok}  # JSONL only
    row.update({"clients/late": result.late, "time/sim_round_s": result.sim_round_s,
                "time/sim_total_s": sim_before + result.sim_round_s})
    row["workers/replaced"] = result.replaced
    row["time/train_s"] = result.times["train_s"]
    row["time/aggregate_s"] = time.perf_counter() - result.times["t_agg"]
    add_totals(row, totals)
    row["time/fit_s"] = time.perf_counter() - t0  # sample + configure + train + aggregate
    return row


def _training(result: RoundResult) -> dict[str, Any]:
    """The row's training part: the clients, their uploads and downloads, their metrics, the stages'."""
    ok, failed, up, down, sampled = result.ok, result.failed, result.up, result.down, result.sampled
    n_ok = sum(res.num_examples for res, _ in ok)
    loss = (sum(res.metrics["train/loss"] * res.num_examples for res, _ in ok) / n_ok) if n_ok else math.nan
    row: dict[str, Any] = {
        "round": result.server_round, "train/loss": loss,
        "clients/sampled": len(sampled), "clients/succeeded": len(ok), "clients/failed": len(failed),
        "comm/up_params": up.up_params, "comm/up_bytes": up.up_bytes,
        # a client that failed still downloaded its payload
        "comm/down_params": float(sum(down[c][0] for c in sampled)),
        "comm/down_bytes": float(sum(down[c][1] for c in sampled)),
        "train/client_time_s": float(np.mean([res.metrics["client/time_s"] for res, _ in ok])) if ok else math.nan,
        # clients trained together in one pass over the base (resources.clients_per_pass), mean over clients
        "train/clients_per_pass": client_mean(ok, "train/clients_per_pass"),
        # clients a worker trained in the same call (resources.clients_per_call, or a pack), mean over clients
        "engine/clients_per_call": client_mean(ok, "engine/clients_per_call"),
    }
    # what the simulator itself moved into the server: every update, or the workers' partials (worker_partials)
    row.update({"engine/server_in_bytes": up.server_in_bytes, "engine/server_in_objects": up.server_in_objects})
    row.update(client_means(ok, n_ok, exclude=set(row)))
    row.update(up.stage_metrics)
    # per client: [up params, up bytes, down params, down bytes] (JSONL only; W&B gets the numeric totals)
    # (an asynchronous step: the clients that started in it and those that arrived, each with what it moved in it)
    movers = [*sampled, *sorted(set(up.per_client_up) - set(sampled))]
    row["comm/per_client"] = {str(c): up.per_client_up.get(c, [0, 0]) + list(down.get(c, (0, 0))) for c in movers}
    if any("malicious/attacked" in res.metrics for res, _ in ok):  # clients.malicious: who attacked this round
        # (an attacker whose update was rejected is among the failures)
        row["malicious/clients"] = sorted(res.client_id for res, _ in ok if res.metrics["malicious/attacked"])
    if failed:
        row["clients/failures"] = [f"{f.client_id}: {f.reason}" for f in failed]
    if not sampled:
        row["note"] = "no client was available this round (clients.availability); the global state is unchanged"
    elif not ok:
        row["note"] = "every sampled client failed; the global state is unchanged"
    return row


def client_mean(ok: list, key: str) -> float:
    """The plain mean over the round's clients of a count each reports (1 where one does not); NaN without any."""
    return float(np.mean([res.metrics.get(key, 1.0) for res, _ in ok])) if ok else math.nan


def client_means(ok: list, n_ok: int, exclude: set[str]) -> dict[str, float]:
    """Example-weighted means of the metrics every aggregated client logged (each component declares which of its
    metrics are logged: the recipe's ``train/*``, a procedure's ``personal/*`` or ``pf2lora/*``, an objective's
    ``reg/*``)."""
    if not n_ok:
        return {}
    keys = set.intersection(*(set(res.logged) & set(res.metrics) for res, _ in ok)) - exclude
    return {k: sum(res.metrics[k] * res.num_examples for res, _ in ok) / n_ok for k in sorted(keys)}


def add_totals(row: dict[str, Any], totals: dict[str, float]) -> None:
    """Cumulative communication (``comm/total_*``), carried in ``totals`` from round to round."""
    for key in totals:
        totals[key] += row[key]
        row[key.replace("comm/", "comm/total_")] = totals[key]


def totals_from(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The cumulative communication after the last of ``rows`` (zero without rows)."""
    totals = dict.fromkeys(COMM, 0.0)
    for row in rows:
        for key in totals:
            totals[key] = row.get(key.replace("comm/", "comm/total_"), totals[key])
    return totals
