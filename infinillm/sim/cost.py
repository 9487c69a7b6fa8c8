"""The simulator's cost model: how long one instance's step takes, from shapes and a device.

Per instance and step, with T tokens in the batch (prefill chunks and decodes), S of them
sampled, and L layers (all of it divided over the instance's `tensor_parallel` devices):

- linear layers, by roofline per layer: max(2 * params * T / (peak * gemm_share(T)),
  weight bytes / (memory bandwidth * memory_efficiency)); the LM head likewise for the S
  sampled rows; elementwise work (norms, rotary, activation, residual) as bytes moved;
- attention, per chunk and per holder of its K/V: keys read (K/V bytes / attention bandwidth)
  and, for prefill chunks, FLOPs (causal: each query row sees the positions before it), plus a
  fixed cost per call; the owner computes what it holds, each holder what it holds of others'
  requests (charged to the holder);
- DistAttention traffic, per layer and remote holder: the owner sends the chunk's queries (and
  the K/V rows it stores there), the holder computes and returns (out, lse); the owner waits
  for the slowest holder: 2 latencies + bytes / link bandwidth + the holder's compute. Holders in
  the owner's node (`gpus_per_node` devices) use the intra-node link, others the network;
- tensor parallelism: two all-reduces of T x hidden per layer (ring), over the intra-node link
  when the instance fits in a node, else the network;
- host overheads: per step, per request and per layer.

The cluster step is synchronous (the engine advances its clock by the slowest instance), and
block moves cost latency + bytes / link bandwidth per (source, destination) pair, pairs in
parallel. Left out, and named in docs/simulation.md: overlap of communication with compute,
contention on shared links and NICs, memory fragmentation, and the kernels' shape effects
beyond the GEMM efficiency curve.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from infinillm.model import ModelArch
from infinillm.runtime.traffic import order_chunks, tokens_by_holder
from infinillm.sim.devices import DeviceProfile
from infinillm.types import BlockMove, InstanceId, ScheduledChunk


@dataclass(slots=True)
class AttentionWork:
    """Attention of one instance in one step, per layer: K/V bytes read, FLOPs and calls."""

    kv_bytes: float = 0.0
    flops: float = 0.0
    calls: int = 0
    max_rows: int = 1  # the longest chunk: its GEMM shape sets the FLOP rate


@dataclass(slots=True)
class StepCost:
    """One instance's modelled step, by part (seconds); `seconds` is the total."""

    linear: float = 0.0
    attention: float = 0.0
    exchange: float = 0.0  # waiting on holders (their compute included) and the wire
    holder: float = 0.0  # attention computed for other instances' requests
    allreduce: float = 0.0
    overhead: float = 0.0
    remote: dict[InstanceId, AttentionWork] = field(default_factory=dict)
    traffic: dict[InstanceId, float] = field(default_factory=dict)  # bytes per layer, by holder

    @property
    def seconds(self) -> float:
        return (self.linear + self.attention + self.exchange + self.holder + self.allreduce
                + self.overhead)


class CostModel:
    def __init__(self, arch: ModelArch, dtype_bytes: int, block_size: int,
                 profile: DeviceProfile, tensor_parallel: int = 1) -> None:
        if tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
        self.arch, self.profile, self.tp = arch, profile, tensor_parallel
        self.dtype_bytes, self.block_size = dtype_bytes, block_size
        a, b = arch, dtype_bytes
        q_width, kv_width = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.layer_params = (a.hidden_size * (2 * q_width + 2 * kv_width)
                             + 3 * a.hidden_size * a.intermediate_size)
        self.head_params = a.hidden_size * a.vocab_size
        self.weight_bytes = b * (a.num_layers * self.layer_params
                                 + self.head_params * (1 if a.tie_word_embeddings else 2))
        self.kv_token_bytes = 2 * kv_width * b  # per layer
        self.block_bytes = self.kv_token_bytes * a.num_layers * block_size
        # norms, rotary, activation, residual: bytes moved per token per layer
        self.elementwise_bytes = b * (10 * a.hidden_size + 3 * a.intermediate_size)
        self.query_bytes = q_width * b  # one query row of a layer
        self.partial_bytes = q_width * b + a.num_heads * 4  # out + fp32 lse per row

    # ---- capacity -------------------------------------------------------------------------

    def kv_blocks(self) -> int:
        """Blocks one instance's KV pool holds: the usable memory of its devices after the
        weights and the activation reserve. ValueError when the weights do not fit."""
        p = self.profile
        usable = p.memory_bytes * p.gpu_memory_utilization * self.tp
        left = usable - self.weight_bytes - p.activation_reserve_bytes * self.tp
        if left < self.block_bytes:
            raise ValueError(
                f"the model's weights ({self.weight_bytes / 2**30:.1f} GiB) and activation "
                f"reserve leave no KV memory on {self.tp} x {p.name} "
                f"({usable / 2**30:.1f} GiB usable)")
        return int(left // self.block_bytes)

    # ---- one instance's step --------------------------------------------------------------

    def linear_seconds(self, num_tokens: int, num_sampled: int) -> float:
        p, b, tp = self.profile, self.dtype_bytes, self.tp
        mem = p.memory_bandwidth * p.memory_efficiency
        flops = 2 * self.layer_params * num_tokens / tp
        per_layer = max(flops / (p.peak_flops * p.gemm_share(num_tokens)),
                        self.layer_params * b / tp / mem)
        per_layer += self.elementwise_bytes * num_tokens / mem
        head = 0.0
        if num_sampled:
            head = max(2 * self.head_params * num_sampled / tp
                       / (p.peak_flops * p.gemm_share(num_sampled)),
                       self.head_params * b / tp / mem)
        return self.arch.num_layers * per_layer + head

    def attention_seconds(self, work: AttentionWork) -> float:
        """All layers of `work` (given per layer) on one instance's devices."""
        if not work.calls:
            return 0.0
        p = self.profile
        # Decode attention is bound by the K/V bytes it reads; FLOPs count for prefill chunks,
        # at the GEMM share of their row count.
        rate = p.peak_flops * (p.gemm_share(work.max_rows) if work.max_rows > 1 else 1.0)
        per_layer = max(work.kv_bytes / p.attention_bandwidth, work.flops / rate) / self.tp
        return self.arch.num_layers * (per_layer + work.calls * p.attention_call_s)

    def allreduce_seconds(self, num_tokens: int) -> float:
        if self.tp == 1:
            return 0.0
        p, n = self.profile, self.tp
        intra = n <= p.gpus_per_node
        bw = p.intra_node_bandwidth if intra else p.inter_node_bandwidth
        latency = p.intra_node_latency_s if intra else p.inter_node_latency_s
        size = num_tokens * self.arch.hidden_size * self.dtype_bytes
        ring = 2 * (n - 1) * latency + 2 * (n - 1) / n * size / bw
        return self.arch.num_layers * 2 * ring

    def link(self, a: InstanceId, b: InstanceId) -> tuple[float, float]:
        """(bandwidth, latency) between two instances' devices."""
        p = self.profile
        per_node = max(1, p.gpus_per_node // self.tp)
        if a // per_node == b // per_node:
            return p.intra_node_bandwidth, p.intra_node_latency_s
        return p.inter_node_bandwidth, p.inter_node_latency_s

    def chunk_work(self, me: InstanceId, chunk: ScheduledChunk,
                   own: AttentionWork, remote: dict[InstanceId, AttentionWork],
                   traffic: dict[InstanceId, float]) -> None:
        """Add one chunk's attention to its owner's (`own`) and holders' (`remote`) work, and the
        bytes it sends each holder per layer to `traffic`."""
        a = self.arch
        rows = len(chunk.token_ids)
        start, end = chunk.start_pos, chunk.start_pos + rows
        held = tokens_by_holder(chunk, self.block_size)
        written = new_tokens_by_holder(chunk, self.block_size)
        # causal: query row i sees positions < start + i + 1; keys spread over holders as stored
        keys_seen = rows * start + rows * (rows + 1) / 2
        for holder, num_tokens in held.items():
            share = num_tokens / end
            work = own if holder == me else remote.setdefault(holder, AttentionWork())
            work.kv_bytes += num_tokens * self.kv_token_bytes
            work.flops += 4 * a.num_heads * a.head_dim * keys_seen * share
            work.calls += 1
            work.max_rows = max(work.max_rows, rows)
            if holder != me:
                traffic[holder] = (traffic.get(holder, 0.0) + rows * self.query_bytes
                                   + rows * self.partial_bytes
                                   + written.get(holder, 0) * self.kv_token_bytes)

    def attention_work(self, me: InstanceId, chunks: list[ScheduledChunk],
                       cost: StepCost) -> AttentionWork:
        """The owner's own attention work of a step (per layer); holders' work and the traffic
        to them go into `cost`. With a `padded_decode` profile (this engine's CPU path), the
        short all-local decodes run as one call padded to the longest of them
        (runtime/traffic.py `order_chunks` picks them), the rest one call each."""
        own = AttentionWork()
        if self.profile.padded_decode:
            ordered, num_padded = order_chunks(me, chunks)
            if num_padded:
                longest = max(c.start_pos + 1 for c in ordered[:num_padded])
                own.kv_bytes += num_padded * longest * self.kv_token_bytes
                own.calls += 1
            chunks = ordered[num_padded:]
        for c in chunks:
            self.chunk_work(me, c, own, cost.remote, cost.traffic)
        return own

    def step(self, me: InstanceId, chunks: list[ScheduledChunk]) -> StepCost:
        """The owner's side of a step; the holders' work is in `StepCost.remote` (add it to
        their steps with `attention_seconds`)."""
        cost = StepCost()
        if not chunks:
            return cost
        p = self.profile
        num_tokens = sum(len(c.token_ids) for c in chunks)
        num_sampled = sum(1 for c in chunks if c.sample)
        own = self.attention_work(me, chunks, cost)
        traffic = cost.traffic
        cost.linear = self.linear_seconds(num_tokens, num_sampled)
        cost.attention = self.attention_seconds(own)
        cost.allreduce = self.allreduce_seconds(num_tokens)
        cost.overhead = (p.step_overhead_s + p.seq_overhead_s * len(chunks)
                         + p.token_overhead_s * num_tokens
                         + p.layer_overhead_s * self.arch.num_layers)
        slowest = 0.0
        for holder, work in cost.remote.items():
            bw, latency = self.link(me, holder)
            per_layer = (2 * latency + traffic[holder] / bw
                         + self.attention_seconds(work) / self.arch.num_layers)
            slowest = max(slowest, per_layer)
        cost.exchange = self.arch.num_layers * slowest
        return cost

    def move_seconds(self, moves: list[BlockMove], concurrent: bool) -> float:
        """Block copies: per (source, destination) pair latency + bytes / bandwidth; pairs in
        parallel when devices work concurrently, else one after another."""
        pairs: dict[tuple[InstanceId, InstanceId], int] = defaultdict(int)
        for m in moves:
            pairs[m.src[0], m.dst[0]] += 1
        times = []
        for (src, dst), n in pairs.items():
            bw, latency = self.link(src, dst)
            times.append(latency + n * self.block_bytes / bw)
        if not times:
            return 0.0
        return max(times) if concurrent else math.fsum(times)


def new_tokens_by_holder(chunk: ScheduledChunk, block_size: int) -> dict[InstanceId, int]:
    """The chunk's own positions (whose K/V it writes), per instance storing them."""
    start, end = chunk.start_pos, chunk.start_pos + len(chunk.token_ids)
    counts: dict[InstanceId, int] = {}
    for index in range(start // block_size, (end - 1) // block_size + 1):
        holder = chunk.blocks[index][0]
        lo, hi = max(start, index * block_size), min(end, (index + 1) * block_size)
        counts[holder] = counts.get(holder, 0) + hi - lo
    return counts
