"""The round loop: sample → configure → run clients → aggregate → evaluate → log. No Ray imports here: the backend
decides where the server and the workers run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsim import checkpoint
from fedsim.client.evaluate import reduce_eval
from fedsim.client.store import ClientStateStore
from fedsim.config import Scenario, dump_scenario
from fedsim.data.datasets import TokenizedData, load_data, partition_field
from fedsim.data.partition import Partition, label_histogram, partition
from fedsim.errors import BackendError, ScenarioError, ServerLostError
from fedsim.export import save_peft_adapter
from fedsim.models.base import decoder_linear_shapes, target_shapes
from fedsim.models.quant import check_shapes, require_backend
from fedsim.progress import Progress
from fedsim.runtime.backend import Backend, make_backend
from fedsim.runtime.worker import ClientJob
from fedsim.sampling import dropped_out, sample_clients
from fedsim.strategies import StrategySpec, get_strategy_class
from fedsim.tracking import Tracker
from fedsim.types import ClientFailure, ClientSpec, LoraSpec, RoundContext


@dataclass
class Prepared:
    """Everything a run needs before the first round: data, partition and client specs."""

    scenario: Scenario
    data: TokenizedData
    parts: Partition
    clients: list[ClientSpec]
    spec: StrategySpec
    local_test: list[np.ndarray]  # per client, held-out indices of the training split (empty without any)


def prepare(scenario: Scenario) -> Prepared:
    """Load and tokenize data, partition it, build client specs and the strategy spec (no training).

    Raises:
        ScenarioError, DataError: anything that would make the run fail later.
    """
    data = load_data(scenario)
    n = len(data.train)
    groups = data.train.group if partition_field(scenario) and (data.train.group >= 0).all() else None
    parts = partition(scenario.partition, groups, n, scenario.clients.num_clients, scenario.seed)
    parts, local_test = split_local_test(parts, scenario.eval.local_test_fraction, scenario.seed)
    lcfg = scenario.clients.lora
    shapes = target_shapes(scenario.model)
    smallest = min(min(s.d_in, s.d_out) for s in shapes.values())
    if lcfg.max_rank() > smallest:
        raise ScenarioError("clients.lora", f"rank {lcfg.max_rank()} exceeds the smallest adapted dimension {smallest}",
                            f"use ranks ≤ {smallest}")
    assigned = lcfg.assign(len(parts), scenario.seed)
    qcfg = scenario.clients.quant
    if qcfg.is_quantized():
        layers = decoder_linear_shapes(scenario.model)
        for spec in qcfg.choices():
            check_shapes(spec, layers)
            require_backend(spec.backend)
    quants = qcfg.assign(len(parts), scenario.seed)
    speeds = scenario.clock.speeds(len(parts), scenario.seed, [q.bits for q in quants])
    clients = [ClientSpec(client_id=c, num_examples=len(p), lora=LoraSpec(rank=r, alpha=a, rslora=lcfg.rslora),
                          quant=q, speed=v)
               for c, (p, (r, a), q, v) in enumerate(zip(parts, assigned, quants, speeds))]
    # the global adapter's spec: the single one, or the largest rank of the mix
    top = max(clients, key=lambda c: (c.lora.rank, c.lora.alpha)).lora
    return Prepared(scenario, data, parts, clients, StrategySpec(shapes=shapes, lora=top, seed=scenario.seed),
                    local_test)


def split_local_test(parts: Partition, fraction: float, seed: int) -> tuple[Partition, list[np.ndarray]]:
    """Hold out ``fraction`` of each client's shard (at least one sample) as its local test split, seeded per client.

    Raises:
        ScenarioError: a client would keep no training sample.
    """
    if fraction <= 0:
        return parts, [np.empty(0, dtype=np.int64) for _ in parts]
    train, test = [], []
    for c, p in enumerate(parts):
        k = max(1, int(round(fraction * len(p))))
        if len(p) - k < 1:
            raise ScenarioError("eval.local_test_fraction", f"client {c} has {len(p)} sample(s): nothing would be "
                                "left to train on", "lower eval.local_test_fraction or raise partition.min_samples")
        perm = np.random.default_rng([seed, c, 17]).permutation(p)
        test.append(np.sort(perm[:k]))
        train.append(np.sort(perm[k:]))
    return train, test


def local_eval_clients(num_clients: int, limit: int | None, seed: int) -> list[int]:
    """The clients scored on their local test splits at each evaluation: all, or a fixed seeded subset of ``limit``
    (with thousands of registered clients, scoring every one each time costs more than the round)."""
    if limit is None or limit >= num_clients:
        return list(range(num_clients))
    return sorted(int(c) for c in np.random.default_rng([seed, 29]).choice(num_clients, size=limit, replace=False))


def client_state_dir(scenario: Scenario, run_dir: Path) -> Path:
    """Where the client state store spills: ``<run dir>/client_state``, or with ``clients.state_dir`` set, a
    subdirectory of it named after the run (so that runs never share or delete each other's state)."""
    if scenario.clients.state_dir is None:
        return run_dir / "client_state"
    tag = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return Path(scenario.clients.state_dir).expanduser() / f"{Path(run_dir).name}-{tag}"


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


def partition_table(prep: Prepared) -> tuple[np.ndarray, list[str]]:
    """Per-client histogram over the partition field's groups (or one column of counts)."""
    groups = prep.data.train.group
    names = prep.data.group_names
    if not names or (groups < 0).any():
        return np.array([[len(p)] for p in prep.parts], dtype=np.int64), ["samples"]
    return label_histogram(prep.parts, groups, len(names)), names


def new_run_dir(scenario: Scenario, out: str | Path | None) -> Path:
    """``out`` if given (it must not hold a finished run), else a fresh ``runs/<name>[-k]``."""
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ScenarioError("--out", f"{path} is a file, not a directory", "give a new or empty directory")
        if (path / "metrics.jsonl").exists():
            raise ScenarioError("--out", f"{path} already holds a run", "choose another --out directory")
    else:
        base = Path("runs") / scenario.name  # the name's schema keeps it a single component other than . and ..
        path, k = base, 1
        while path.exists():
            k += 1
            path = base.with_name(f"{scenario.name}-{k}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScenarioError("--out", f"cannot create {path}: {e.strerror or e}", "give a writable directory") from None
    return path


class RunLock:
    """An exclusive lock on a run directory (``RUN_DIR/.lock``, holding the owner's pid), so that two runs — or a
    run and a resume — never write one directory at once. Released when the process ends, however it ends."""

    def __init__(self, run_dir: Path):
        import fcntl

        self.path = Path(run_dir) / ".lock"
        self._file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ScenarioError("run directory", f"{run_dir} is in use by another fedsim run (pid {holder})",
                                "wait for it to finish, or stop it, or choose another directory") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        import fcntl

        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


class Driver:
    """Runs a scenario end to end and writes the run directory.

    Args:
        scenario: the validated scenario.
        run_dir: where outputs go: a new or empty directory (``runs/<name>`` if None); with ``resume``, the run
            directory to continue.
        backend: a backend instance (default: the one the scenario names).
    """

    def __init__(self, scenario: Scenario, run_dir: Path | None = None, backend: Backend | None = None,
                 resume: bool = False, previous: bool = False, allow_changed: tuple[str, ...] = ()):
        self.scenario = scenario
        self.allow_changed = tuple(allow_changed)  # keys a resume may see changed (checkpoint.CHANGEABLE)
        self.run_dir = Path(run_dir) if resume else new_run_dir(scenario, run_dir)
        self.previous = previous  # resume from the checkpoint before the newest one
        self.backend = backend or make_backend(scenario)
        self.resume = resume
        self.rows: list[dict[str, Any]] = []
        self.notes: set[str] = set()  # what the run's log has said once (e.g. why clients were not packed)

    def _rows_until(self, last_round: int) -> list[dict[str, Any]]:
        """Metrics rows up to ``last_round``; the file is rewritten without the rows of rounds that will re-run."""
        path = self.run_dir / "metrics.jsonl"
        rows = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by the kill
                if row.get("round", 1 << 30) <= last_round:
                    rows.append(row)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
        return rows

    def _eval_batches(self, data: TokenizedData) -> list[np.ndarray]:
        n, bs = len(data.test), self.scenario.eval.batch_size
        return [np.arange(s, min(s + bs, n)) for s in range(0, n, bs)]

    def run(self) -> dict[str, Any]:
        """Run every round; return the summary (also written to ``summary.json``).

        Raises:
            ScenarioError: another run holds the run directory (its pid is named), or the checkpoint is unusable.
            BackendError: the runtime failed, e.g. the server actor died (saying which checkpoint to resume from).
        """
        lock = RunLock(self.run_dir)
        try:
            t_start = time.perf_counter()
            self.backend.launch(self.scenario)  # Ray's workers start up while the data is prepared
            t_start = min(t_start, getattr(self.backend, "launched_at", t_start))  # started early by `fedsim run`
            return self._run(t_start)
        except ServerLostError as e:
            last = checkpoint.last_round(self.run_dir)
            then = (f"the checkpoint of round {last} is intact in {self.run_dir / checkpoint.DIRNAME}: continue with "
                    f"`fedsim run --resume {self.run_dir}`" if last else
                    f"no checkpoint was written yet: run the scenario again (the metrics so far are in "
                    f"{self.run_dir / 'metrics.jsonl'})")
            raise BackendError(f"{e}. {then[0].upper()}{then[1:]} (if it was killed for memory, sample fewer clients "
                               "per round or give the node more memory)") from None
        finally:
            self.backend.shutdown()
            lock.release()

    def _run(self, t_start: float) -> dict[str, Any]:
        sc = self.scenario
        prep = prepare(sc)
        provenance = checkpoint.provenance(sc)
        start_round, restored, used = 0, None, None  # used: the checkpoint directory resumed from
        if self.resume and checkpoint.exists(self.run_dir):
            start_round, state, strategy_state, used = checkpoint.load(self.run_dir, previous=self.previous)
            checkpoint.check_resume(used, sc, self.allow_changed)
            if not 1 <= start_round <= sc.rounds:
                raise ScenarioError("--resume", f"{used / 'meta.json'} says round "
                                    f"{start_round}, but the run has rounds 1..{sc.rounds}: the checkpoint does not "
                                    "belong to this run", "resume the run directory that wrote it, or start anew")
            restored = (state, strategy_state)
            self.rows = self._rows_until(start_round)
            self.notes = {n for row in self.rows for n in row.get("notes", ())}
        elif self.resume:  # killed before its first checkpoint: nothing to keep but the scenario
            self._rows_until(-1)
        else:
            (self.run_dir / "scenario.yaml").write_text(dump_scenario(sc), encoding="utf-8")
            hist, names = partition_table(prep)
            from fedsim.plots import partition_heatmap_in_background

            heatmap_done = partition_heatmap_in_background(  # drawn while the workers start, outside the driver
                hist, names, self.run_dir / "partition.png",
                f"{sc.name}: {sc.partition.method} split over {len(prep.parts)} clients")
        store = None
        if get_strategy_class(sc.strategy.name).has_personal_state:
            store_dir = client_state_dir(sc, self.run_dir)
            if self.resume:
                checkpoint.restore_client_state(used, store_dir)
            else:  # this run's own directory: nothing in it can belong to anything else
                shutil.rmtree(store_dir, ignore_errors=True)
            store = ClientStateStore.open(store_dir, int(sc.clients.state_budget_mb * 2**20))
        personal_table: list[dict[str, Any]] = []
        progress = Progress(sc.logging.progress if sc.logging.console else "off", sc.rounds)
        tracker = Tracker(sc, self.run_dir, resume=self.resume)
        try:
            server = self.backend.start(sc, prep.data, prep.spec)
            if not self.resume:
                heatmap_done()
                tracker.image("partition", self.run_dir / "partition.png")
            batches = self._eval_batches(prep.data)
            totals = {"comm/up_params": 0.0, "comm/down_params": 0.0, "comm/up_bytes": 0.0, "comm/down_bytes": 0.0}
            base_version = 0
            if restored is not None:
                server.set_state(*restored)
                deltas = server.base_deltas(since=0)
                if deltas:  # fresh workers rebuild the merged base
                    self.backend.sync_base(deltas)
                    base_version = deltas[-1][0]
                for row in self.rows:
                    for key in totals:
                        totals[key] = row.get(key.replace("comm/", "comm/total_"), totals[key])
                progress.message(f"resumed {self.run_dir} after round {start_round}")
            elif sc.eval.at_start:
                row = {"round": 0, "time_s": 0.0, **reduce_eval(self.backend.evaluate(server.eval_handle(), batches))}
                self._log(row, tracker, progress)
            k = sc.clients.num_per_round()
            all_failed = 0  # consecutive rounds in which no client succeeded
            eval_clients = local_eval_clients(len(prep.clients), sc.eval.local_clients, sc.seed)
            sim_total = self.rows[-1].get("time/sim_total_s", 0.0) if self.rows else 0.0  # carried over on resume
            sizes = [c.num_examples for c in prep.clients] if sc.clients.sampling == "size" else None
            for r in range(start_round + 1, sc.rounds + 1):
                t0 = time.perf_counter()
                ctx = RoundContext(server_round=r, num_rounds=sc.rounds, seed=sc.seed)
                sampled = sample_clients(sc.clients.num_clients, k, sc.seed, r, sizes=sizes,
                                         availability=sc.clients.availability)
                handles, down = server.configure(ctx, [prep.clients[c] for c in sampled])
                gone = dropped_out(sampled, sc.clients.dropout, sc.seed, r)  # they downloaded, then vanished
                jobs = [(ClientJob(prep.clients[c], prep.parts[c], r, personal=store.get(c) if store else None),
                         handles[c]) for c in sampled if c not in gone]
                progress.start_round(r, len(jobs))
                t_train = time.perf_counter()
                replaced_before = self.backend.num_replaced
                outcomes = self.backend.train(
                    jobs, on_done=lambda res: progress.client_done(isinstance(res, ClientFailure)))
                ok = [(res, h) for res, h in outcomes if not isinstance(res, ClientFailure)]
                failed = [res for res, _ in outcomes if isinstance(res, ClientFailure)]
                attempted = len(jobs)
                failed += [ClientFailure(c, "dropped out during the round (clients.dropout)") for c in sorted(gone)]
                # the simulated clock: each client's compute and transfers; past the deadline, a straggler
                sim = {res.client_id: sc.clock.client_time(res.metrics.get("train/steps", 0.0), prep.clients[
                    res.client_id].speed, down[res.client_id][1], res.metrics.get("client/up_bytes", 0.0))
                    for res, _ in ok}
                late = {c for c, t in sim.items() if sc.clock.deadline_s is not None and t > sc.clock.deadline_s}
                failed += [ClientFailure(c, f"missed the round deadline: simulated {sim[c]:.1f} s > "
                                            f"clock.deadline_s {sc.clock.deadline_s:g}") for c in sorted(late)]
                ok = [(res, h) for res, h in ok if res.client_id not in late]
                sim_round = max(sim.values(), default=0.0)
                if late:
                    sim_round = sc.clock.deadline_s
                sim_total += sim_round
                t_agg = time.perf_counter()
                up = server.aggregate(ctx, [h for _, h in ok])
                if up["rejected"]:  # invalid updates count as failed clients, with their reason
                    failed += [ClientFailure(cid, why) for cid, why in sorted(up["rejected"].items())]
                    ok = [(res, h) for res, h in ok if res.client_id not in up["rejected"]]
                if store is not None:  # personal tensors stay with their client, in the client state store
                    for res, _ in ok:
                        if res.personal is not None:
                            store.put(res.client_id, res.personal)
                deltas = server.base_deltas(since=base_version)
                if deltas:  # strategies that merge into the base (FLoRA, FedEx-LoRA): every worker applies it once
                    self.backend.sync_base(deltas)
                    base_version = deltas[-1][0]
                row = self._round_row(r, ok, failed, up, down, sampled)
                for note in sorted({res.note for res, _ in ok if res.note} - self.notes):  # each once per run
                    self.notes.add(note)
                    row.setdefault("notes", []).append(note)
                    progress.message(f"note: {note}")
                row["clients/dropped"] = len(gone)
                row["clients/worker"] = {str(res.client_id): res.worker for res, _ in ok}  # JSONL only
                row.update({"clients/late": len(late), "time/sim_round_s": sim_round, "time/sim_total_s": sim_total})
                row["workers/replaced"] = self.backend.num_replaced - replaced_before
                row["time/train_s"] = t_agg - t_train
                row["time/aggregate_s"] = time.perf_counter() - t_agg
                for key in totals:
                    totals[key] += row[key]
                    row[key.replace("comm/", "comm/total_")] = totals[key]
                row["time/fit_s"] = time.perf_counter() - t0  # sample + configure + train + aggregate
                if r % sc.eval.every == 0 or r == sc.rounds:
                    t_eval = time.perf_counter()
                    eval_handle = server.eval_handle()
                    row.update(reduce_eval(self.backend.evaluate(eval_handle, batches)))
                    if any(len(t) for t in prep.local_test):
                        items = [(c, store.get(c) if store else None, prep.local_test[c], prep.clients[c].quant,
                                  prep.parts[c]) for c in eval_clients]
                        metrics, personal_table = personal_metrics(
                            self.backend.evaluate_clients(eval_handle, items),
                            {c.client_id: c.quant.label for c in prep.clients})
                        row.update(metrics)
                    row["time/eval_s"] = time.perf_counter() - t_eval
                row["time_s"] = time.perf_counter() - t0
                self._log(row, tracker, progress)
                all_failed = all_failed + 1 if attempted and not ok and not late else 0  # not simulated absences
                if sc.resources.max_failed_rounds and all_failed >= sc.resources.max_failed_rounds:
                    real = [f for f in failed if f.client_id not in gone]
                    reasons = Counter(f.reason.split(":", 1)[0] for f in real).most_common(1)
                    example = next(f for f in real if f.reason.startswith(reasons[0][0]))
                    raise BackendError(
                        f"every sampled client failed in {all_failed} consecutive rounds (up to round {r}), e.g. "
                        f"client {example.client_id}: {example.reason}; the metrics so far are in "
                        f"{self.run_dir / 'metrics.jsonl'}. Fix the cause, or raise resources.max_failed_rounds "
                        "(0 never stops)")
                if r % sc.checkpoint.every == 0 or r == sc.rounds:
                    if store is not None:
                        store.flush()
                    checkpoint.save(self.run_dir, r, *server.get_state(),
                                    client_state=store.directory if store is not None else None,
                                    provenance=provenance)
            adapter = server.global_adapter()
            summary = self._summary(time.perf_counter() - t_start, totals)  # reads the workers' statistics
            self.backend.shutdown()  # their memory is freed before PEFT is imported here to write the adapter
            save_peft_adapter(adapter, sc, self.run_dir / "adapter")
            base_mb = {k.removeprefix("memory/base_mb/"): v for k, v in summary.items()
                       if k.startswith("memory/base_mb/")}
            if personal_table:
                for row in personal_table:
                    row["base_mb"] = base_mb.get(row.get("base"))
                write_csv(self.run_dir / "personalized.csv", personal_table)
            clients_table = [
                {"client_id": c.client_id, "num_examples": c.num_examples, "rank": c.lora.rank,
                 "alpha": c.lora.alpha, "base": c.quant.label, "base_mb": base_mb.get(c.quant.label)}
                for c in prep.clients]
            write_csv(self.run_dir / "clients.csv", clients_table)
            tracker.summary(summary)
            tracker.tables({"clients": clients_table, "personalized": personal_table})
            tracker.artifact(re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{sc.name}-adapter"), "model", self.run_dir / "adapter",
                             {"strategy": sc.strategy.name, "base_model": sc.model.name, "rounds": sc.rounds})
            if self.notes:
                summary["notes"] = sorted(self.notes)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
            return summary
        finally:
            progress.close()
            tracker.close()

    def _round_row(self, r: int, ok: list, failed: list, up: dict, down: dict, sampled: list[int]) -> dict[str, Any]:
        n_ok = sum(res.num_examples for res, _ in ok)
        loss = (sum(res.metrics["train/loss"] * res.num_examples for res, _ in ok) / n_ok) if n_ok else math.nan
        row: dict[str, Any] = {
            "round": r, "train/loss": loss,
            "clients/sampled": len(sampled), "clients/succeeded": len(ok), "clients/failed": len(failed),
            "comm/up_params": up["comm/up_params"], "comm/up_bytes": up["comm/up_bytes"],
            # a client that failed still downloaded its payload
            "comm/down_params": float(sum(down[c][0] for c in sampled)),
            "comm/down_bytes": float(sum(down[c][1] for c in sampled)),
            "train/client_time_s": float(np.mean([res.metrics["client/time_s"] for res, _ in ok])) if ok else math.nan,
            # clients trained together in one pass over the base (resources.clients_per_pass), mean over clients
            "train/clients_per_pass": float(np.mean([res.metrics.get("train/clients_per_pass", 1.0)
                                                     for res, _ in ok])) if ok else math.nan,
        }
        if n_ok:  # the procedure's own metrics (e.g. pf2lora/hvp_norm, personal/loss), example-weighted means
            extra = set.intersection(*(set(res.metrics) for res, _ in ok)) - set(row) - {"train/time_s"}
            for key in sorted(k for k in extra if k.startswith(("train/", "personal/", "pf2lora/", "reg/"))):
                row[key] = sum(res.metrics[key] * res.num_examples for res, _ in ok) / n_ok
        # per client: [up params, up bytes, down params, down bytes] (JSONL only; W&B gets the numeric totals)
        row["comm/per_client"] = {str(c): up.get("per_client_up", {}).get(c, [0, 0]) + list(down[c]) for c in sampled}
        if failed:
            row["clients/failures"] = [f"{f.client_id}: {f.reason}" for f in failed]
        if not sampled:
            row["note"] = "no client was available this round (clients.availability); the global state is unchanged"
        elif not ok:
            row["note"] = "every sampled client failed; the global state is unchanged"
        return row

    def _log(self, row: dict[str, Any], tracker: Tracker, progress: Progress) -> None:
        self.rows.append(row)
        tracker.log(row)
        progress.end_round(row)

    def _summary(self, total_s: float, totals: dict[str, float]) -> dict[str, Any]:
        evals = [r for r in self.rows if "eval/accuracy" in r]
        final = evals[-1] if evals else {}
        workers = self.backend.worker_stats()
        return {
            "name": self.scenario.name, "rounds": self.scenario.rounds, "run_dir": str(self.run_dir),
            "time_s": total_s,
            "initial/eval/accuracy": evals[0]["eval/accuracy"] if evals else None,
            "final/eval/accuracy": final.get("eval/accuracy"), "final/eval/loss": final.get("eval/loss"),
            "best/eval/accuracy": max((r["eval/accuracy"] for r in evals), default=None),
            **{f"final/{k}": v for k, v in final.items()
               if k.startswith(("eval/task/", "eval/personal/", "eval/local_global/", "eval/qa/"))},
            **{k.replace("comm/", "comm/total_"): v for k, v in totals.items()},
            "time/sim_total_s": next((r["time/sim_total_s"] for r in reversed(self.rows) if "time/sim_total_s" in r),
                                     0.0),
            **{f"memory/base_mb/{label}": b / 2**20 for w in workers for label, b in w.get("base_bytes", {}).items()},
            "workers": workers,
        }


def run_scenario(scenario: Scenario, out: str | Path | None = None, backend: Backend | None = None) -> dict[str, Any]:
    """Run ``scenario`` and write its run directory (``runs/<name>`` or ``out``). Returns the summary."""
    return Driver(scenario, out, backend).run()


def resume_run(run_dir: str | Path, backend: Backend | None = None, previous: bool = False,
               allow_changed: tuple[str, ...] = ()) -> dict[str, Any]:
    """Continue an interrupted run from its last checkpoint, with the scenario saved in ``run_dir`` (refused when it
    or the data files differ from those the checkpoint was computed from, but for the ``allow_changed`` keys).

    Raises:
        ScenarioError: ``run_dir`` holds no scenario or no checkpoint.
    """
    from fedsim.config import load_scenario

    path = Path(run_dir)
    if not (path / "scenario.yaml").is_file():
        raise ScenarioError("--resume", f"{path} holds no scenario.yaml", "give a run directory written by `fedsim run`")
    return Driver(load_scenario(path / "scenario.yaml"), path, backend, resume=True, previous=previous,
                  allow_changed=allow_changed).run()
