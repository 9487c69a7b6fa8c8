"""SimExecutor: an executor that runs no model. The engine's control plane runs unchanged on it.

Each step it returns, for every request that samples, one token (`token_id`, never an
end-of-sequence id of the presets: requests end by their own `max_tokens`, which is how a trace
scripts its output lengths), and per instance the step's seconds from the cost model, with the
attention an instance computes for other instances' requests charged to it. Block moves take the
cost model's copy time. On a `VirtualClock` the engine then runs on simulated time.

`concurrent=False` models every instance on one device, one after another, which is what the
in-process executor does on this machine (the engine's clock then advances by the sum of the
instances' seconds): the setting the simulator is validated in against the real engine.
"""

from __future__ import annotations

from infinillm.runtime.executor import Executor, InstanceSpec, StepResult
from infinillm.runtime.fabric import FabricStats
from infinillm.sim.cost import CostModel, StepCost
from infinillm.sim.devices import DeviceProfile, load_profile
from infinillm.types import BlockMove, InstanceId, StepPlan


class SimExecutor(Executor):
    def __init__(self, config, spec: InstanceSpec, instance_ids: list[InstanceId], *,
                 profile: DeviceProfile | None = None, tensor_parallel: int = 1,
                 concurrent: bool = True) -> None:
        if profile is None:
            profile = load_profile(config.runtime.sim_device)
        self.cost = CostModel(spec.arch, spec.dtype.itemsize, spec.block_size, profile,
                              tensor_parallel)
        self.concurrent_instances = concurrent
        self.token_id = spec.arch.vocab_size - 1
        self.stats = FabricStats()
        self.last_costs: dict[InstanceId, StepCost] = {}  # the last step's, by part

    def execute(self, plans: list[StepPlan]) -> StepResult:
        result = StepResult({}, {})
        costs: dict[InstanceId, StepCost] = {}
        for plan in plans:
            if not plan.chunks:
                continue
            cost = costs[plan.instance_id] = self.cost.step(plan.instance_id, plan.chunks)
            for chunk in plan.chunks:
                if chunk.sample:
                    result.sampled[chunk.request_id] = self.token_id
            self._count(plan, cost)
        for cost in list(costs.values()):
            for holder, work in cost.remote.items():
                holder_cost = costs.setdefault(holder, StepCost())
                holder_cost.holder += self.cost.attention_seconds(work)
        result.seconds = {iid: c.seconds for iid, c in costs.items()}
        self.stats.execute_seconds += sum(result.seconds.values())
        self.last_costs = costs
        return result

    def _count(self, plan: StepPlan, cost: StepCost) -> None:
        layers = self.cost.arch.num_layers
        for holder, work in cost.remote.items():
            self.stats.remote_attention_calls += layers
            self.stats.remote_attention_items += layers * work.calls
            key = (plan.instance_id, holder)
            self.stats.per_pair_calls[key] = self.stats.per_pair_calls.get(key, 0) + layers
            self.stats.bytes_sent += int(layers * cost.traffic.get(holder, 0.0))

    def move_blocks(self, moves: list[BlockMove]) -> float:
        self.stats.blocks_moved += len(moves)
        self.stats.bytes_sent += len(moves) * self.cost.block_bytes
        return self.cost.move_seconds(moves, self.concurrent_instances)

    def fabric_stats(self, max_age_s: float = 0.2) -> FabricStats:
        return self.stats
