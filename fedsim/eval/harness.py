"""Benchmarks through EleutherAI's lm-evaluation-harness (``eval.harness``), on the model in memory.

A worker wraps the model it holds — the global adapter on the base, or a client's own model — in lm-eval's ``HFLM``
(``pretrained=`` the PEFT model, with the run's tokenizer) and calls ``lm_eval.simple_evaluate`` with the scenario's
tasks: registered lm-eval task names, or tasks of your own in YAML files under ``include_path`` (a local JSON-lines
file is enough: ``dataset_path: json``, ``dataset_kwargs: {data_files: {test: ...}}``). The numbers are lm-eval's own:
running lm-eval on ``fedsim export``'s adapter gives the same (tested).
"""

from __future__ import annotations

import math
import re
from typing import Any

from fedsim.config.training import HarnessConfig
from fedsim.errors import ScenarioError


def run_harness(model: Any, tokenizer: Any, cfg: HarnessConfig, seed: int) -> dict[str, float]:
    """``simple_evaluate`` on ``model``: ``{"<task>/<metric>[_<filter>]": value}`` for every numeric result."""
    from fedsim.boot import allow_pyarrow

    allow_pyarrow()  # lm-eval reads its tasks with datasets, which needs pyarrow (kept out of Ray's processes)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from fedsim.models.base import set_training

    set_training(model, False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    manager = task_manager(TaskManager, cfg)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit, task_manager=manager,
        log_samples=False, bootstrap_iters=0, apply_chat_template=cfg.apply_chat_template, verbosity="ERROR",
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    return flatten(out["results"] if out else {})


_MANAGERS: dict[tuple[str | None, bool], Any] = {}  # per process: indexing lm-eval's own tasks takes seconds


def task_manager(cls: Any, cfg: HarnessConfig) -> Any:
    """lm-eval's TaskManager for the scenario's tasks: over ``include_path`` alone when it holds every task (indexing
    lm-eval's thousands of built-in task files takes ~7 s), else with the built-ins too; built once per process."""
    if cfg.include_path:
        key = (cfg.include_path, False)
        if key not in _MANAGERS:
            _MANAGERS[key] = cls(include_path=cfg.include_path, include_defaults=False)
        if all(t in _MANAGERS[key].all_tasks for t in cfg.tasks):
            return _MANAGERS[key]
    key = (cfg.include_path, True)
    if key not in _MANAGERS:
        _MANAGERS[key] = cls(include_path=cfg.include_path) if cfg.include_path else cls()
    return _MANAGERS[key]


def check_tasks(cfg: HarnessConfig) -> None:
    """Every task named exists (in ``include_path`` or lm-eval's own index).

    Raises:
        ScenarioError: naming the unknown tasks and close matches.
    """
    import difflib

    from fedsim.boot import allow_pyarrow

    allow_pyarrow()
    from lm_eval.tasks import TaskManager

    known = set(task_manager(TaskManager, cfg).all_tasks)
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        near = sorted({m for t in unknown for m in difflib.get_close_matches(t, known, n=3)})
        raise ScenarioError("eval.harness.tasks", f"lm-eval has no task(s) {unknown}"
                            + (f" (close: {', '.join(near)})" if near else ""),
                            "name lm-eval tasks (`lm-eval ls tasks`) or put your task YAML in eval.harness.include_path")


def flatten(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` → ``{"<task>/<metric>": value}``: numbers only (no stderr, no names), the filter
    appended when it is not ``none`` (``exact_match,strict-match`` → ``exact_match_strict-match``)."""
    flat = {}
    for task, metrics in sorted(results.items()):
        for key, value in metrics.items():
            if "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key in ("sample_len", "sample_count"):
                continue
            name, _, filt = key.partition(",")
            if filt and filt != "none":
                name = f"{name}_{re.sub(r'[^A-Za-z0-9_.-]+', '-', filt)}"
            if isinstance(value, float) and not math.isfinite(value):
                continue
            flat[f"{task}/{name}"] = float(value)
    return flat
