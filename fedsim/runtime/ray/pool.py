"""Start Ray and the pool of worker actors — without importing torch in the driver.

The ``fedsim`` command starts the pool as soon as the scenario is validated (:func:`launch_early`, with the strategy
checks left for later), so that the workers import torch, transformers and PEFT while the driver imports torch and
validates and prepares in its turn; :class:`~fedsim.runtime.ray.backend.RayBackend` adopts that pool
(:func:`take_early`) or starts its own (:func:`launch_pool`). The actors' class is :mod:`fedsim.runtime.ray.actors`.

A local Ray head is started lean: without the autoscaler monitor (one machine: nothing to scale), without the API
server unless ``resources.dashboard`` (without the dashboard it serves only usage statistics, which fedsim turns
off), and in a quiet command-line run without the log monitor (what the workers print is then library chatter;
``--verbose`` keeps it). Each holds ~80 MB, and starting them costs ~1 s of the start-up on two cores. This uses Ray's
private start-up classes; a Ray without them starts in full and :func:`stop_unused_ray_processes` stops the three.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedsim.errors import BackendError
from fedsim.runtime.ray.actors import remote_worker_class

if TYPE_CHECKING:
    from fedsim.config import Scenario

log = logging.getLogger(__name__)


def ray_temp_dir() -> str:
    """Ray's session directory: ``$FEDSIM_RAY_TMPDIR`` or a short per-user path under the system temp dir (Ray's
    socket paths must stay under ~107 characters)."""
    return os.environ.get("FEDSIM_RAY_TMPDIR", os.path.join(tempfile.gettempdir(), f"fedsim-ray-{os.getuid()}"))


def unused_ray_processes(res: Any) -> list[str]:
    """What a local head would start that this run does not use (see the module's docstring)."""
    from fedsim.quiet import worker_output_wanted

    return ["monitor"] + ([] if res.dashboard else ["dashboard"]) + ([] if worker_output_wanted() else ["log_monitor"])


@contextlib.contextmanager
def _lean_head(skip: list[str]) -> Iterator[None]:
    """While Ray starts a local head, leave out the processes in ``skip``; a Ray without these hooks starts in full."""
    try:
        from ray._private.node import Node
        from ray._private.parameter import RayParams

        init0, api0 = RayParams.__init__, Node.start_api_server
    except (ImportError, AttributeError) as e:
        log.debug("Ray starts in full (%s)", e)
        yield
        return

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        init0(self, *args, **kwargs)
        if "monitor" in skip:
            self.no_monitor = True
        if "log_monitor" in skip:
            self.include_log_monitor = False

    def start_api_server(self: Any, *, include_dashboard: Any, raise_on_failure: bool) -> None:
        if "dashboard" not in skip:
            return api0(self, include_dashboard=include_dashboard, raise_on_failure=raise_on_failure)
        self._webui_url = None  # as Ray's minimal install: no API server, no dashboard URL

    RayParams.__init__, Node.start_api_server = init, start_api_server
    # without the dashboard, the node's dashboard agent runs as on Ray's minimal install (`--minimal`), also where
    # ray[default] is installed (fedsim[cluster]): its full module set costs every local start seconds
    from ray._private import utils as ray_utils

    dep0 = ray_utils.get_dashboard_dependency_error
    if "dashboard" in skip:
        ray_utils.get_dashboard_dependency_error = lambda: "not used by this run (fedsim)"
    try:
        yield
    finally:
        RayParams.__init__, Node.start_api_server = init0, api0
        ray_utils.get_dashboard_dependency_error = dep0


@contextlib.contextmanager
def _without_pyarrow() -> Iterator[None]:
    """Ray's serialization context imports pyarrow (for Ray Data, which fedsim does not use: ~36 MB): keep it out of
    this process while Ray connects; ``datasets`` can still import it later."""
    from fedsim.boot import allow_pyarrow, hide_pyarrow

    hidden = hide_pyarrow()
    try:
        yield
    finally:
        if hidden:
            allow_pyarrow()


def placement() -> Any:
    """Where a run's actors go: into the placement group the run itself runs in (a Ray Tune trial's, which reserved
    the run's workers: they never wait on another trial's), else SPREAD — on a cluster, workers go to different nodes
    first (on one machine it changes nothing)."""
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = get_current_placement_group()
    if group is None:
        return "SPREAD"
    return PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)


def _local_instance(res: Any, runs: int, pyarrow: bool, driver_cpus: float) -> dict[str, Any]:
    """``ray.init``'s arguments for a local instance with room for ``runs`` runs."""
    # Logical CPUs: enough for the pool and the server even on a 2-core machine (threads are pinned per worker).
    need_cpus = runs * (sum(c for _, c, _ in res.slots()) + res.server.num_cpus + driver_cpus)
    kwargs: dict[str, Any] = {"num_cpus": max(os.cpu_count() or 1, int(-(-need_cpus // 1)))}
    need_gpus = runs * (sum(g for _, _, g in res.slots()) + res.server.num_gpus)
    if need_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            log.warning("no CUDA device: the %.2f GPUs requested are logical only; training runs on CPU", need_gpus)
            kwargs["num_gpus"] = int(-(-need_gpus // 1))
    kwargs["_temp_dir"] = ray_temp_dir()
    # pyarrow stays out of the workers; and they run at the driver's priority: Ray starts workers at nice 15 (to
    # keep its own processes responsive), where the training — all of fedsim's work — got ~4% of a core beside
    # two busy processes at nice 0 and a 5-second test run took minutes
    kwargs["_system_config"] = {"preload_python_modules": [] if pyarrow else ["fedsim.boot"], "worker_niceness": 0}
    return kwargs


def init_ray(scenario: Scenario, runs: int = 1, pyarrow: bool = False, driver_cpus: float = 0.0) -> bool:
    """Connect to (``resources.address``) or start a local Ray instance with room for ``runs`` concurrent runs of
    ``scenario``. Returns True if this call started it. ``pyarrow``: a local instance's workers may import pyarrow
    (Ray Tune's trials need it; fedsim's own workers are kept without it, :mod:`fedsim.boot`). ``driver_cpus``: what
    each run's driver holds besides its workers (a Tune trial's share of its placement group)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    res = scenario.resources
    kwargs: dict[str, Any] = dict(include_dashboard=res.dashboard, logging_level=logging.WARNING,
                                  configure_logging=True, log_to_driver=True)
    skip: list[str] = []
    if res.address:
        check_reachable(res.address)
        token_auth()
        kwargs["address"] = res.address
    else:
        kwargs.update(_local_instance(res, runs, pyarrow, driver_cpus))
        skip = unused_ray_processes(res)
    main_thread = threading.current_thread() is threading.main_thread()
    keep = signal.getsignal(signal.SIGTERM) if main_thread else None
    cwd = os.getcwd()
    try:
        with _lean_head(skip), contextlib.nullcontext() if pyarrow else _without_pyarrow(), \
                _sigterm_interrupts(keep is not None):
            ray.init(**kwargs)
            with contextlib.suppress(Exception):  # private: a Ray without it makes the context later, with pyarrow
                ray._private.worker.global_worker.get_serialization_context()  # made now, while pyarrow is hidden
        _back_to(cwd)
    except Exception as e:
        where = f"the Ray cluster at {res.address!r}" if res.address else "a local Ray instance"
        hint = ("" if not res.address or os.environ.get("RAY_AUTH_MODE") == "token" else
                " With Ray's token authentication (the default of `ray start` since Ray 2.5x), put the cluster's "
                "token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN here too.")
        raise BackendError(f"could not start {where}: {e.__class__.__name__}: {e}. "
                           f"Check resources.address, or use resources.backend: local.{hint}") from None
    finally:
        if keep is not None:  # Ray's core worker replaces SIGTERM with a handler that dumps a native stack and aborts
            signal.signal(signal.SIGTERM, keep)
    if skip:
        stop_unused_ray_processes(skip)
    return True


def _back_to(cwd: str) -> None:
    """A driver inside a Ray job: joining the cluster unpacks the job's working directory again, replacing the
    directory the driver runs in (the old one deleted) — go back to it by name, where the scenario's relative paths
    were given."""
    try:
        now = os.getcwd()
    except FileNotFoundError:  # deleted under us
        now = None
    if now != cwd and os.path.isdir(cwd):
        os.chdir(cwd)


def token_auth() -> str | None:
    """Ray's token authentication, for a cluster this process joins: ``ray start`` (Ray ≥ 2.5x) makes clusters that
    ask every client for their token, and a client sends it only with ``RAY_AUTH_MODE=token``. When the mode is unset
    and a token is at hand (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), the mode is
    set; returns where the token comes from (None: nothing done)."""
    if "RAY_AUTH_MODE" in os.environ:
        return None
    sources = [("RAY_AUTH_TOKEN", bool(os.environ.get("RAY_AUTH_TOKEN")))]
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    sources.append((path, os.path.isfile(path)))
    where = next((name for name, present in sources if present), None)
    if where is not None:
        os.environ["RAY_AUTH_MODE"] = "token"
        with contextlib.suppress(Exception):  # Ray reads its config once per process: make it read it again (private)
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
        log.info("joining the cluster with Ray's token authentication (token from %s)", where)
    return where


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after minutes of Ray's retries, when nothing listens at ``resources.address``
    (``host:port`` of the head's GCS, or ``ray://host:port`` of its Ray Client server; ``auto`` is Ray's to find).

    Raises:
        BackendError: naming the address and what to check.
    """
    import socket

    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        return  # `auto`, or a form Ray resolves itself
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise BackendError(
            f"cannot reach the Ray cluster at {address!r} ({e.strerror or e.__class__.__name__} within "
            f"{timeout_s:g} s). Check that the head runs (`ray start --head --port={port}`), the host and port in "
            "resources.address, firewalls, and — with Ray's token authentication — RAY_AUTH_MODE=token and the "
            "cluster's token in this environment") from None


@contextlib.contextmanager
def _sigterm_interrupts(on: bool) -> Iterator[None]:
    """While Ray starts, a SIGTERM ends the start-up as Ctrl-C does (``KeyboardInterrupt``: the command says
    ``interrupted`` and exits with 130) instead of ``sys.exit(15)`` or ``sys.exit(1)`` from the handlers Ray installs
    meanwhile; their own clean-up (stopping the processes started so far) still runs first. Private hook: a Ray
    without it keeps its handlers."""
    if not on:
        yield
        return
    try:
        from ray._private import utils as ray_utils

        install = ray_utils.set_sigterm_handler
    except (ImportError, AttributeError):
        yield
        return

    def wrapped(handler: Any) -> None:
        def on_sigterm(signum: int, frame: Any) -> None:
            try:
                handler(signum, frame)
            except SystemExit:
                raise KeyboardInterrupt from None

        install(on_sigterm)

    ray_utils.set_sigterm_handler = wrapped
    try:
        yield
    except SystemExit as e:  # a handler installed around the hook (a Ray release that calls signal.signal itself)
        if e.code in (signal.SIGTERM, int(signal.SIGTERM)):
            raise KeyboardInterrupt from None
        raise
    finally:
        ray_utils.set_sigterm_handler = install


def stop_unused_ray_processes(names: list[str]) -> list[str]:
    """Stop those of a local head's processes ``names`` that are running (none, when it started lean); return the
    ones stopped."""
    try:
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        kinds = {"monitor": "PROCESS_TYPE_MONITOR", "dashboard": "PROCESS_TYPE_DASHBOARD",
                 "log_monitor": "PROCESS_TYPE_LOG_MONITOR"}
        from ray._private import ray_constants

        running = [n for n in names if getattr(ray_constants, kinds[n]) in node.all_processes]
        for name in running:
            getattr(node, f"kill_{name}")(check_alive=False)
    except Exception as e:  # private hooks: a Ray release without them keeps its processes, nothing else changes
        log.debug("could not stop Ray's unused processes (%s)", e)
        return []
    return running


def check_placement(res: Any) -> None:
    """Fail now, not after a long wait, when the cluster cannot place the requested workers and server.

    Raises:
        BackendError: naming what is short and the fix.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    slots = res.slots()
    need_cpu = sum(c for _, c, _ in slots) + res.server.num_cpus
    need_gpu = sum(g for _, _, g in slots) + res.server.num_gpus
    biggest_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    biggest_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    problems = []
    one_cpu = max([c for _, c, _ in slots] + [res.server.num_cpus])
    one_gpu = max([g for _, _, g in slots] + [res.server.num_gpus])
    if one_cpu > biggest_cpu:
        problems.append(f"no node has {one_cpu:g} CPUs (largest: {biggest_cpu:g})")
    if one_gpu > biggest_gpu:
        problems.append(f"no node has {one_gpu:g} GPUs (largest: {biggest_gpu:g})")
    if need_cpu > total_cpu + 1e-9:
        problems.append(f"{need_cpu:g} CPUs needed, the cluster has {total_cpu:g}")
    if need_gpu > total_gpu + 1e-9:
        problems.append(f"{need_gpu:g} GPUs needed, the cluster has {total_gpu:g}")
    if problems:
        raise BackendError(
            "Ray cannot place the workers: " + "; ".join(problems) + ". Lower resources.num_workers, "
            "resources.num_cpus / num_gpus, resources.pools or resources.server, or add nodes to the cluster")


@dataclass
class Pool:
    """Ray (started by this process or not) and the worker actors of one run, created for ``scenario``."""

    scenario: dict
    started_ray: bool
    slots: list[tuple[int, float, float]]
    worker_cls: Any
    actors: list[Any] = field(default_factory=list)
    ready: list[Any] = field(default_factory=list)  # each actor's ping: its model built
    started_at: float = 0.0  # time.perf_counter() when the launch began (a run's time counts from it)

    def new_actor(self, i: int, data: Any = None) -> Any:
        pool, cpus, gpus = self.slots[i]
        return self.worker_cls.options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, scheduling_strategy=placement()
                                       ).remote(self.scenario, data, f"worker-{i}" + (f"-pool{pool}" if pool >= 0
                                                                                      else ""), gpus)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        self.actors = []
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        self.started_ray = False


def launch_pool(scenario: Scenario) -> Pool:
    """Start (or connect to) Ray and create the worker actors; return at once: each actor imports and builds its
    model while the caller goes on."""
    t0 = time.perf_counter()
    started = init_ray(scenario)
    try:
        check_placement(scenario.resources)
    except BackendError:
        if started:
            import ray

            ray.shutdown()
        raise
    pool = Pool(scenario.to_dict(), started, scenario.resources.slots(), remote_worker_class(), started_at=t0)
    pool.actors = [pool.new_actor(i) for i in range(len(pool.slots))]
    pool.ready = [a.ping.remote() for a in pool.actors]
    return pool


_early: Pool | None = None


def launch_early(scenario: Scenario) -> None:
    """Start the pool for ``scenario`` now (the ``fedsim`` command, before it imports torch); the run's backend
    adopts it."""
    global _early
    discard_early()
    _early = launch_pool(scenario)


def take_early(scenario: dict) -> Pool | None:
    """The pool :func:`launch_early` started, if it was for this scenario (else it is shut down); only once."""
    global _early
    pool, _early = _early, None
    if pool is not None and pool.scenario != scenario:
        pool.shutdown()
        return None
    return pool


def discard_early() -> None:
    """Shut down a pool that no run adopted (e.g. the scenario failed its strategy checks)."""
    global _early
    pool, _early = _early, None
    if pool is not None:
        pool.shutdown()
