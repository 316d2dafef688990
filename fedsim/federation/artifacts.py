"""What a run leaves behind when it ends: the summary, the global adapter in PEFT's format, the per-client tables
(``clients.csv``, ``personalized.csv``), W&B's summary, tables and adapter artifact, and ``summary.json``."""

from __future__ import annotations

import fnmatch
import logging
import re
from pathlib import Path
from typing import Any

from fedsim.config import Scenario
from fedsim.config.privacy import sample_rate
from fedsim.federation.rundir import dumps, write_csv, write_text
from fedsim.models.adapter_io import save_peft_adapter
from fedsim.plots import curves_in_child
from fedsim.tracking import run_name
from fedsim.types import ClientSpec

log = logging.getLogger(__name__)


def run_summary(scenario: Scenario, run_dir: Path, rows: list[dict[str, Any]], total_s: float,
                totals: dict[str, float], workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The run in one mapping: initial, final and best accuracy, the final per-task and personalized metrics,
    communication totals, the simulated time, the bases' sizes and the workers' counters."""
    evals = [r for r in rows if "eval/accuracy" in r]
    final = evals[-1] if evals else {}
    extra = [k for m in metric_objects(scenario) for k in m.keys]  # eval.metrics' keys (``*``: a task name)
    return {
        "name": scenario.name, "rounds": scenario.rounds, "run_dir": str(run_dir), "time_s": total_s,
        # the evaluation before training (round 0); None without one (eval.at_start off, or its row lost)
        "initial/eval/accuracy": next((r["eval/accuracy"] for r in evals if r["round"] == 0), None),
        "final/eval/accuracy": final.get("eval/accuracy"), "final/eval/loss": final.get("eval/loss"),
        "best/eval/accuracy": max((r["eval/accuracy"] for r in evals), default=None),
        **{f"final/{k}": v for k, v in final.items()
           if k.startswith(("eval/task/", "eval/personal/", "eval/local_global/", "eval/qa/", "harness/"))
           or any(fnmatch.fnmatchcase(k, pattern) for pattern in extra)},
        **{k.replace("comm/", "comm/total_"): v for k, v in totals.items()},
        "time/sim_total_s": next((r["time/sim_total_s"] for r in reversed(rows) if "time/sim_total_s" in r), 0.0),
        **{f"memory/base_mb/{label}": b / 2**20 for w in workers for label, b in w.get("base_bytes", {}).items()},
        "workers": workers,
        **({"privacy": privacy_summary(scenario, rows)} if scenario.privacy is not None else {}),
    }


def privacy_summary(scenario: Scenario, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the run spent: ε at δ after its last round, and the mechanism's settings (σ as solved)."""
    p = scenario.privacy
    last = next((r for r in reversed(rows) if "privacy/epsilon" in r), {})
    return {"mode": p.mode, "epsilon": last.get("privacy/epsilon"), "delta": p.delta_for(scenario.clients.num_clients),
            "noise_multiplier": last.get("privacy/noise_multiplier"), "accountant": p.accountant,
            "sample_rate": 1.0 if p.mode == "local" else sample_rate(scenario.clients),
            "clipping_norm": last.get("privacy/clipping_norm", p.clipping_norm), "adaptive": p.adaptive is not None}


def metric_objects(scenario: Scenario) -> tuple:
    """The scenario's ``eval.metrics`` (none named: nothing to import)."""
    if not scenario.eval.metrics:
        return ()
    from fedsim.eval.catalog import run_metrics

    return run_metrics(scenario.eval.metrics)


def write_tokenizer(scenario: Scenario, task: Any, path: Path) -> None:
    """The tokenizer beside an exported model, as inference must use it: a causal LM's gives for ``tokenizer(prompt)``
    what the simulator trained on (special tokens in front, nothing appended:
    :func:`~fedsim.models.tokenizer.for_inference`); a conversation's carries the chat template training used."""
    from fedsim.models.tokenizer import for_inference

    tokenizer = task.tokenizer(scenario.model)
    if not task.encodes_inputs:
        tokenizer = for_inference(tokenizer)
    if scenario.data.format == "chat":  # inference renders conversations as training did
        from fedsim.data.formats.chat import chat_template

        tokenizer.chat_template = chat_template(scenario.data, tokenizer)
    tokenizer.save_pretrained(str(path))


def write_artifacts(scenario: Scenario, run_dir: Path, summary: dict[str, Any], adapter: Any,
                    clients: list[ClientSpec], personal_table: list[dict[str, Any]], tracker: Any,
                    task: Any) -> None:
    """The adapter, the tables, W&B's summary, tables and artifact, then ``summary.json`` (last: its presence says
    the run finished)."""
    save_peft_adapter(adapter, scenario, run_dir / "adapter", task)
    write_tokenizer(scenario, task, run_dir / "adapter")
    base_mb = {k.removeprefix("memory/base_mb/"): v for k, v in summary.items() if k.startswith("memory/base_mb/")}
    if personal_table:
        for row in personal_table:
            row["base_mb"] = base_mb.get(row.get("base"))
        write_csv(run_dir / "personalized.csv", personal_table)
    clients_table = [{"client_id": c.client_id, "num_examples": c.num_examples, "rank": c.lora.rank,
                      "alpha": c.lora.alpha, "base": c.quant.label, "base_mb": base_mb.get(c.quant.label)}
                     for c in clients]
    write_csv(run_dir / "clients.csv", clients_table)
    steps = (("summary", lambda: tracker.summary(summary)),
             ("tables", lambda: tracker.tables({"clients": clients_table, "personalized": personal_table})),
             ("adapter", lambda: tracker.artifact(artifact_name(run_name(scenario)), "model", run_dir / "adapter",
                                                 {"strategy": scenario.strategy.name,
                                                  "base_model": scenario.model.name, "rounds": scenario.rounds})))
    for what, step in steps:  # each on its own: one failing (a full disk, an unwritable directory) costs only itself,
        try:  # never the run's summary.json
            step()
        except Exception as e:  # noqa: BLE001 - wandb raises many types
            who, e = (e.who, e.__cause__ or e) if hasattr(e, "who") else ("W&B", e)  # another tracker: SinkFailed
            note = f"{who} could not record the run's {what} ({e.__class__.__name__}: {e})".splitlines()[0]
            summary["notes"] = sorted({*summary.get("notes", []), note})
            log.warning("%s", note)  # said on the console too, not only in summary.json
    if scenario.logging.plots:
        try:  # a figure that cannot be drawn (a full disk, a broken matplotlib) must not cost the run its summary
            curves_in_child(run_dir)
        except OSError as e:
            summary["notes"] = sorted({*summary.get("notes", []), str(e).splitlines()[0]})
    write_text(run_dir / "summary.json", dumps(summary, indent=2))


def artifact_name(run: str) -> str:
    """The adapter artifact's W&B name: ``<run>-adapter`` in the characters W&B allows, at most 128 of them (W&B's
    limit: a run named after a long ``--set`` lost its summary, tables and artifact) — a long one is cut and keeps a
    digest of the whole, so that two runs stay two artifacts."""
    import hashlib

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{run}-adapter")
    if len(name) <= 128:
        return name
    return f"{name[:110]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}-adapter"
