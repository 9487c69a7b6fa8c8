"""Run a trace on a simulated cluster: the engine of `infinillm simulate`.

    setup = SimSetup(model="llama2-13b", device="a100-80gb", instances=32, policy="lending")
    result = simulate(setup, make_trace("mixed", 1000, rate=8.0, seed=0), slo=(10.0, 0.2))

Policies (the paper's systems, same devices each):
- `lending`: `instances` instances, one device each, pooling KV (borrowing, DistAttention,
  recall);
- `multi`: the same instances, each keeping its KV to itself ("vLLM-multi"). As in the paper's
  baseline, they are independent servers (`independent=True`): one engine each, on its own
  clock, a new request routed by the engine's own rule (`intake.route`) to the one with the
  most free blocks net of its queue. With `independent=False` they are one engine with lending
  off, whose instances step together (the cluster step is synchronous, as in this engine, so
  a long prefill on one instance holds up the decodes of all): what `LLM(lending=False)` runs;
- `single`: one instance over all the devices, tensor parallel ("vLLM-single"): its pool is
  all their memory after one copy of the weights, its steps pay the all-reduces.

Every request is sent greedy with `ignore_eos` and `max_tokens` = its trace output length, so it
ends after exactly that many tokens unless the engine ends it early (a request that outgrows
what it may hold ends with "length": it counts as cut short, not completed). A request the
engine refuses at admission (longer than the cluster can hold) counts as refused. Times are
simulated seconds on the engine's virtual clock; TTFT = first token - arrival, TPOT = (end -
first token) / (tokens - 1); percentiles are nearest rank. Goodput counts the output tokens of
completed requests within the SLO (TTFT and TPOT).

Throughput comes two ways. `output_tokens_per_s` (and goodput) is over the whole run, first
arrival to last finish; its end is a drain where the last requests run alone, and with the
traces' heavy-tailed output lengths that drain can be most of a short run. The `loaded_*`
figures count only the output tokens produced while requests still arrive (first to last
arrival; a request's tokens taken as produced evenly from its first token to its end), over
that span: the throughput of the cluster under the offered load, without the drain (they still
include the ramp up from an empty cluster at the start).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from infinillm.config import Config
from infinillm.engine import ClusterEngine, VirtualClock
from infinillm.engine.builder import TORCH_DTYPES
from infinillm.sim.cost import CostModel
from infinillm.sim.devices import DeviceProfile, load_profile
from infinillm.sim.executor import SimExecutor
from infinillm.sim.models import sim_model_folder
from infinillm.sim.traces import TraceRequest, percentile
from infinillm.types import SamplingParams

POLICIES = ("lending", "multi", "single")


@dataclass(frozen=True, slots=True)
class SimSetup:
    model: str = "llama2-13b"
    device: str = "a100-80gb"  # a preset, "cpu", or a profile .json file
    instances: int = 8  # devices; `single` makes one tensor-parallel instance of them all
    policy: str = "lending"
    dtype: str = "bfloat16"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_blocks_per_instance: int | None = None  # None: what the device's memory holds
    concurrent: bool = True  # False: every instance on one device, one after another
    independent: bool = True  # multi only: separate engines (True) or one lockstep engine
    profile: DeviceProfile | None = None  # overrides `device` (e.g. a calibrated profile)
    extra: dict = field(default_factory=dict)  # more engine settings (LLM keywords)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; valid: {', '.join(POLICIES)}")
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")


def build_sim_engine(setup: SimSetup) -> ClusterEngine:
    """A ClusterEngine on a VirtualClock whose executor is a SimExecutor."""
    profile = setup.profile or load_profile(setup.device)
    folder = sim_model_folder(setup.model)
    single = setup.policy == "single"
    num_instances, tp = (1, setup.instances) if single else (setup.instances, 1)
    blocks = setup.kv_blocks_per_instance
    if blocks is None:
        from infinillm.model import load_arch

        cost = CostModel(load_arch(folder), TORCH_DTYPES[setup.dtype].itemsize,
                         setup.block_size, profile, tp)
        blocks = cost.kv_blocks()
    elif single:
        blocks *= setup.instances
    config = Config.from_kwargs(
        model=str(folder), executor="sim", sim_device=profile.name, dtype=setup.dtype,
        num_instances=num_instances, lending=setup.policy == "lending",
        block_size=setup.block_size, kv_blocks_per_instance=blocks,
        max_num_seqs=setup.max_num_seqs, max_num_batched_tokens=setup.max_num_batched_tokens,
        **setup.extra)

    def factory(config, spec, ids):
        return SimExecutor(config, spec, ids, profile=profile, tensor_parallel=tp,
                           concurrent=setup.concurrent)

    return ClusterEngine.from_config(config, VirtualClock(), factory)


@dataclass(slots=True)
class Record:
    """One request of a simulated run (simulated seconds)."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # asked for
    first_token_s: float | None = None
    end_s: float | None = None
    num_tokens: int = 0  # produced
    refused: bool = False

    @property
    def completed(self) -> bool:
        return self.end_s is not None and self.num_tokens == self.output_tokens

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.end_s is None or self.num_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.num_tokens - 1)


def run_trace(engine: ClusterEngine, trace: Sequence[TraceRequest], *,
              check_integrity: bool = False,
              on_step: Callable[[ClusterEngine], None] | None = None,
              progress: bool = False) -> list[Record]:
    """Serve `trace` on `engine` in simulated time: each request added when the clock reaches
    its arrival (at a step boundary), the clock skipped ahead while the cluster is idle."""
    clock = engine.clock
    if not isinstance(clock, VirtualClock):
        raise ValueError("run_trace needs an engine on a VirtualClock")
    records = [Record(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace]
    by_id: dict[str, Record] = {}
    bar = _progress(len(trace), progress)
    start = clock.now()
    next_i = 0
    while next_i < len(records) or engine.has_unfinished_requests():
        now = clock.now() - start
        while next_i < len(records) and records[next_i].arrival_s <= now:
            rec = records[next_i]
            next_i += 1
            rid = _admit(engine, rec, bar)
            if rid is not None:
                by_id[rid] = rec
        if not engine.has_unfinished_requests():
            if next_i < len(records):
                clock.sleep(records[next_i].arrival_s - now)
            continue
        outputs = engine.step()
        _note(outputs, lambda rid: by_id[rid], clock.now() - start, bar)
        if check_integrity:
            engine.check_integrity()
        if on_step is not None:
            on_step(engine)
    bar.close()
    return records


def _admit(engine: ClusterEngine, rec: Record, bar) -> str | None:
    """Add a trace request (greedy, `ignore_eos`, its output length as `max_tokens`); None, and
    the record marked refused, when the engine refuses it at admission."""
    params = SamplingParams(max_tokens=rec.output_tokens, temperature=0.0, ignore_eos=True)
    try:
        return engine.add_request([engine.arch.vocab_size - 1] * rec.prompt_tokens, params)
    except ValueError:
        rec.refused = True
        bar.update(1)
        return None


def _note(outputs, record_of: Callable[[str], Record], now: float, bar) -> None:
    """Stamp one step's outputs on their records: the first token, and the end."""
    for out in outputs:
        rec = record_of(out.request_id)
        if rec.first_token_s is None:
            rec.first_token_s = now
        if out.finished:
            rec.end_s = now
            rec.num_tokens = len(out.outputs[0].token_ids)
            bar.update(1)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="simulating", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def summarize(records: Sequence[Record], slo: tuple[float, float] | None = None) -> dict:
    """The figures of a run (simulated seconds), JSON-ready."""
    done = [r for r in records if r.completed]
    duration = max((r.end_s for r in records if r.end_s is not None), default=0.0)
    output = sum(r.num_tokens for r in done)
    total = output + sum(r.prompt_tokens for r in done)
    ttft = [r.ttft_s for r in done]
    tpot = [r.tpot_s for r in done if r.tpot_s is not None]
    out = {
        "requests": len(records),
        "completed": len(done),
        "refused": sum(r.refused for r in records),
        "cut_short": sum(1 for r in records if r.end_s is not None and not r.completed),
        "output_tokens_per_s": output / duration if duration else 0.0,
        "total_tokens_per_s": total / duration if duration else 0.0,
        "requests_per_s": len(done) / duration if duration else 0.0,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
        "simulated_s": duration,
    }
    if slo is not None:
        good = [r for r in done if r.ttft_s <= slo[0]
                and (r.tpot_s is None or r.tpot_s <= slo[1])]
        out["goodput_tokens_per_s"] = (sum(r.num_tokens for r in good) / duration
                                       if duration else 0.0)
        out["slo_attainment"] = len(good) / len(records) if records else 0.0
        out["loaded_goodput_tokens_per_s"] = _loaded_rate(good, records)
    out["loaded_output_tokens_per_s"] = _loaded_rate(done, records)
    return out


def _loaded_rate(counted: Sequence[Record], records: Sequence[Record]) -> float | None:
    """Output tokens/s of `counted` produced between the first and the last arrival of
    `records` (each request's tokens spread evenly from its first token to its end); None when
    every request arrives at once."""
    if not records:
        return None
    start = min(r.arrival_s for r in records)
    end = max(r.arrival_s for r in records)
    if end <= start:
        return None
    return sum(_tokens_by(r, end) for r in counted) / (end - start)


def _tokens_by(r: Record, t: float) -> float:
    """The tokens of a finished request `r` produced by time t (module docstring)."""
    if r.first_token_s is None or r.first_token_s > t:
        return 0.0
    if r.end_s <= t:
        return float(r.num_tokens)
    return 1 + (r.num_tokens - 1) * (t - r.first_token_s) / (r.end_s - r.first_token_s)


def simulate(setup: SimSetup, trace: Sequence[TraceRequest], *,
             slo: tuple[float, float] | None = None, progress: bool = False,
             check_integrity: bool = False) -> dict:
    """Build the engine for `setup`, serve `trace`, and summarize (with the engine's counters:
    preemptions, block moves, remote traffic, and the pools' state at the end)."""
    started = time.perf_counter()
    if independent_instances(setup):
        engines = [build_sim_engine(dataclasses.replace(setup, instances=1))
                   for _ in range(setup.instances)]
        records = run_independent(engines, trace, progress=progress,
                                  check_integrity=check_integrity)
    else:
        engines = [build_sim_engine(setup)]
        records = run_trace(engines[0], trace, progress=progress,
                            check_integrity=check_integrity)
    stats = [e.cluster_stats() for e in engines]
    leaked = [i for st in stats for i in st["instances"] if i["free_blocks"] != i["total_blocks"]]
    if leaked:
        raise RuntimeError(f"pools not whole after the run: {leaked}")
    out = {"policy": setup.policy, "instances": setup.instances, "model": setup.model,
           "device": setup.profile.name if setup.profile else setup.device}
    out.update(summarize(records, slo))
    out.update(preemptions=sum(st["preemptions"] for st in stats),
               block_moves=sum(st["migrations"] for st in stats),
               remote_attention_calls=sum(st["remote_attention_calls"] for st in stats),
               remote_bytes=sum(st["remote_bytes"] for st in stats),
               steps=sum(e.num_steps for e in engines),
               kv_blocks_per_instance=engines[0].num_blocks_per_instance,
               wall_s=time.perf_counter() - started)
    return out


def independent_instances(setup: SimSetup) -> bool:
    """`multi` as separate servers: several instances, on devices of their own."""
    return (setup.policy == "multi" and setup.independent and setup.concurrent
            and setup.instances > 1)


def run_independent(engines: Sequence[ClusterEngine], trace: Sequence[TraceRequest], *,
                    check_integrity: bool = False, progress: bool = False) -> list[Record]:
    """Serve `trace` on separate one-instance engines, each on its own virtual clock (a
    discrete-event loop): the next event is the earliest of the next arrival and the next step
    of a busy engine. An arrival goes to the engine the router picks (`intake.route` over their
    instances) and joins at that engine's next step; an idle engine first waits for it."""
    from infinillm.engine.intake import route

    records = [Record(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace]
    by_id: dict[tuple[int, str], Record] = {}
    by_instance = {id(e.instances[0]): e for e in engines}
    bar = _progress(len(trace), progress)
    next_i = 0
    while True:
        busy = [e for e in engines if e.has_unfinished_requests()]
        stepper = min(busy, key=lambda e: e.clock.now(), default=None)
        if next_i < len(records) and (stepper is None
                                      or records[next_i].arrival_s <= stepper.clock.now()):
            rec = records[next_i]
            next_i += 1
            engine = by_instance[id(route([e.instances[0] for e in engines]))]
            if not engine.has_unfinished_requests() and engine.clock.now() < rec.arrival_s:
                engine.clock.sleep(rec.arrival_s - engine.clock.now())
            rid = _admit(engine, rec, bar)
            if rid is not None:
                by_id[id(engine), rid] = rec
            continue
        if stepper is None:
            break
        outputs = stepper.step()
        _note(outputs, lambda rid, e=stepper: by_id[id(e), rid], stepper.clock.now(), bar)
        if check_integrity:
            stepper.check_integrity()
    bar.close()
    return records


def longest_context(setup: SimSetup, serve: bool = True) -> dict:
    """The longest prompt the cluster admits (bisection on the engine's admission check), and
    whether it is then served to its first token (prefill across the cluster, one output)."""
    engine = build_sim_engine(setup)
    token = engine.arch.vocab_size - 1
    # admitted(lo) holds (or lo == 0); admitted(hi) does not: no request gets more blocks than
    # its owner's pool plus what the others may lend
    lo = 0
    hi = min(engine.max_model_len, engine.max_blocks_per_request * setup.block_size + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            engine.prepare([token] * mid)
            lo = mid
        except ValueError:
            hi = mid
    out = {"longest_context_tokens": lo, "served": None}
    if serve and lo:
        records = run_trace(engine, [TraceRequest(0.0, lo, 1)])
        out["served"] = records[0].completed
        out["prefill_s"] = records[0].ttft_s
    return out
