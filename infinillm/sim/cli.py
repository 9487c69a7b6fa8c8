"""`infinillm simulate` and `infinillm calibrate`: the simulator on the command line.

    infinillm simulate --model llama2-13b --device a100-80gb --instances 32 --trace mixed \\
        --policy lending --num-requests 1000 --rate 8 --seed 0 [--longest-context] [--json]
    infinillm calibrate [--model PATH] [--output FILE]

A bad name (model, device, trace, policy) is one line naming the valid ones and exit status 2,
like every user error of the command line (cli.py turns ValueError into that).
"""

from __future__ import annotations

import argparse
import json
import sys

SLO_TTFT_S = 10.0
SLO_TPOT_S = 0.2


def add_simulate_parser(sub) -> None:
    p = sub.add_parser(
        "simulate", help="run a trace on a simulated GPU cluster (no model, simulated time)",
        description="Run a request trace on a simulated cluster: the real router, schedulers, "
                    "ledger and recall over a cost model of the model's shapes on a device "
                    "profile. Every figure is modelled, not measured (docs/simulation.md).")
    p.add_argument("--model", default="llama2-13b",
                   help="a preset (llama2-7b, llama2-13b, llama2-70b, llama3-8b, llama3-70b) or "
                        "a folder with a config.json (default: llama2-13b)")
    p.add_argument("--device", default="a100-80gb",
                   help="a100-80gb, h100-80gb, h200-141gb, cpu (after `infinillm calibrate`) "
                        "or a profile .json file (default: a100-80gb)")
    p.add_argument("--instances", type=int, default=8,
                   help="devices; with --policy single, one instance tensor parallel over all "
                        "(default: 8)")
    p.add_argument("--trace", default="mixed",
                   help="short, long, mixed, or a .jsonl file of {arrival_s, prompt_tokens, "
                        "output_tokens} lines (default: mixed)")
    p.add_argument("--policy", default="lending",
                   help="lending (reactive), proactive (lending with proactive placement), "
                        "multi or single (default: lending)")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests to generate (default: 1000; for a file, all of it)")
    p.add_argument("--rate", type=float, default=None,
                   help="Poisson arrivals, requests/s (default: 4 for a generated trace; a "
                        "file carries its own arrival times)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, default=SLO_TTFT_S,
                   help=f"goodput's TTFT target in seconds (default: {SLO_TTFT_S})")
    p.add_argument("--slo-tpot", type=float, default=SLO_TPOT_S,
                   help=f"goodput's TPOT target in seconds (default: {SLO_TPOT_S})")
    p.add_argument("--dtype", default="bfloat16",
                   help="weights and KV precision: bfloat16, float16 or float32 "
                        "(default: bfloat16)")
    p.add_argument("--kv-blocks-per-instance", type=int, default=None,
                   help="KV blocks per instance (default: what the device's memory holds "
                        "after the weights)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--longest-context", action="store_true",
                   help="also find the longest prompt the cluster serves")
    p.add_argument("--check-integrity", action="store_true",
                   help="check pools, tables and ledger after every step (slow)")
    p.add_argument("--json", action="store_true", help="print one JSON line last")


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="measure this machine into the simulator's `cpu` device profile",
        description="Measure this machine's GEMM rates (at the model's layer shapes), memory "
                    "bandwidth, attention cost per key, the in-process exchange latency and "
                    "the engine's per-step overheads; write them as a device profile.")
    p.add_argument("--model", default=None,
                   help="model folder whose shapes to measure (default: the embedded model)")
    p.add_argument("--output", default=None,
                   help="profile file (default: the cache's sim/cpu-profile.json, which "
                        "--device cpu reads)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run_simulate(args: argparse.Namespace) -> int:
    from infinillm.engine.builder import TORCH_DTYPES
    from infinillm.sim.devices import load_profile, profile_names
    from infinillm.sim.models import sim_model_folder
    from infinillm.sim.run import POLICIES, SimSetup, longest_context, simulate
    from infinillm.sim.traces import resolve_trace

    if args.dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {args.dtype!r}; valid: {', '.join(TORCH_DTYPES)}")
    if args.policy not in POLICIES:
        raise ValueError(f"unknown policy {args.policy!r}; valid: {', '.join(POLICIES)}")
    sim_model_folder(args.model)  # a bad model name fails before anything runs
    try:
        profile = load_profile(args.device)
    except ValueError as e:
        if args.device in profile_names():
            raise
        raise ValueError(f"unknown device {args.device!r}; valid: {', '.join(profile_names())} "
                         "or a profile .json file") from e
    is_file = args.trace.endswith(".jsonl")
    num = args.num_requests if args.num_requests is not None or is_file else 1000
    rate = args.rate if args.rate is not None or is_file else 4.0
    trace = resolve_trace(args.trace, num, rate, args.seed, None)
    setup = SimSetup(model=args.model, device=args.device, instances=args.instances,
                     policy=args.policy, dtype=args.dtype, block_size=args.block_size,
                     kv_blocks_per_instance=args.kv_blocks_per_instance,
                     max_num_seqs=args.max_num_seqs,
                     max_num_batched_tokens=args.max_num_batched_tokens, profile=profile)
    result = {"trace": args.trace, "rate": rate, "seed": args.seed}
    result.update(simulate(setup, trace, slo=(args.slo_ttft, args.slo_tpot),
                           progress=sys.stderr.isatty(), check_integrity=args.check_integrity))
    result["longest_context_tokens"] = None
    if args.longest_context:
        result.update(longest_context(setup))
    _print_table(result)
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


def _print_table(r: dict) -> None:
    def fmt(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    print(f"simulated (modelled, not measured): {r['model']} on {r['instances']} x "
          f"{r['device']}, policy {r['policy']}, trace {r['trace']} at {fmt(r['rate'])} req/s")
    rows = [("requests completed / refused / cut short",
             f"{r['completed']} / {r['refused']} / {r['cut_short']} of {r['requests']}"),
            ("output tokens/s", fmt(r["output_tokens_per_s"])),
            ("total tokens/s", fmt(r["total_tokens_per_s"])),
            ("goodput tokens/s (SLO)", fmt(r.get("goodput_tokens_per_s"))),
            ("SLO attainment", fmt(r.get("slo_attainment"))),
            ("TTFT p50 / p99 s", f"{fmt(r['ttft_p50_s'])} / {fmt(r['ttft_p99_s'])}"),
            ("TPOT p50 / p99 s", f"{fmt(r['tpot_p50_s'])} / {fmt(r['tpot_p99_s'])}"),
            ("preemptions", fmt(r["preemptions"])),
            ("block moves", fmt(r["block_moves"])),
            ("KV blocks per instance", fmt(r["kv_blocks_per_instance"])),
            ("longest context tokens", fmt(r["longest_context_tokens"])),
            ("simulated s / wall s", f"{fmt(r['simulated_s'])} / {fmt(r['wall_s'])}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def run_calibrate(args: argparse.Namespace) -> int:
    from infinillm.sim.calibrate import calibrate

    path = calibrate(args.model, args.output, args.threads, log=print)
    print(f"wrote {path}")
    return 0
