"""Executors run the instances' workers for the engine: in this process, or as Ray actors.

The engine hands an executor one StepPlan per instance and gets back the sampled tokens; block
moves (recall, migration) go the same way. An executor that loses an instance raises
`InstanceLost` for the step; the engine then drops that instance and recomputes what it held.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from infinillm.attention import get_backend
from infinillm.kvcache import KVStorage
from infinillm.model import LlamaModel, ModelArch, load_state_dict
from infinillm.runtime.fabric import FabricStats, InProcFabric
from infinillm.runtime.faults import Fault, InjectedFault
from infinillm.runtime.worker import Worker, forward_together
from infinillm.types import BlockMove, InstanceId, StepPlan, StepResult


class InstanceLost(RuntimeError):
    """Instances died during a step; nothing of the step was applied."""

    def __init__(self, instances: list[InstanceId], cause: str) -> None:
        super().__init__(f"lost instance(s) {instances}: {cause}")
        self.instances = instances


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """What every instance of a deployment is built from."""

    model_path: Path
    arch: ModelArch
    dtype: torch.dtype
    num_blocks: int
    block_size: int
    device: str  # resolved: "cpu" or "cuda:N" (engine/device.py)
    attention_backend: str = "auto"  # a name of infinillm.attention.backend_names()
    eos_token_ids: frozenset[int] = frozenset()  # what min_tokens keeps from being sampled


def load_model(spec: InstanceSpec) -> LlamaModel:
    """The model's weights in `spec.dtype` on `spec.device`."""
    return LlamaModel(spec.arch, load_state_dict(spec.model_path, spec.dtype, spec.device),
                      spec.dtype)


def build_worker(spec: InstanceSpec, iid: InstanceId, model: LlamaModel | None,
                 fabric) -> Worker:
    """A worker with its own KV storage and attention backend; loads the model unless one is
    given (shared)."""
    attention = get_backend(spec.attention_backend, spec.device)  # before the slow load
    if model is None:
        model = load_model(spec)
    arch = spec.arch
    storage = KVStorage(arch.num_layers, arch.num_kv_heads, arch.head_dim, spec.num_blocks,
                        spec.block_size, spec.dtype, spec.device, writer=attention.write_kv)
    return Worker(iid, model, storage, attention, fabric, spec.eos_token_ids)


class Executor(ABC):
    # Whether the instances of a step run side by side (one device each): the engine's virtual
    # clock then advances by the slowest instance, else (one after another on one device, as
    # the in-process executor runs them) by their sum. A wall clock ignores it.
    concurrent_instances: bool = True

    @abstractmethod
    def execute(self, plans: list[StepPlan]) -> StepResult:
        """Run one step on every instance that has a plan; raises InstanceLost."""

    @abstractmethod
    def move_blocks(self, moves: list[BlockMove]) -> float:
        """Copy blocks between instances' storages (all reads before any write); the seconds it
        took (measured, or modelled by a simulator)."""

    @abstractmethod
    def fabric_stats(self, max_age_s: float = 0.2) -> FabricStats:
        """Remote traffic so far, summed over instances (may be up to `max_age_s` old where
        gathering it costs a round trip)."""

    def remove_instance(self, instance: InstanceId) -> None:  # noqa: B027 (optional)
        """Forget an instance that was lost."""

    def set_fault(self, fault: Fault | None) -> None:
        """Tests only: make instances fail at named points of a step (faults.py); None
        removes the fault."""
        raise NotImplementedError(f"{type(self).__name__} has no fault injection")

    def shutdown(self) -> None:  # noqa: B027 (optional)
        """Release processes and memory."""


class InProcExecutor(Executor):
    """Every instance in this process, sharing one read-only copy of the weights.

    The instances with work in a step run as one forward of the shared model
    (worker.forward_together): every linear layer and the LM head multiply the rows of all of
    them at once, so a step reads the weights once, not once per instance; attention, the
    fabric's exchanges and sampling stay per instance. The instances still run one after
    another on one device (`concurrent_instances` is False): the engine's clock advances by
    the sum of their seconds, which is the step's wall time. Each instance's seconds are what
    it spent alone (building its rows, its attention and exchanges, sampling) plus the shared
    part of the forward (embedding, linears, norms, LM head) split by its share of the rows.
    `joint_forward = False` gives every instance a forward of its own, one after another (the
    baseline of bench/instances_scaling.py)."""

    concurrent_instances = False

    def __init__(self, spec: InstanceSpec, instance_ids: list[InstanceId]) -> None:
        self.model = load_model(spec)
        self.fabric = InProcFabric()
        self.workers = {i: build_worker(spec, i, self.model, self.fabric) for i in instance_ids}
        for iid, worker in self.workers.items():
            self.fabric.register(iid, worker.storage, worker.attention)
        self.fault: Fault | None = None
        self.joint_forward = True

    def execute(self, plans: list[StepPlan]) -> StepResult:
        result = StepResult({}, {})
        busy = [p for p in plans if p.chunks]
        try:
            if self.joint_forward and len(busy) > 1:
                self._execute_joint(busy, result)
            for plan in plans:
                if plan.chunks and plan.instance_id in result.seconds:
                    continue
                started = time.perf_counter()
                result.add(self.workers[plan.instance_id].execute(plan))
                result.seconds[plan.instance_id] = time.perf_counter() - started
                if self.fault is not None:
                    self.fault("sample", plan.instance_id)
        except InjectedFault as fault:
            raise InstanceLost([fault.instance], str(fault)) from None
        self.fabric.stats.execute_seconds += sum(result.seconds.values())
        return result

    def _execute_joint(self, plans: list[StepPlan], result: StepResult) -> None:
        """Run plans (each with chunks) as one forward; fills `result`, seconds included."""
        workers = [self.workers[p.instance_id] for p in plans]
        alone: list[float] = []  # per instance: seconds of its own work
        steps = []
        for worker, plan in zip(workers, plans):
            started = time.perf_counter()
            steps.append(worker.rows(plan))
            alone.append(time.perf_counter() - started)
        started = time.perf_counter()
        logits, attention_seconds = forward_together(self.model, steps)
        if self.model.device.type == "cuda":
            # Kernels are launched, not done: wait here so that the first instance's sampling
            # does not absorb the whole step. Its attention time is launch time only, so the
            # step is split by rows alone.
            torch.cuda.synchronize(self.model.device)
            attention_seconds = [0.0] * len(steps)
        shared = time.perf_counter() - started - sum(attention_seconds)
        num_rows = sum(len(s.token_ids) for s in steps)
        for i, (worker, step) in enumerate(zip(workers, steps)):
            started = time.perf_counter()
            result.add(worker.finish(step, logits[i]))
            alone[i] += attention_seconds[i] + time.perf_counter() - started
            result.seconds[worker.instance_id] = (
                alone[i] + shared * len(step.token_ids) / num_rows)
            if self.fault is not None:
                self.fault("sample", worker.instance_id)

    def move_blocks(self, moves: list[BlockMove]) -> float:
        started = time.perf_counter()
        try:
            self.fabric.move_blocks(moves)
        except InjectedFault as fault:
            raise InstanceLost([fault.instance], str(fault)) from None
        return time.perf_counter() - started

    def remove_instance(self, instance: InstanceId) -> None:
        self.workers.pop(instance, None)
        self.fabric.unregister(instance)

    def set_fault(self, fault: Fault | None) -> None:
        self.fault = self.fabric.fault = fault

    def fabric_stats(self, max_age_s: float = 0.2) -> FabricStats:
        return dataclasses.replace(self.fabric.stats,
                                   per_pair_calls=dict(self.fabric.stats.per_pair_calls))


def make_executor(config, spec: InstanceSpec, instance_ids: list[InstanceId]) -> Executor:
    """The executor named by `config.runtime.executor` ("inproc", "ray" or "sim")."""
    if config.runtime.executor == "sim":
        from infinillm.sim.executor import SimExecutor

        return SimExecutor(config, spec, instance_ids)
    if config.runtime.executor == "ray":
        from infinillm.runtime.ray_executor import RayExecutor

        return RayExecutor(config, spec, instance_ids)
    return InProcExecutor(spec, instance_ids)
