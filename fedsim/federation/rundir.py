"""The run directory: created fresh (or continued on resume) and locked while a run writes it; the rows of
``metrics.jsonl`` read back on resume; the tables written at the end."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fedsim.config import Scenario
from fedsim.errors import ScenarioError


def client_state_dir(scenario: Scenario, run_dir: Path) -> Path:
    """Where the client state store spills: ``<run dir>/client_state``, or with ``clients.state_dir`` set, a
    subdirectory of it named after the run (so that runs never share or delete each other's state)."""
    if scenario.clients.state_dir is None:
        return run_dir / "client_state"
    tag = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return Path(scenario.clients.state_dir).expanduser() / f"{Path(run_dir).name}-{tag}"


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




def rows_until(run_dir: Path, last_round: int) -> list[dict[str, Any]]:
    """Metrics rows up to ``last_round``; the file is rewritten without the rows of rounds that will re-run."""
    path = Path(run_dir) / "metrics.jsonl"
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
