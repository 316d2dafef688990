"""Packed clients on a worker: which clients can share a pass over one base (:mod:`fedsim.client.packed`), and the
pass itself; the others train one by one, with the reason said once in the run's notes."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from fedsim.client.packed import PackMember, check_member, train_packed
from fedsim.client.schedule import round_lr
from fedsim.runtime.starts import head_of
from fedsim.types import FULL, ClientFailure, ClientJob, ClientPayload

Worker = Any  # a fedsim.runtime.worker.Worker


def run_pack(worker: Worker, items: Sequence[tuple[ClientJob, ClientPayload]]) -> list:
    """Train several clients, packed into shared passes over one base wherever their local procedure allows, one by
    one otherwise. One outcome per item, in order: (result, update), or a :class:`ClientFailure` for a client that
    raised (the others go on)."""
    draws = [worker.process_faults(job) for job, _ in items]
    if any(hang for _, hang in draws):
        time.sleep(worker.scenario.faults.hang_s)  # the pack runs together: one hang holds all of it
    out: list = [None] * len(items)
    groups: dict[tuple, list[int]] = {}
    alone: list[tuple[int, str]] = []
    for pos, (job, payload) in enumerate(items):
        why = unpackable(worker, payload)
        if why:
            alone.append((pos, why))
        else:
            key = (payload.base_version, job.spec.quant if worker.bases.quantized_run else FULL, payload.trainable)
            groups.setdefault(key, []).append(pos)
    for positions in groups.values():
        why = _head_unpackable(worker, items[positions[0]][1], items[positions[0]][0])
        if len(positions) == 1 or why:
            alone += [(p, why) for p in positions]
            continue
        for pos, outcome in zip(positions, train_group(worker, [items[p] for p in positions])):
            out[pos] = outcome
    for pos, why in sorted(alone):
        job, payload = items[pos]
        try:
            result, update = worker.train_one(job, payload, time.perf_counter())
            if why:
                result = replace(result, note=why)
            out[pos] = (result, update)
        except Exception as e:  # one failing client must not end the pack
            out[pos] = ClientFailure.of(job.spec.client_id, e)
    if any(kill for kill, _ in draws):
        os._exit(17)  # injected fault: the worker dies mid-job, and with it every client of the pack
    return out


def unpackable(worker: Worker, payload: ClientPayload) -> str:
    """Why this payload's client cannot share a pass ("" when it can)."""
    if payload.procedure != "joint":
        return (f"resources.clients_per_pass: the {payload.procedure!r} local procedure (two-level training, "
                f"e.g. FedDPA, PF2LoRA, iterative FedQLoRA) trains its clients one by one")
    if payload.personal_lora is not None:
        return ("resources.clients_per_pass: clients with a second, personal adapter (e.g. FedQLoRA's "
                "quantization-aware adapter) train one by one")
    if worker.scenario.model.lora_dropout > 0:
        return "resources.clients_per_pass: model.lora_dropout > 0 trains clients one by one"
    cfg = worker.scenario.training
    for key, on in (("grad_accum_steps > 1", cfg.grad_accum_steps > 1), ("gradient_checkpointing",
                                                                      cfg.gradient_checkpointing),
                    ("autocast", cfg.autocast)):
        if on:
            return f"resources.clients_per_pass: training.{key} trains clients one by one"
    if not worker.components.task.packable:
        return f"resources.clients_per_pass: the {worker.components.task.name!r} model task trains clients one by one"
    unpacked = [type(o).__name__ for o in payload.objectives if not o.packable]
    if unpacked:
        return (f"resources.clients_per_pass: client objective(s) {unpacked} do not work in a packed pass; clients "
                "train one by one")
    return ""


def _head_unpackable(worker: Worker, payload: ClientPayload, job: ClientJob) -> str:
    """Why clients of this model cannot share a pass because of its head ("" when they can)."""
    host = worker.host(payload.base_version, job.spec.quant)
    if host.head and host.head_layers() is None:
        return ("resources.clients_per_pass: the model task's head has layers other than linear ones; its clients "
                "train one by one")
    return ""


def train_group(worker: Worker, items: Sequence[tuple[ClientJob, ClientPayload]]) -> list:
    """One packed pass for clients of one base version, bit width and set of trainable factors."""
    t0 = time.perf_counter()
    first_job, first = items[0]
    host = worker.host(first.base_version, first_job.spec.quant)
    host.activate(first.lora)  # wraps the base with PEFT (once per worker); its own adapter stays unused
    shapes = host.shapes(first.lora)
    members: list[PackMember | None] = []
    out: list = [None] * len(items)
    seed = worker.scenario.seed
    for i, (job, payload) in enumerate(items):
        try:
            tensors = worker.starts.fresh(shapes, payload, job) if payload.fresh else \
                worker.starts.initial(shapes, payload, job.spec.client_id, job.personal)
            member = PackMember(payload.lora, tensors, job.indices, (seed, job.server_round, job.spec.client_id),
                                tuple(payload.objectives), job.personal,
                                host.head_source(head_of(payload, job.personal)))
            check_member(member, shapes)
            members.append(member)
        except Exception as e:
            members.append(None)
            out[i] = ClientFailure.of(job.spec.client_id, e)
    live = [i for i, m in enumerate(members) if m is not None]
    if live:
        cfg = worker.scenario.training
        trained = train_packed(host.model, shapes, [members[i] for i in live], first.trainable, worker.data.train,
                               cfg, worker.data.pad_id, worker.device, worker.components.task,
                               round_lr(cfg, first_job.server_round, worker.scenario.rounds), host.head_layers())
        elapsed = (time.perf_counter() - t0) / len(live)  # the pass's time, shared by its clients
        joint = worker.components.procedures["joint"]
        for i, res in zip(live, trained):
            job, payload = items[i]
            if isinstance(res, Exception):
                out[i] = ClientFailure.of(job.spec.client_id, res)
                continue
            tensors, metrics, state, extra, head = res
            out[i] = worker.finish(job, payload, tensors, None, metrics, elapsed, procedure=joint,
                                   objective_state=state, extra=extra,
                                   start=members[i].tensors if payload.fresh else None, head=head or None)
    return out
