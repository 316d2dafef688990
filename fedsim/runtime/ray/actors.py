"""The worker actor: defined without torch, so that the driver can create the pool before it imports torch."""

from __future__ import annotations

from typing import Any


class WorkerActor:
    """The body of a worker actor, defined without torch so that the driver can create the pool before it imports
    torch. The actor's process imports torch, transformers and PEFT here, after keeping the quantization libraries
    the scenario does not use out of it; the work is :class:`~fedsim.runtime.ray.remote_worker.RayWorker`'s."""

    def __init__(self, scenario: dict, data: Any, name: str, num_gpus: float):
        from fedsim.boot import import_transformers_lean, skip_unused_backends
        from fedsim.config import scenario_from_dict

        # the driver ran the strategy checks; its components (a notebook's strategy too) come with attach()
        sc = scenario_from_dict(scenario, check_strategy=False)
        skip_unused_backends(sc.clients.quant.backends())  # a process of ours, nothing imported yet
        import_transformers_lean()
        from fedsim.runtime.ray.remote_worker import RayWorker

        self.worker = RayWorker(sc, data, name, num_gpus)

    def attach(self, data: Any, components: Any = None) -> None:
        self.worker.attach(data, components)

    def run_client(self, job: Any, payload: Any, fold: Any = None) -> tuple[Any, Any]:
        return self.worker.run_client(job, payload, fold=fold)

    def run_pack(self, jobs: Any, *payloads: Any, fold: Any = None) -> tuple:
        return self.worker.run_pack(jobs, *payloads, fold=fold)

    def run_clients(self, jobs: Any, which: Any, *payloads: Any, fold: Any = None) -> tuple:
        return self.worker.run_clients(jobs, which, *payloads, fold=fold)

    def take_partial(self, server_round: int) -> tuple[Any, Any]:
        return self.worker.take_partial(server_round)

    def evaluate(self, payload: Any, batches: Any) -> Any:
        return self.worker.evaluate(payload, batches)

    def evaluate_clients(self, payload: Any, items: Any, server_round: Any = None) -> Any:
        return self.worker.evaluate_clients(payload, items, server_round)

    def generate(self, payload: Any, batches: Any, server_round: int) -> Any:
        return self.worker.generate(payload, batches, server_round)

    def harness(self, payload: Any, items: Any, server_round: int) -> Any:
        return self.worker.harness(payload, items, server_round)

    def apply_base_delta(self, version: int, delta: Any) -> int:
        return self.worker.apply_base_delta(version, delta)

    def ping(self) -> str:
        return self.worker.ping()

    def stats(self) -> dict[str, Any]:
        import ray

        return {**self.worker.stats(), "node": ray.get_runtime_context().get_node_id()}


def remote_worker_class() -> Any:
    """The Ray actor class of :class:`WorkerActor` (``run_client`` is called with ``num_returns=2``: the result's
    metadata and the update, as two objects)."""
    import ray

    return ray.remote(WorkerActor)
