"""`infinillm calibrate`: measure this machine into the simulator's `cpu` device profile.

What is measured, in this order (float32, the model's own shapes):
1. **GEMM rates**: one decoder layer's linear layers (q, k, v, o, gate, up, down) at M = 1 ..
   512 rows; the best rate is `peak_flops`, each M's share of it the efficiency curve.
2. **Memory bandwidth**: copying a 256 MiB tensor (bytes read + written per second).
3. **Attention per key**: the attention backend's micro-attention of one query over 64 .. 4096
   cached keys; the slope is the K/V bandwidth, the intercept the cost of a call.
4. **Host overheads**: the real engine (one instance, this model) runs decode batches of 1 .. 32
   requests and prefill chunks of 32 .. 512 tokens; what its measured step time exceeds the
   model of 1-3 by is fitted as a cost per step, per request and per token (least squares).
5. **Exchange latency**: the same engine with two instances, one request's blocks half on the
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

from infinillm.sim.devices import CPU_PROFILE_NAME, DeviceProfile, default_cpu_profile_path

GEMM_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ATTENTION_KEYS = (64, 256, 1024, 2048, 4096)
DECODE_BATCHES = (1, 4, 16, 32)
PREFILL_TOKENS = (32, 128, 512)


def _best_time(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_gemm(arch, dtype=torch.float32) -> dict[int, float]:
    """FLOP/s of one layer's linear layers per M."""
    h, q, kv, i = (arch.hidden_size, arch.num_heads * arch.head_dim,
                   arch.num_kv_heads * arch.head_dim, arch.intermediate_size)
    weights = [torch.randn(o, n, dtype=dtype) * 0.02
               for o, n in ((q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i))]
    params = sum(w.numel() for w in weights)
    rates = {}
    for m in GEMM_ROWS:
        xh, xq, xi = (torch.randn(m, h, dtype=dtype), torch.randn(m, q, dtype=dtype),
                      torch.randn(m, i, dtype=dtype))
        inputs = (xh, xh, xh, xq, xh, xh, xi)

        def run(inputs=inputs):
            for x, w in zip(inputs, weights):
                torch.nn.functional.linear(x, w)

        rates[m] = 2 * params * m / _best_time(run)
    return rates


def measure_copy_bandwidth() -> float:
    x = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)  # 256 MiB
    return 2 * x.numel() * 4 / _best_time(x.clone, repeats=5)


def measure_attention(arch, block_size: int = 16) -> tuple[float, float]:
    """(seconds per key, seconds per call) of one query's micro-attention over cached keys."""
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


def _lstsq_nonneg(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares with every coefficient clamped at 0 (refit without the clamped ones)."""
    active = list(range(len(rows[0])))
    while True:
        a = torch.tensor([[r[j] for j in active] for r in rows], dtype=torch.float64)
        b = torch.tensor(ys, dtype=torch.float64).unsqueeze(1)
        sol = torch.linalg.lstsq(a, b).solution.squeeze(1).tolist()
        if all(s >= 0 for s in sol) or len(active) == 1:
            coef = [0.0] * len(rows[0])
            for j, s in zip(active, sol):
                coef[j] = max(s, 0.0)
            return coef
        active = [j for j, s in zip(active, sol) if s >= 0]


def _engine_steps(model: str | None, log) -> tuple[list[tuple[int, int, int, float]], object]:
    """(sequences, tokens, context per sequence, measured instance seconds) of real steps, and
    the model's arch."""
    from infinillm import LLM, SamplingParams

    llm = LLM(model, num_instances=1, kv_blocks_per_instance=1024, block_size=16,
              max_num_batched_tokens=512, max_num_seqs=64)
    engine = llm.engine
    samples = []

    def run(prompts: list[list[int]], max_tokens: int, keep) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for p in prompts:
            engine.add_request(p, params)
        while engine.has_unfinished_requests():
            engine.step()
            rec = engine.last_step.instances[0]
            if keep(rec):
                samples.append((rec.num_seqs, rec.num_tokens, rec.seconds))

    run([[100 + i] * 40 for i in range(4)], 4, lambda r: False)  # warm-up
    for b in DECODE_BATCHES:
        run([[100 + i] * 200 for i in range(b)], 12,
            lambda r, b=b: r.num_seqs == b and r.num_tokens == b)
        log(f"  decode batch {b}: {len([s for s in samples if s[0] == b])} steps")
    for t in PREFILL_TOKENS:
        for _ in range(5):
            run([[300] * t], 1, lambda r, t=t: r.num_tokens == t)
        log(f"  prefill {t}: measured")
    llm.shutdown()
    return samples, engine.arch


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
    from infinillm.sim.cost import CostModel

    if threads:
        torch.set_num_threads(threads)
    arch = load_arch(resolve_model_path(model))
    log("calibrating: GEMM rates")
    rates = measure_gemm(arch)
    peak = max(rates.values())
    log("calibrating: memory bandwidth, attention")
    bandwidth = measure_copy_bandwidth()
    per_key, per_call = measure_attention(arch)
    kv_token_bytes = 2 * arch.num_kv_heads * arch.head_dim * 4
    profile = DeviceProfile(
        name=CPU_PROFILE_NAME, memory_bytes=0, peak_flops=peak, memory_bandwidth=bandwidth,
        gemm_efficiency=tuple((m, r / peak) for m, r in sorted(rates.items())),
        memory_efficiency=1.0, attention_bandwidth=kv_token_bytes / per_key,
        attention_call_s=per_call, gpus_per_node=1 << 20, intra_node_bandwidth=bandwidth,
        intra_node_latency_s=0.0, inter_node_bandwidth=bandwidth, inter_node_latency_s=0.0,
        step_overhead_s=0.0, seq_overhead_s=0.0, layer_overhead_s=0.0,
        gpu_memory_utilization=1.0, activation_reserve_bytes=0)
    log("calibrating: engine steps (host overheads)")
    samples, _ = _engine_steps(model, log)
    cost = CostModel(arch, 4, 16, profile)
    rows, ys = [], []
    for seqs, tokens, seconds in samples:
        # decode steps: `seqs` requests of ~200 context; prefill: one request of `tokens`
        context = 206 if seqs == tokens else tokens
        modelled = cost.linear_seconds(tokens, seqs) + _attention(cost, seqs, tokens, context)
        rows.append([1.0, float(seqs), float(tokens)])
        ys.append(seconds - modelled)
    per_step, per_seq, per_token = _lstsq_nonneg(rows, ys)
    log("calibrating: exchange between instances")
    exchange = _exchange_seconds(model, arch)
    profile = dataclasses.replace(
        profile, step_overhead_s=per_step, seq_overhead_s=per_seq, token_overhead_s=per_token,
        intra_node_latency_s=exchange / 2, inter_node_latency_s=exchange / 2,
        sources={"measured_on": _machine(), "threads": str(torch.get_num_threads()),
                 "model": str(resolve_model_path(model))})
    path = Path(output).expanduser() if output else default_cpu_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_json())
    return path


def _attention(cost, seqs: int, tokens: int, context: int) -> float:
    from infinillm.sim.cost import AttentionWork

    a = cost.arch
    rows = tokens // seqs
    work = AttentionWork(kv_bytes=seqs * context * cost.kv_token_bytes,
                         flops=seqs * 4 * a.num_heads * a.head_dim * rows * (rows + 1) / 2
                         if rows > 1 else seqs * 4 * a.num_heads * a.head_dim * context,
                         calls=seqs, max_rows=rows)
    return cost.attention_seconds(work)


def _machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
