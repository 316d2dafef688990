"""A :class:`~fedsim.runtime.worker.Worker` behind Ray: tensors cross the object store as packed byte buffers
(:mod:`fedsim.runtime.wire`). Runs inside :class:`~fedsim.runtime.ray.actors.WorkerActor`."""

from __future__ import annotations

from dataclasses import replace

from fedsim.runtime.wire import pack_tensors_of, unpack, unpack_tensors_of
from fedsim.runtime.worker import Worker
from fedsim.types import ClientFailure


class RayWorker(Worker):
    def run_client(self, job, payload, fold=None):
        """(result, packed update) — or with ``fold`` (a :class:`~fedsim.server.FoldSpec`, its state packed), the
        update folded into this worker's partial: (result, None)."""
        result, update = super().run_client(job, unpack_tensors_of(payload))
        if fold is not None:
            return self.fold(_unpack_spec(fold), (result, update)), None
        return result, pack_tensors_of(update)

    def run_pack(self, jobs, *payloads, fold=None):
        return self._returns(super().run_pack([(j, unpack_tensors_of(p)) for j, p in zip(jobs, payloads)]), fold)

    def run_clients(self, jobs, which, *payloads, fold=None):
        """Clients one after another (:meth:`Worker.run_clients`); ``which[i]``: the position of job i's payload in
        ``payloads`` (a round's clients mostly share one: it crosses Ray once per call)."""
        items = ((j, unpack_tensors_of(payloads[i])) for j, i in zip(jobs, which))
        return self._returns(super().run_clients(items), fold)

    def _returns(self, outs, fold):
        """A call's objects: the results (or, with ``fold``, the results of folding), then one object per update,
        so that the server gets each by reference."""
        if fold is not None:
            spec = _unpack_spec(fold)
            return ([self.fold(spec, o) for o in outs], *[None] * len(outs))
        results = [o if isinstance(o, ClientFailure) else o[0] for o in outs]
        updates = [None if isinstance(o, ClientFailure) else pack_tensors_of(o[1]) for o in outs]
        return (results, *updates)

    def take_partial(self, server_round):
        """(the clients folded, the partial): two objects, so that the driver reads the small one and the server
        the partial, by reference."""
        part = super().take_partial(server_round)
        return (sorted(part.clients) if part is not None else []), part

    def evaluate(self, payload, batches):
        return super().evaluate(unpack_tensors_of(payload), batches)

    def evaluate_clients(self, payload, items, server_round=None):
        return super().evaluate_clients(unpack_tensors_of(payload), items, server_round)

    def generate(self, payload, batches, server_round):
        return super().generate(unpack_tensors_of(payload), batches, server_round)

    def harness(self, payload, items, server_round):
        return super().harness(unpack_tensors_of(payload), items, server_round)

    def apply_base_delta(self, version, delta):
        return super().apply_base_delta(version, unpack(delta))

    def ping(self) -> str:
        """Build the model now (the built-in model task's, until :meth:`attach` brings the run's), so that no
        client's clock pays for it."""
        self.host(self._base_version)
        return self.name


def _unpack_spec(spec):
    return replace(spec, state=unpack_tensors_of(spec.state))
