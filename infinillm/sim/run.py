"""Run a trace on a simulated cluster: the engine of `infinillm simulate`.

    setup = SimSetup(model="llama2-13b", device="a100-80gb", instances=32, policy="lending")
    result = simulate(setup, make_trace("mixed", 1000, rate=8.0, seed=0), slo=(10.0, 0.2))

Policies (the paper's systems, same devices each):
- `lending`: `instances` instances, one device each, pooling KV reactively (borrowing,
  DistAttention, recall);
- `proactive`: the same pool under proactive placement (`placement="proactive"`: admission
  local first, KV moved off instances whose queue
  cannot start, by fitted step-time models; cluster/placement.py);
- `multi`: the same instances, each keeping its KV to itself ("vLLM-multi"), a new request
  routed by the engine's own rule (`intake.route`) to the one with the most free blocks net of
  its queue: as in the paper's baseline, independent servers;
- `single`: one instance over all the devices, tensor parallel ("vLLM-single"): its pool is
  all their memory after one copy of the weights, its steps pay the all-reduces.

Time. By default every instance steps on its own timeline (`run_async`): an instance is coupled
to another only by the attention it asks of it (which delays the holder) and by the ledger, as
instances on devices of their own would be. `lockstep=True` runs the engine's synchronous
cluster step instead (`run_trace`): every instance waits for the slowest, so a long prefill on
one holds up the decodes of all, which is how `LLM` steps its instances today.

Prefix caching is off here (unless `extra` turns it on): a trace gives lengths, and the prompt
that stands in for each is one repeated token, so every request would hit the cache.

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

POLICIES = ("lending", "proactive", "multi", "single")


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
    lockstep: bool = False  # True: one synchronous cluster step (as the real engine runs)
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
        num_instances=num_instances, lending=setup.policy in ("lending", "proactive"),
        placement="proactive" if setup.policy == "proactive" else "reactive",
        block_size=setup.block_size, kv_blocks_per_instance=blocks,
        max_num_seqs=setup.max_num_seqs, max_num_batched_tokens=setup.max_num_batched_tokens,
        **{"enable_prefix_caching": False, **setup.extra})

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
    clock = _virtual_clock(engine)
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


def _virtual_clock(engine: ClusterEngine) -> VirtualClock:
    if not isinstance(engine.clock, VirtualClock):
        raise ValueError("a simulated run needs an engine on a VirtualClock")
    return engine.clock


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
    engine = build_sim_engine(setup)
    loop = run_async if asynchronous(setup) else run_trace
    records = loop(engine, trace, progress=progress, check_integrity=check_integrity)
    stats = engine.cluster_stats()
    leaked = [i for i in stats["instances"] if i["free_blocks"] != i["total_blocks"]]
    if leaked:
        raise RuntimeError(f"pools not whole after the run: {leaked}")
    out = {"policy": setup.policy, "instances": setup.instances, "model": setup.model,
           "device": setup.profile.name if setup.profile else setup.device}
    out.update(summarize(records, slo))
    out.update(preemptions=stats["preemptions"], block_moves=stats["migrations"],
               remote_attention_calls=stats["remote_attention_calls"],
               remote_bytes=stats["remote_bytes"], steps=engine.num_steps,
               kv_blocks_per_instance=engine.num_blocks_per_instance,
               wall_s=time.perf_counter() - started)
    return out


def asynchronous(setup: SimSetup) -> bool:
    """Instances on timelines of their own: several of them, each on a device of its own."""
    return not setup.lockstep and setup.concurrent and setup.instances > 1 \
        and setup.policy != "single"


def run_async(engine: ClusterEngine, trace: Sequence[TraceRequest], *,
              check_integrity: bool = False, progress: bool = False) -> list[Record]:
    """Serve `trace` with every instance on its own timeline (a discrete-event loop): the next
    event is the earliest of the next arrival and the next step of a busy instance, which then
    steps alone (`engine.step([i])`). The engine's rules are unchanged: an arrival is routed by
    the engine, borrowing and moves go through the same ledger at the moment they happen.

    What an instance's step costs is its own time; the attention it asks of holders delays each
    holder's next step by the holder's share (served between the holder's own layers: the wait
    for a busy holder's current layer is not modelled), and the block moves planned before a
    step delay the instance that steps. An instance that could run nothing waits for the next
    event elsewhere; when every busy instance is in that state the engine's standstill rule
    decides, as in a synchronous step."""
    clock = _virtual_clock(engine)
    records = [Record(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace]
    by_id: dict[str, Record] = {}
    ready = {i.instance_id: clock.now() for i in engine.instances}
    order = dict.fromkeys(ready, 0)  # steps taken: equal times go round in turn
    bar = _progress(len(trace), progress)
    start = clock.now()
    next_i = 0
    while True:
        busy = [i.instance_id for i in engine.instances if i.scheduler.num_unfinished]
        stepper = min(busy, key=lambda i: (ready[i], order[i]), default=None)
        if next_i < len(records) and (stepper is None or
                                      start + records[next_i].arrival_s <= ready[stepper]):
            rec = records[next_i]
            next_i += 1
            clock.advance(max(0.0, start + rec.arrival_s - clock.now()))
            rid = _admit(engine, rec, bar)
            if rid is not None:
                by_id[rid] = rec
                owner = engine.streams[rid].request.instance_id
                ready[owner] = max(ready[owner], clock.now())
            continue
        if stepper is None:
            break
        clock.advance(ready[stepper] - clock.now())
        t = clock.now()
        outputs = engine.step([stepper])
        costs = engine.executor.last_costs
        own = costs.get(stepper)
        for holder, cost in costs.items():
            if holder != stepper and holder in ready:
                ready[holder] = max(ready[holder], t) + cost.seconds
        order[stepper] += 1
        if own is not None:
            ready[stepper] = t + engine.last_move_seconds + own.seconds
        else:  # ran nothing: wait for the next event elsewhere (or the standstill rule)
            later = [ready[i] for i in busy if i != stepper and ready[i] > t]
            if next_i < len(records):
                later.append(start + records[next_i].arrival_s)
            ready[stepper] = max(t + engine.last_move_seconds, min(later, default=t))
        _note(outputs, by_id.__getitem__, ready[stepper] - start, bar)
        if check_integrity:
            engine.check_integrity()
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
