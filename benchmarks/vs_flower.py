"""fedsim against Flower's simulation engine on the same federated LoRA workload, side by side in one run.

Workload (benchmarks/overhead.py's): the tiny model, LoRA r=8 on its seven projections, 100 clients × 5 local steps
of 8 × 64 tokens, every client every round, FedAvg / FedIT, 3 rounds, 2 workers of 1 CPU (1 thread) each, one
evaluation of the global model after the last round, the final adapter saved.

- fedsim: ``fedsim run scenario.yaml`` (the command a user types; embedded defaults otherwise: local Ray, W&B off,
  one client per pass), and the same with ``--set resources.clients_per_pass=auto`` (fedsim's packed clients: K
  clients per forward/backward pass over one base, exact; docs/packing.md).
- Flower: benchmarks/flower_app.py — a ServerApp (FedAvg) and a ClientApp written with Flower's Message API, run by
  ``flwr.simulation.run_simulation`` in a virtual environment of its own (Flower pins its own Ray), created on first
  use under ``$FEDSIM_CACHE_DIR/flower-venv`` with the same torch / transformers / PEFT versions as this one. Its
  best case: each Ray actor builds the PEFT model once and keeps it, and loads the data once.

Both train on the same tokenized samples and the same partition; the tokenization is done before either is timed
(fedsim reads its cache, Flower a .npz file). Each side runs ``--repeats`` times, alternating which goes first.

Printed and saved (medians over the repeats): the steady round (rounds 2.. : configure → train → aggregate), the
whole run (from launching the command to its exit), the peak RSS and PSS summed over each process tree (the command
and every process it starts: Ray's GCS, raylet, workers; RSS sampled every 100 ms from /proc/PID/statm, PSS once a
second from smaps_rollup, whose page-table walk stalls the sampled process), and the ratios fedsim / Flower. Targets (issue #13): steady ≤ 0.75, whole run ≤ 0.6, peak RSS ≤ 0.75.

Usage: python benchmarks/vs_flower.py [--repeats 3] [--clients 100] [--rounds 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import overhead

FLOWER = "flwr[simulation]==1.42.0"
HERE = Path(__file__).resolve().parent
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------------------------------------------------------
# Flower's environment


def flower_venv() -> Path:
    from fedsim.paths import cache_dir

    return Path(os.environ.get("FEDSIM_FLOWER_VENV", cache_dir() / "flower-venv"))


def pinned() -> list[str]:
    """The training stack of this environment, pinned, so that both sides run the same kernels."""
    import peft
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"peft=={peft.__version__}"]


def ensure_flower(venv: Path) -> Path:
    """The Flower environment's python, created (a few minutes, once) if it is missing or holds other versions."""
    python = venv / "bin" / "python"
    want = pinned() + [FLOWER.replace("[simulation]", "")]
    probe = ("import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in "
             "('torch', 'transformers', 'peft', 'flwr', 'ray')))")
    if python.exists():
        have = subprocess.run([str(python), "-c", probe], capture_output=True, text=True).stdout.split()
        if all(any(h.split("+")[0] == w for h in have) for w in want):
            return python
    print(f"creating Flower's environment in {venv} ({FLOWER}, {', '.join(pinned())}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [pinned()[0]], check=True)  # torch first: a bare requirement would pull a CUDA build
    subprocess.run(pip + [FLOWER] + pinned(), check=True)
    return python


# ---------------------------------------------------------------------------------------------------------------
# memory of a process tree, from /proc


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def _proc_rss(pid: int) -> tuple[str, int] | None:
    """(name, RSS kB) of one process, or None if it is gone: /proc/PID/statm, which costs the process nothing."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE_KB
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    return cmd[:60], rss


def _proc_pss(pid: int) -> int:
    """PSS kB of one process (0 if it is gone): /proc/PID/smaps_rollup walks the process's page tables under its
    memory lock, which stalls the process — read it sparingly."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the summed RSS of a process and all its descendants every ``every_s`` until stopped, and their summed
    PSS every ``pss_every_s``; keeps the peaks and the processes at the RSS peak.

    RSS comes from statm (free for the sampled processes). PSS needs smaps_rollup, whose page-table walk stalls the
    process it reads: sampled every 100 ms it slowed fedsim's rounds by ~20% (4.6 → 3.8 s) and its whole run by
    ~3.5 s, and Flower's likewise, so PSS is read once a second (its peak may be missed by up to a second's growth).
    """

    def __init__(self, root: int, every_s: float = 0.1, pss_every_s: float = 1.0):
        super().__init__(daemon=True)
        self.root, self.every_s, self.pss_every_s = root, every_s, pss_every_s
        self.peak_rss, self.peak_pss = 0, 0
        self.at_peak_rss: list[tuple[str, int, int]] = []
        self.stop = threading.Event()

    def _tree(self) -> list[int]:
        kids = _children()
        todo, pids = [self.root], []
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(kids.get(pid, ()))
        return pids

    def run(self) -> None:
        next_pss = time.monotonic() + self.pss_every_s
        while not self.stop.is_set():
            pids = self._tree()
            procs = [(pid, m) for pid in pids if (m := _proc_rss(pid)) is not None]
            rss = sum(m[1] for _, m in procs)
            if rss > self.peak_rss:
                self.peak_rss, self.at_peak_rss = rss, sorted(((m[0], m[1], 0) for _, m in procs),
                                                              key=lambda p: -p[1])
            if time.monotonic() >= next_pss:
                self.peak_pss = max(self.peak_pss, sum(_proc_pss(pid) for pid, _ in procs))
                next_pss = time.monotonic() + self.pss_every_s
            self.stop.wait(self.every_s)


def timed(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``cmd``; its wall time from launch to exit and its process tree's peak memory."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=HERE.parent)
        mem = TreeMemory(proc.pid)
        mem.start()
        rc = proc.wait()
    wall = time.perf_counter() - t0
    mem.stop.set()
    mem.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); its output is in {log}:\n{log.read_text()[-3000:]}")
    return {"whole_s": wall, "peak_rss_mb": mem.peak_rss / 1024, "peak_pss_mb": mem.peak_pss / 1024,
            "at_peak": [(name, round(rss / 1024)) for name, rss, _ in mem.at_peak_rss]}


# ---------------------------------------------------------------------------------------------------------------
# the two sides


def prepare(work: Path, clients: int, rounds: int) -> tuple[Path, Path]:
    """Write the data and fedsim's scenario; tokenize and partition through fedsim (warming its cache) and hand the
    same samples and partition to Flower."""
    import numpy as np
    import yaml

    from fedsim.client.batching import collate
    from fedsim.config import scenario_from_dict
    from fedsim.driver import prepare as fedsim_prepare
    from fedsim.models.base import tiny_config

    data = work / "data.jsonl"
    overhead.write_data(data, max(2000, clients * overhead.BATCH * 2))
    raw = overhead.scenario_dict(str(data), clients, rounds)
    raw["logging"]["console"] = True  # what a user sees (and pays for): the progress display
    scenario_file = work / "scenario.yaml"
    scenario_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    sc = scenario_from_dict(raw)
    prep = fedsim_prepare(sc)
    train = collate(prep.data.train, np.arange(len(prep.data.train)), prep.data.pad_id)
    test = collate(prep.data.test, np.arange(len(prep.data.test)), prep.data.pad_id)
    sizes = [len(p) for p in prep.parts]
    npz = work / "flower_data.npz"
    np.savez(npz, ids=train["input_ids"].numpy(), labels=train["labels"].numpy(),
             indices=np.concatenate(prep.parts), bounds=np.cumsum(sizes)[:-1],
             test_ids=test["input_ids"].numpy(), test_labels=test["labels"].numpy())
    settings = {
        "clients": clients, "rounds": rounds, "workers": raw["resources"]["num_workers"], "seed": 0,
        "lr": raw["training"]["lr"], "steps": overhead.STEPS, "batch": overhead.BATCH,
        "max_grad_norm": sc.training.max_grad_norm, "eval_batch": raw["eval"]["batch_size"], "data": str(npz),
        "out": str(work / "flower"),
        "model": {"llama": tiny_config(sc.model).to_dict(), "init_seed": sc.model.tiny.init_seed,
                  "rank": overhead.RANK, "alpha": 16, "target_modules": list(sc.model.target_modules)},
    }
    (work / "flower").mkdir()
    settings_file = work / "flower_settings.json"
    settings_file.write_text(json.dumps(settings))
    return scenario_file, settings_file


PACKED = ["--set", "resources.clients_per_pass=auto"]


def run_fedsim(scenario: Path, work: Path, i: int, extra: list[str]) -> dict:
    tag = f"{'packed' if extra else 'fedsim'}-{i}"
    run_dir = work / f"run-{tag}"
    fedsim = Path(sys.executable).parent / "fedsim"
    out = timed([str(fedsim), "run", str(scenario), "--out", str(run_dir), *extra], dict(os.environ),
                work / f"{tag}.log")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["round"] >= 1]
    out["round_s"] = [r["time/fit_s"] for r in rows]
    out["eval_loss"] = rows[-1].get("eval/loss")
    return out


def run_flower(python: Path, settings: Path, work: Path, i: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["PYTHONPATH"] = str(HERE)  # flower_app is imported by name, in the driver and in every Ray actor
    out = timed([str(python), "-c", f"import flower_app; flower_app.launch({str(settings)!r})"], env,
                work / f"flower-{i}.log")
    rounds = json.loads((work / "flower" / "flower_rounds.json").read_text())
    if max(rounds["builds"]) > 1.0 + 1e-9:
        raise SystemExit(f"Flower's actors rebuilt the model ({rounds['builds']} builds per client's actor): the "
                         "benchmark would not measure Flower's best case")
    out.update(round_s=rounds["round_s"], eval_loss=rounds["eval_loss"])
    return out


# ---------------------------------------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    steady = [statistics.median(r["round_s"][1:]) for r in runs]
    return {"steady_s": statistics.median(steady), "round1_s": statistics.median(r["round_s"][0] for r in runs),
            "whole_s": statistics.median(r["whole_s"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "peak_pss_mb": statistics.median(r["peak_pss_mb"] for r in runs),
            "eval_loss": statistics.median(r["eval_loss"] for r in runs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="a suffix for the result files (e.g. _before)")
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be ≥ 2 (the steady round is the median of rounds 2..)")
    python = ensure_flower(flower_venv())
    versions = subprocess.run([str(python), "-c", "import flwr, ray; print(flwr.__version__, ray.__version__)"],
                              capture_output=True, text=True, check=True).stdout.split()
    import ray

    with tempfile.TemporaryDirectory(prefix="vs-flower-") as tmp:
        work = Path(tmp)
        scenario, settings = prepare(work, args.clients, args.rounds)
        runs: dict[str, list[dict]] = {"fedsim": [], "packed": [], "flower": []}
        for i in range(args.repeats):
            order = list(runs) if i % 2 == 0 else list(reversed(runs))
            for name in order:
                if name == "flower":
                    out = run_flower(python, settings, work, i)
                else:
                    out = run_fedsim(scenario, work, i, PACKED if name == "packed" else [])
                runs[name].append(out)
                print(f"repeat {i + 1}/{args.repeats} {name}: whole {out['whole_s']:.1f} s, rounds "
                      f"{', '.join(f'{t:.2f}' for t in out['round_s'])} s, peak RSS {out['peak_rss_mb']:.0f} MB",
                      flush=True)
    summary = {name: summarize(r) for name, r in runs.items()}
    w = summary["flower"]
    keys = ("steady_s", "round1_s", "whole_s", "peak_rss_mb", "peak_pss_mb")
    ratio = {name: {k: summary[name][k] / w[k] for k in keys} for name in ("fedsim", "packed")}
    target = {"steady_s": 0.75, "whole_s": 0.6, "peak_rss_mb": 0.75}

    def cell(name: str, k: str) -> str:
        r = ratio[name][k]
        mark = f" {'✓' if r <= target[k] else '✗'}" if k in target else ""
        return f"**{r:.2f}**{mark}" if k in target else f"{r:.2f}"

    def top(run: dict) -> str:
        return "; ".join(f"{name or '?'} {rss} MB" for name, rss in run["at_peak"][:7])

    def per_run(name: str) -> str:
        return ", ".join(f"{r['whole_s']:.1f}/{statistics.median(r['round_s'][1:]):.2f}/{r['peak_rss_mb']:.0f}"
                         for r in runs[name])

    rows = [("steady round, median of rounds 2.. (s)", "steady_s", ".2f"), ("round 1 (s)", "round1_s", ".2f"),
            ("whole run, launch to exit (s)", "whole_s", ".1f"),
            ("peak RSS of the process tree (MB)", "peak_rss_mb", ".0f"),
            ("peak PSS of the process tree, sampled each second (MB)", "peak_pss_mb", ".0f")]
    lines = [
        "# fedsim vs Flower's simulation engine (benchmarks/vs_flower.py)",
        "",
        f"command: python benchmarks/vs_flower.py --repeats {args.repeats} --clients {args.clients} "
        f"--rounds {args.rounds}",
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; fedsim on Ray "
        f"{ray.__version__}; Flower {versions[0]} on Ray {versions[1]} (its own venv); {', '.join(pinned())} on both",
        f"workload: {args.clients} clients × {overhead.STEPS} steps of {overhead.BATCH} × {overhead.SEQ} tokens, "
        f"every client every round, {args.rounds} rounds, 2 workers (1 CPU, 1 thread each), tiny model, LoRA "
        f"r={overhead.RANK} on 7 projections, FedAvg; one evaluation after the last round; medians of "
        f"{args.repeats} runs each, order rotated between repeats",
        "",
        "| | fedsim | fedsim, clients_per_pass: auto | Flower | fedsim / Flower | packed fedsim / Flower | target |",
        "|---|---|---|---|---|---|---|",
        *[f"| {label} | {summary['fedsim'][k]:{fmt}} | {summary['packed'][k]:{fmt}} | {w[k]:{fmt}} | "
          f"{cell('fedsim', k)} | {cell('packed', k)} | {('≤ ' + str(target[k])) if k in target else ''} |"
          for label, k, fmt in rows],
        f"| final eval loss | {summary['fedsim']['eval_loss']:.4f} | {summary['packed']['eval_loss']:.4f} | "
        f"{w['eval_loss']:.4f} | | | |",
        "",
        "RSS counts shared pages (shared libraries, the Ray object store) once per process that maps them; PSS "
        "splits them between those processes (PSS is sampled once a second: reading it stalls the process read). "
        "The eval losses differ between fedsim and Flower because their "
        "batch schedules differ (same data, same partition, same model and optimizer).",
        "",
        f"fedsim processes at its peak RSS (last run): {top(runs['fedsim'][-1])}",
        f"Flower processes at its peak RSS (last run): {top(runs['flower'][-1])}",
        "",
        f"per run (whole s / steady s / peak RSS MB): fedsim {per_run('fedsim')}; packed {per_run('packed')}; "
        f"Flower {per_run('flower')}",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"vs_flower{args.tag}.md").write_text(text + "\n")
    (out / f"vs_flower{args.tag}.json").write_text(json.dumps(
        {"runs": runs, "summary": summary, "ratio": ratio,
         "flower_version": versions[0], "flower_ray": versions[1], "clients": args.clients, "rounds": args.rounds},
        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
