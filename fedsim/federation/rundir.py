"""The run directory: created fresh (or continued on resume) and locked while a run writes it; the rows of
``metrics.jsonl`` read back on resume; the tables written at the end."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from fedsim.config import Scenario
from fedsim.errors import FedsimError, ScenarioError


def client_state_dir(scenario: Scenario, run_dir: Path) -> Path:
    """Where the client state store spills: ``<run dir>/client_state``, or with ``clients.state_dir`` set, a
    subdirectory of it named after the run (so that runs never share or delete each other's state)."""
    if scenario.clients.state_dir is None:
        return run_dir / "client_state"
    tag = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return Path(scenario.clients.state_dir).expanduser() / f"{Path(run_dir).name}-{tag}"


# what fedsim writes in a run directory (a run killed early may leave some of them behind, e.g. its scenario)
RUN_FILES = frozenset({
    "scenario.yaml", "metrics.jsonl", "metrics.tmp", "generations.jsonl", "generations.tmp", "summary.json", "partition.png", "partition.png.input.npz",
    "clients.csv", "personalized.csv", "adapter", "checkpoint", ".checkpoint.prev", ".checkpoint.tmp",
    ".checkpoint.old", ".checkpoint.damaged", "client_state", "wandb", ".wandb_run_id", ".wandb_last_step", ".lock", "export",
})


def _fedsims(name: str) -> bool:
    return name in RUN_FILES or name.startswith(("metrics.jsonl.orig", "partition.png.input."))


def _holds_a_run(path: Path) -> bool:
    """Whether ``path`` holds a run that got anywhere: rows in metrics.jsonl, or a checkpoint. An empty metrics.jsonl
    and no checkpoint is a run stopped before its first round (W&B could not start, say): its --out may be reused."""
    rows = path / "metrics.jsonl"
    if not rows.exists() and not rows.is_symlink():
        return False
    try:
        empty = rows.is_file() and not rows.is_symlink() and not rows.read_bytes().strip()
    except OSError:
        empty = False
    checkpointed = any((path / d).exists() for d in ("checkpoint", ".checkpoint.prev", ".checkpoint.tmp"))
    return not empty or checkpointed


def new_run_dir(scenario: Scenario, out: str | Path | None) -> Path:
    """``out`` if given — new, empty, or left by a run of fedsim's killed before its first round (never a finished
    run, nor a directory holding anything else) —, else a fresh ``runs/<name>[-k]``."""
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise ScenarioError("--out", f"{path} is a file, not a directory", "give a new or empty directory")
        if _holds_a_run(path):
            raise ScenarioError("--out", f"{path} already holds a run", "choose another --out directory")
        foreign = sorted(p.name for p in path.iterdir() if not _fedsims(p.name)) if path.is_dir() else []
        if foreign:
            raise ScenarioError("--out", f"{path} holds files fedsim did not write (e.g. {foreign[0]!r})",
                                "give a new or empty directory")
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


def check_no_links(run_dir: Path) -> None:
    """Refuse a run directory where a file fedsim writes is a symbolic link (writing would change its target).

    Raises:
        ScenarioError: naming the link.
    """
    for name in sorted(RUN_FILES):
        if (Path(run_dir) / name).is_symlink():
            raise ScenarioError("run directory", f"{Path(run_dir) / name} is a symbolic link; fedsim writes its own "
                                "files only, never through links", "remove the link, or choose another directory")


NOT_FINITE = "not_finite"  # a row's or the summary's key: which values were NaN or infinite (written as null)


def finite_json(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` as strict JSON can hold it: every NaN or infinite number (anywhere inside) written as null, and the
    keys that held one listed under ``not_finite`` with what they were (``{"eval/my_metric": "nan"}``) — JSON has no
    NaN or Infinity (Python writes them, strict parsers refuse the file), and a bare null would hide the cause."""
    found: dict[str, str] = {}

    def clean(v: Any, where: str) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            found[where] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{where}.{k}" if where else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return v

    out = clean(obj, "")
    if found:
        out[NOT_FINITE] = {**out.get(NOT_FINITE, {}), **found}
    return out


def dumps(obj: dict[str, Any], **kwargs: Any) -> str:
    """:func:`finite_json`, then ``json.dumps`` with ``allow_nan=False`` (what is written is valid JSON)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def append_text(path: Path, text: str) -> None:
    """Append to a file of the run directory, never through a link at ``path`` (``O_NOFOLLOW``: a link planted
    there is an error, its target untouched)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8", newline="") as f:
        f.write(text)


def write_text(path: Path, text: str) -> None:
    """Write a file of the run directory atomically, never through a link at ``path`` (the new file replaces the
    directory entry, link or not)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


class RunLock:
    """An exclusive lock on a run directory (``RUN_DIR/.lock``, holding the owner's pid), so that two runs — or a
    run and a resume — never write one directory at once. Released when the process ends, however it ends."""

    def __init__(self, run_dir: Path):
        import fcntl

        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        try:  # never through a symbolic link: a link planted as .lock would have its target truncated
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            why = "is a symbolic link" if self.path.is_symlink() else f"cannot be opened ({e.strerror})"
            raise ScenarioError("run directory", f"{self.path} {why}; fedsim writes its own files only",
                                "remove it, or choose another directory") from None
        self._file = os.fdopen(fd, "a+", encoding="utf-8")  # held for the run's lifetime
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
        self._inode = os.fstat(self._file.fileno()).st_ino

    def check(self) -> None:
        """That the run directory is still this run's: its ``.lock`` is the file this lock holds.

        Raises:
            FedsimError: the directory (or its lock) was deleted, moved or replaced while the run was writing it.
        """
        try:
            same = os.stat(self.path, follow_symlinks=False).st_ino == self._inode
        except OSError:
            same = False
        if not same:
            raise FedsimError(f"the run directory {self.run_dir} was deleted, moved or replaced while this run was "
                              "writing it; the run stops here rather than write a partial run elsewhere (restore the "
                              "directory and resume with `fedsim run --resume`, or start the run again)")

    def release(self) -> None:
        import fcntl

        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv
    import io

    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a ``metrics.jsonl`` that can be read — JSON objects with an integer ``round`` — and, for every
    line that cannot, ``"line N: why"``.

    Raises:
        ScenarioError: the path is not a regular file (a directory in its place, say).
    """
    if not path.exists():
        return [], []
    if not path.is_file():
        raise ScenarioError("--resume", f"{path} is not a file", "move it away, or remove it to resume without the "
                            "metrics of the rounds before the checkpoint")
    rows, bad = [], []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append(f"line {n}: not UTF-8")
            continue
        except json.JSONDecodeError as e:
            bad.append(f"line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("round"), int) or isinstance(row["round"], bool):
            bad.append(f"line {n}: not a round's row (a JSON object with an integer round)")
            continue
        rows.append(row)
    return rows, bad


def rows_until(run_dir: Path, last_round: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The readable metrics rows of rounds up to ``last_round``, and what could not be read; the file is rewritten
    with those rows only (the rounds after ``last_round`` run again). Nothing is lost: when some line could not be
    read, the file as it was is kept beside it (``metrics.jsonl.orig``, or ``.orig.2``, ...) and the lines are
    named in what is returned."""
    path = Path(run_dir) / "metrics.jsonl"
    rows, bad = read_rows(path)
    kept = [r for r in rows if r["round"] <= last_round]
    if bad:
        keep = path.with_name(path.name + ".orig")
        k = 1
        while keep.exists():
            k += 1
            keep = path.with_name(f"{path.name}.orig.{k}")
        os.replace(path, keep)
        bad = [*bad, f"the file as it was is kept in {keep}"]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))  # atomically, never through a link
    return kept, bad


def describe_unreadable(bad: list[str]) -> str:
    """One line about the lines :func:`rows_until` could not read (its last entry names where the file was kept)."""
    lines, kept = bad[:-1], bad[-1]
    shown = "; ".join(lines[:3]) + ("; ..." if len(lines) > 3 else "")
    return f"resume: {len(lines)} line(s) of metrics.jsonl could not be read and are left out ({shown}); {kept}"


def missing_rounds(rows: list[dict[str, Any]], last_round: int) -> list[int]:
    """The rounds 1..``last_round`` (done, checkpointed) that ``rows`` has no row for."""
    have = {int(r["round"]) for r in rows}
    return [r for r in range(1, last_round + 1) if r not in have]


def describe_missing(missing: list[int]) -> str:
    """One line about rounds done whose rows are gone (metrics.jsonl removed or cut): what the resumed run's totals
    and best accuracy then leave out."""
    spans, start = [], missing[0]
    for a, b in zip(missing, [*missing[1:], None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return (f"resume: metrics.jsonl has no rows for round(s) {', '.join(spans)}, which the checkpoint says were done: "
            "the communication totals and the best accuracy of summary.json leave those rounds out")
