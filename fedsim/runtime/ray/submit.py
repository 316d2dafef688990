"""``fedsim submit``: a scenario as a Ray job on a cluster, through the dashboard's job API.

The job runs ``python -m fedsim run`` (no PATH lookup of a ``fedsim`` script) with the current directory as its
working directory — the scenario, local data and, from a checkout, the fedsim sources travel with it (``.git``,
``.venv``, ``runs`` and caches excluded); it joins the cluster (``resources.address=auto``) and writes its run
directory where ``--out`` says, as an absolute path: a directory the cluster can write (shared storage), never Ray's
temporary copy of the working directory.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from fedsim.errors import BackendError, ScenarioError

EXCLUDES = [".git", ".venv", "runs", "wandb", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]
PACKAGE_LIMIT = 500 * 2**20  # Ray's limit on a working_dir package (GCS storage)


def package_size(root: Path, excludes: list[str] = EXCLUDES) -> tuple[int, list[tuple[int, str]]]:
    """Bytes of ``root`` that would travel (files under excluded names left out), and the largest top-level entries."""
    import fnmatch

    def skip(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in excludes)

    per_top: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not skip(d)]
        rel = Path(dirpath).relative_to(root)
        top = rel.parts[0] if rel.parts else None
        for f in filenames:
            if skip(f):
                continue
            try:
                size = (Path(dirpath) / f).stat().st_size
            except OSError:
                continue
            key = top or f
            per_top[key] = per_top.get(key, 0) + size
    return sum(per_top.values()), sorted(((b, k) for k, b in per_top.items()), reverse=True)[:3]


# the job's first step, in the job's Python: one line, not a traceback, when it cannot run fedsim (a head whose PATH
# gives the system python: "No module named 'ray'")
PRELUDE = """import importlib.util, sys
missing = [m for m in ("ray", "torch", "fedsim") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: the job's Python ({sys.executable}) has no {', '.join(missing)}: give fedsim submit --python "
             "the interpreter that runs Ray on the cluster's head (with fedsim's dependencies installed)")"""


def default_python(address: str) -> str:
    """The job's interpreter when --python is not given: this one for a cluster on this machine (its head runs
    from it, as a rule), else ``python`` on the head's PATH."""
    from urllib.parse import urlparse

    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return sys.executable if host in ("127.0.0.1", "localhost", "::1") else "python"


def entrypoint(python: str, args: list[str]) -> str:
    """The job's shell command: the :data:`PRELUDE` check, then fedsim."""
    return f"{shlex.quote(python)} -c {shlex.quote(PRELUDE)} && {shlex.join([python, *args])}"


def submit(scenario: str, address: str, overrides: list[str], out: str | None, python: str | None = None,
           wait: bool = True) -> int:
    """Submit the job; with ``wait``, print its logs as they come and return 0 if it succeeded, else 2.

    Raises:
        ScenarioError: the scenario is invalid or outside the working directory, or the directory is too large.
        BackendError: the cluster's job API cannot be reached.
    """
    from fedsim.config import load_scenario
    from fedsim.runtime.ray.pool import token_auth

    root = Path.cwd()
    path = Path(scenario).resolve()
    if not path.is_relative_to(root):
        raise ScenarioError("scenario", f"{scenario} is outside the working directory {root}, which is what travels "
                            "with the job", "run fedsim submit from a directory that holds the scenario")
    if not any(o.split("=", 1)[0].strip() == "resources.address" for o in overrides):
        overrides = [*overrides, "resources.address=auto"]  # the job joins the cluster it runs on
    sc = load_scenario(path, overrides)  # bad input fails here, not on the cluster
    size, largest = package_size(root)
    if size > PACKAGE_LIMIT:
        top = ", ".join(f"{name} ({b / 2**20:.0f} MiB)" for b, name in largest)
        raise ScenarioError("working directory", f"{root} would send {size / 2**20:.0f} MiB with the job, above Ray's "
                            f"{PACKAGE_LIMIT / 2**20:.0f} MiB limit; the largest entries: {top}",
                            "move data the cluster can read elsewhere (point data.source at shared storage) or run "
                            "from a smaller directory")
    target = Path(out).resolve() if out else (root / "runs" / sc.name).resolve()
    python = python or default_python(address)
    args = ["-m", "fedsim", "run", str(path.relative_to(root)), "--out", str(target)]
    for o in overrides:
        args += ["--set", o]
    token_auth()
    try:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)
        job = client.submit_job(entrypoint=entrypoint(python, args),
                                runtime_env={"working_dir": str(root), "excludes": EXCLUDES})
    except ImportError:
        raise BackendError("job submission needs Ray's dashboard client: pip install 'fedsim[cluster]'") from None
    except Exception as e:  # noqa: BLE001 - connection errors of several libraries
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise BackendError(f"cannot submit to the Ray cluster at {address!r} ({first}); check the dashboard's "
                           "address (http://HEAD:8265, `ray start --head --include-dashboard=true`) and, with "
                           "token authentication, the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN") \
            from None
    print(f"submitted {job}: {shlex.join(args)} with {python}; the run directory will be {target}", flush=True)
    if not wait:
        return 0
    return _follow(client, job)


def _follow(client, job: str, poll_s: float = 1.0) -> int:
    """Print the job's new log lines until it ends; 0 if it succeeded, else 2."""
    shown = 0
    while True:
        status = client.get_job_status(job)
        logs = client.get_job_logs(job)
        if len(logs) > shown:
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status.is_terminal():
            print(f"job {job}: {status.value}", flush=True)
            return 0 if status.value == "SUCCEEDED" else 2
        time.sleep(poll_s)
