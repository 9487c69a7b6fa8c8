"""RayExecutor: each instance is a Ray actor (its own process, device and model copy).

The driver keeps the schedulers, RManagers and the GManager; Ray carries control only (a step's
plan to each actor, sampled tokens back). Tensors between instances travel over
torch.distributed among the actors (DistFabric): gloo on CPU; on CUDA each actor asks Ray for
one GPU and the actors talk NCCL. If an actor dies, the step fails with
InstanceLost; the survivors rebuild their process group, and the engine recomputes what the
lost instance held.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import socket
import time

from infinillm.runtime.executor import (
    Executor,
    InstanceLost,
    InstanceSpec,
    StepResult,
    build_worker,
)
from infinillm.runtime.fabric import FabricStats
from infinillm.runtime.faults import Fault
from infinillm.runtime.traffic import RemoteWork, order_chunks, remote_work
from infinillm.types import BlockMove, InstanceId, StepPlan

logger = logging.getLogger("infinillm")


def actor_spec(spec: InstanceSpec) -> InstanceSpec:
    """The spec as an actor applies it: a CUDA instance asked Ray for one GPU, and Ray shows
    the actor that GPU alone (CUDA_VISIBLE_DEVICES), as cuda:0, whatever index the driver
    named."""
    if spec.device.startswith("cuda"):
        return dataclasses.replace(spec, device="cuda:0")
    return spec


class InstanceActor:
    """One instance's worker and fabric, living in a Ray actor process."""

    def __init__(self, spec: InstanceSpec, iid: InstanceId, num_threads: int | None) -> None:
        import torch

        from infinillm.runtime.dist_fabric import DistFabric

        if num_threads:
            torch.set_num_threads(num_threads)
        spec = actor_spec(spec)
        self.worker = build_worker(spec, iid, None, None)
        self.fabric = DistFabric(iid, self.worker.storage, self.worker.attention,
                                 spec.arch.num_heads)
        self.worker.fabric = self.fabric

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it, for the process group's store."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return host, s.getsockname()[1]

    def connect(self, init_method: str, ranks: dict[InstanceId, int], timeout_s: float) -> bool:
        self.fabric.connect(init_method, ranks, timeout_s)
        return True

    def execute(self, plan: StepPlan,
                incoming: dict[InstanceId, RemoteWork]) -> tuple[StepResult, float]:
        """The sampled tokens (and logprobs) and this actor's execute seconds."""
        started = time.perf_counter()
        self.fabric.begin_step(plan.instance_id, incoming)
        try:
            result = self.worker.execute(plan)
            if self.fabric.fault is not None:
                self.fabric.fault("sample", plan.instance_id)
        finally:
            self.fabric.begin_step(plan.instance_id, {})
            seconds = time.perf_counter() - started
            self.fabric.stats.execute_seconds += seconds
        return result, seconds

    def move_blocks(self, moves: list[BlockMove]) -> bool:
        self.fabric.move_blocks(moves)
        return True

    def stats(self) -> FabricStats:
        return self.fabric.stats

    def set_fault(self, fault: Fault | None) -> bool:
        self.fabric.fault = fault
        return True

    def close(self) -> None:
        self.fabric.close()


class RayExecutor(Executor):
    def __init__(self, config, spec: InstanceSpec, instance_ids: list[InstanceId]) -> None:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file in the home folder
        runtime = config.runtime
        try:
            ray.init(address=runtime.ray_address, ignore_reinit_error=True,
                     include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ValueError(f"cannot reach the Ray cluster at {runtime.ray_address!r}: {e}") \
                from None
        self._ray = ray
        gpus = 1 if spec.device.startswith("cuda") else 0  # one GPU per actor
        self._check_resources(len(instance_ids), runtime.cpus_per_instance, gpus)
        actor_cls = ray.remote(num_cpus=runtime.cpus_per_instance, num_gpus=gpus,
                               max_restarts=0)(InstanceActor)
        threads = runtime.num_threads or max(1, int(runtime.cpus_per_instance))
        self.actors = {i: actor_cls.remote(spec, i, threads) for i in instance_ids}
        self.block_size = spec.block_size
        self.timeout_s = runtime.dist_timeout_s
        self._stats_cache: tuple[float, FabricStats | None] = (0.0, None)
        self._connect()
        atexit.register(self.shutdown)

    def _check_resources(self, n: int, cpus: float, gpus: int) -> None:
        have = self._ray.cluster_resources()
        need = {"CPU": n * cpus, "GPU": n * gpus}
        short = {k: (v, have.get(k, 0)) for k, v in need.items() if v > have.get(k, 0)}
        if short:
            self._ray.shutdown()
            raise ValueError(f"the Ray cluster has too few resources for {n} instances: "
                             + ", ".join(f"{k} needs {v:g}, has {h:g}"
                                         for k, (v, h) in short.items()))

    def _connect(self) -> None:
        """(Re)build the process group over the live actors; rank 0 hosts the store."""
        ids = sorted(self.actors)
        host, port = self._ray.get(self.actors[ids[0]].address.remote())
        ranks = {iid: r for r, iid in enumerate(ids)}
        init = f"tcp://{host}:{port}"
        self._ray.get([self.actors[i].connect.remote(init, ranks, self.timeout_s) for i in ids])

    # ---- steps ----------------------------------------------------------------------------

    def execute(self, plans: list[StepPlan]) -> StepResult:
        incoming: dict[InstanceId, dict[InstanceId, RemoteWork]] = {i: {} for i in self.actors}
        for plan in plans:
            chunks, num_padded = order_chunks(plan.instance_id, plan.chunks)
            for holder, work in remote_work(plan.instance_id, chunks, num_padded,
                                            self.block_size).items():
                incoming[holder][plan.instance_id] = work
        by_id = {p.instance_id: p for p in plans}
        calls = {}
        for iid, actor in self.actors.items():  # holders without tokens of their own too
            plan = by_id.get(iid, StepPlan(iid))
            if plan.chunks or incoming[iid]:
                calls[iid] = actor.execute.remote(plan, incoming[iid])
        result = StepResult({}, {})
        for iid, (share, seconds) in self._gather(calls).items():
            result.add(share)
            result.seconds[iid] = seconds
        return result

    def move_blocks(self, moves: list[BlockMove]) -> float:
        started = time.perf_counter()
        involved = {m.src[0] for m in moves} | {m.dst[0] for m in moves}
        self._gather({i: self.actors[i].move_blocks.remote(moves) for i in involved})
        return time.perf_counter() - started

    def _gather(self, calls: dict[InstanceId, object]) -> dict[InstanceId, object]:
        """Results of actor calls; InstanceLost (after regrouping the rest) if any died."""
        from ray.exceptions import RayActorError, RayTaskError

        results, dead, failed = {}, [], []
        for iid, ref in calls.items():
            try:
                results[iid] = self._ray.get(ref)
            except RayActorError:
                dead.append(iid)
            except RayTaskError as e:  # a survivor timed out waiting on a dead peer
                failed.append((iid, e))
        if dead:
            for iid in dead:
                self.actors.pop(iid)
            if self.actors:
                self._connect()
            raise InstanceLost(dead, "Ray actor died")
        if failed:
            raise failed[0][1]
        return results

    def fabric_stats(self, max_age_s: float = 0.2) -> FabricStats:
        """Traffic counters summed over the actors; a round trip to each, so reused for up to
        `max_age_s` (servers publish stats after every step)."""
        taken, cached = self._stats_cache
        if cached is not None and time.monotonic() - taken < max_age_s:
            return cached
        total = FabricStats()  # a lost actor takes its counts with it
        for stats in self._ray.get([a.stats.remote() for a in self.actors.values()]):
            for name in ("remote_attention_calls", "remote_attention_items", "remote_kv_writes",
                         "bytes_sent", "blocks_moved", "exchange_seconds", "execute_seconds",
                         "transfer_seconds"):
                setattr(total, name, getattr(total, name) + getattr(stats, name))
        self._stats_cache = (time.monotonic(), total)
        return total

    def set_fault(self, fault: Fault | None) -> None:
        """Tests only: the same fault in every actor; a FaultPlan there should end the
        process (`exit_process`), as an actor that crashes."""
        self._ray.get([a.set_fault.remote(fault) for a in self.actors.values()])

    def remove_instance(self, instance: InstanceId) -> None:
        actor = self.actors.pop(instance, None)
        if actor is not None:
            self._ray.kill(actor)
            self._connect()

    def shutdown(self) -> None:
        if not getattr(self, "actors", None):
            return
        for actor in self.actors.values():
            try:
                self._ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = {}
        self._ray.shutdown()
