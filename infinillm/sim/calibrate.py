"""`infinillm calibrate`: measure this machine into the simulator's `cpu` device profile.

What is measured, in this order (float32, the model's own shapes):
1. **GEMM rates**: the model's linear layers (every layer its own weights, the engine's kernels)
   at M = 1 .. 512 rows; the best rate is `peak_flops`, each M's share of it the efficiency
   curve, and the weights' bytes over the time at M = 1 the memory bandwidth.
2. **Attention per key**: the attention backend's micro-attention of one query over 64 .. 4096
   cached keys (a cross-check, kept in the profile's `sources`).
3. **Host overheads and attention as the engine runs it**: the real engine (one instance, this
   model) runs decode batches of 1 .. 32 requests at contexts of 100 and 1000 tokens and
   prefill chunks of 32 .. 512 tokens; what its measured step time exceeds the modelled GEMMs by
   is fitted as a cost per step, per request, per token and per key read (non-negative least
   squares). The per-key cost sets `attention_bandwidth`.
4. **Exchange latency**: the same engine with two instances, one request's blocks half on the
   other: the extra time per layer of its decode steps over the same request all local is the
   in-process exchange (modelled as two latencies per layer).

Everything runs on one device here, so `gpus_per_node` is large (every instance is "in the
node") and the link is the in-process one. The result is a profile JSON (devices.py), read by
`--device cpu` or by path.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from infinillm.cluster.perf_model import nonneg_lstsq
from infinillm.sim.devices import CPU_PROFILE_NAME, DeviceProfile, default_cpu_profile_path
from infinillm.types import InstanceId

GEMM_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ATTENTION_KEYS = (64, 256, 1024, 2048, 4096)
DECODE_BATCHES = (1, 4, 16, 32)
DECODE_CONTEXTS = (100, 1000)
PREFILL_TOKENS = (32, 128, 512)


def _best_time(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_gemm(arch, dtype=torch.float32) -> tuple[dict[int, float], float]:
    """FLOP/s of the model's linear layers per M, and the bytes/s at which they stream the
    weights at M = 1. Every layer has its own weights, as in the model, so they come from
    memory, not from a cache; the engine's own kernels (model/linear.py), fused q/k/v and
    gate/up as it runs them."""
    from infinillm.model.linear import Linear

    h, q, kv, i = (arch.hidden_size, arch.num_heads * arch.head_dim,
                   arch.num_kv_heads * arch.head_dim, arch.intermediate_size)
    shapes = ((q + 2 * kv, h), (h, q), (2 * i, h), (h, i))
    layers = [[Linear(torch.randn(o, n, dtype=dtype) * 0.02) for o, n in shapes]
              for _ in range(arch.num_layers)]
    params = arch.num_layers * sum(o * n for o, n in shapes)
    rates, stream = {}, 0.0
    for m in GEMM_ROWS:
        inputs = [torch.randn(m, n, dtype=dtype) for _, n in shapes]

        def run(inputs=inputs):
            for layer in layers:
                for x, linear in zip(inputs, layer):
                    linear(x)

        seconds = _best_time(run, repeats=5 if m <= 64 else 3)
        rates[m] = 2 * params * m / seconds
        if m == 1:
            stream = params * torch.empty((), dtype=dtype).element_size() / seconds
    return rates, stream


def measure_attention(arch, block_size: int = 16) -> tuple[float, float]:
    """(seconds per key, seconds per call) of one query's micro-attention over cached keys, per
    layer (a cross-check of the per-key cost fitted on engine steps)."""
    from infinillm.attention import get_backend

    backend = get_backend("auto", "cpu")
    num_blocks = max(ATTENTION_KEYS) // block_size
    shape = (arch.num_kv_heads, num_blocks, block_size, arch.head_dim)
    k, v = torch.randn(shape), torch.randn(shape)
    q = torch.randn(1, arch.num_heads, arch.head_dim)
    scale = arch.head_dim ** -0.5
    points = []
    for n in ATTENTION_KEYS:
        blocks = list(range(-(-n // block_size)))
        points.append((n, _best_time(lambda b=blocks, n=n: backend.blocks_attention(
            q, k, v, b, n, scale=scale), repeats=15)))
    slope, intercept = _fit_line(points)
    return max(slope, 1e-12), max(intercept, 0.0)


def _fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def _engine_steps(model: str | None, log) -> list[tuple[list, float]]:
    """Real steps of one instance: (its chunks, measured seconds) for decode batches of 1 .. 32
    requests at two context lengths and for prefill chunks of 32 .. 512 tokens."""
    from infinillm import LLM, SamplingParams

    llm = LLM(model, num_instances=1, kv_blocks_per_instance=2048, block_size=16,
              max_num_batched_tokens=512, max_num_seqs=64)
    engine = llm.engine
    executor = engine.executor
    samples: list[tuple[list, float]] = []
    planned: list = []
    run_plans = executor.execute

    def execute(plans):  # note what each step ran
        planned[:] = [c for p in plans for c in p.chunks]
        return run_plans(plans)

    executor.execute = execute

    def run(prompts: list[list[int]], max_tokens: int, keep) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for p in prompts:
            engine.add_request(p, params)
        while engine.has_unfinished_requests():
            engine.step()
            rec = engine.last_step.instances[0]
            if keep(rec):  # the whole engine step: the driver's share is host overhead too
                samples.append((list(planned), engine.last_step.seconds))

    run([[100 + i] * 40 for i in range(4)], 4, lambda r: False)  # warm-up
    for context in DECODE_CONTEXTS:
        for b in DECODE_BATCHES:
            run([[100 + i] * context for i in range(b)], 8,
                lambda r, b=b: r.num_seqs == b and r.num_tokens == b)
        log(f"  decode batches {DECODE_BATCHES} at context {context}")
    for t in PREFILL_TOKENS:
        for _ in range(3):
            run([[300] * t], 1, lambda r, t=t: r.num_tokens == t)
    log(f"  prefill chunks of {PREFILL_TOKENS} tokens")
    llm.shutdown()
    return samples


def _exchange_seconds(model: str | None, arch) -> float:
    """Extra seconds per layer of a decode step whose request has blocks on another instance."""
    from infinillm import LLM, SamplingParams

    prompt, times = [200] * 700, {}
    for label, settings in (("local", dict(num_instances=1, kv_blocks_per_instance=128)),
                            ("remote", dict(num_instances=2, kv_blocks_per_instance=32))):
        llm = LLM(model, block_size=16, max_num_batched_tokens=512, **settings)
        engine = llm.engine
        engine.add_request(prompt, SamplingParams(max_tokens=16, temperature=0.0,
                                                  ignore_eos=True))
        steps = []
        while engine.has_unfinished_requests():
            engine.step()
            rec = engine.last_step
            if rec.num_tokens == 1:
                steps.append(sum(i.seconds for i in rec.instances))
        times[label] = statistics.median(steps[2:])
        llm.shutdown()
    return max(0.0, times["remote"] - times["local"]) / arch.num_layers


def calibrate(model: str | None = None, output: str | None = None,
              threads: int | None = None, log=print) -> Path:
    from infinillm.model import load_arch
    from infinillm.model.resolve import resolve_model_path
    from infinillm.sim.cost import CostModel, StepCost

    if threads:
        torch.set_num_threads(threads)
    arch = load_arch(resolve_model_path(model))
    log("calibrating: GEMM rates and weight streaming")
    rates, bandwidth = measure_gemm(arch)
    peak = max(rates.values())
    log("calibrating: attention")
    micro_per_key, micro_per_call = measure_attention(arch)
    kv_token_bytes = 2 * arch.num_kv_heads * arch.head_dim * 4
    profile = DeviceProfile(
        name=CPU_PROFILE_NAME, memory_bytes=_ram_bytes(), peak_flops=peak,
        memory_bandwidth=bandwidth,
        gemm_efficiency=tuple((m, r / peak) for m, r in sorted(rates.items())),
        memory_efficiency=1.0, attention_bandwidth=kv_token_bytes / micro_per_key,
        attention_call_s=micro_per_call, padded_decode=True, gpus_per_node=1 << 20,
        intra_node_bandwidth=bandwidth,
        intra_node_latency_s=0.0, inter_node_bandwidth=bandwidth, inter_node_latency_s=0.0,
        step_overhead_s=0.0, seq_overhead_s=0.0, layer_overhead_s=0.0,
        activation_reserve_bytes=0)
    log("calibrating: engine steps (host overheads, attention per key)")
    samples = _engine_steps(model, log)
    # Fit on real steps what they cost beyond the modelled GEMMs and attention FLOPs: per step,
    # per request, per token and per key read (K/V bytes, so no bandwidth term while fitting).
    fitting = dataclasses.replace(profile, attention_bandwidth=float("inf"))
    cost = CostModel(arch, 4, 16, fitting)
    rows, ys = [], []
    for chunks, seconds in samples:
        keys = cost.attention_work(InstanceId(0), chunks, StepCost()).kv_bytes / kv_token_bytes
        tokens = sum(len(c.token_ids) for c in chunks)
        rows.append([1.0, float(len(chunks)), float(tokens), float(keys)])
        ys.append(seconds - cost.step(InstanceId(0), chunks).seconds)
    per_step, per_seq, per_token, per_key = nonneg_lstsq(rows, ys)
    if per_key > 0:  # the engine's own attention path, batched as it really runs
        per_key_layer = per_key / arch.num_layers
    else:
        per_key_layer = micro_per_key
    log("calibrating: exchange between instances")
    exchange = _exchange_seconds(model, arch)
    profile = dataclasses.replace(
        profile, step_overhead_s=per_step, seq_overhead_s=per_seq, token_overhead_s=per_token,
        attention_bandwidth=kv_token_bytes / per_key_layer,
        intra_node_latency_s=exchange / 2, inter_node_latency_s=exchange / 2,
        sources={"measured_on": _machine(), "threads": str(torch.get_num_threads()),
                 "model": str(resolve_model_path(model)),
                 "attention_bandwidth": "fitted on engine decode steps" if per_key > 0
                 else "micro-benchmark",
                 "micro_attention": f"{micro_per_key * 1e9:.1f} ns per key, "
                                    f"{micro_per_call * 1e6:.0f} us per call (one layer)"})
    path = Path(output).expanduser() if output else default_cpu_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_json())
    return path


def _ram_bytes() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
