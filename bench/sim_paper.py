"""The paper's experiments on the simulated cluster, each beside the paper's number. Every figure
here is MODELLED (infinillm.sim: the real control plane on a cost model of the GPUs), not measured.

    python -m bench.sim_paper [--quick] [--experiments context,rates] [--jobs 2]
        [--context-models llama2-7b,llama2-13b] [--context-instances 1,2,4,8,16,32]
        [--serve-max-instances 8 | --no-serve]
        [--model llama2-13b] [--device a100-80gb] [--instances 8,32] [--traces short,long,mixed]
        [--window-s 25] [--min-requests 100] [--num-requests N] [--rates 1,2,4 | --max-rates 8]
        [--slo-ttft 10] [--slo-tpot 0.2] [--slo-attainment 0.9] [--seed 0] [--no-plots]

Policies (infinillm.sim.run): `lending` = N instances, one GPU each, pooling KV (the paper's
system); `multi` = the same N instances keeping their KV to themselves ("vLLM-multi"); `single`
= one instance tensor parallel over all N GPUs ("vLLM-single"). All run the engine's defaults
(max_num_seqs 256 per instance, so `single` batches at most 256 requests over all N GPUs).

1. Longest context vs instances (`context`): for each of --context-models on --device and each
   N of --context-instances, the longest prompt each policy admits (bisection on the engine's
   admission check, `longest_context`). `multi` is what one request can get without pooling
   (one instance's pool, whatever N); `lending` pools every pool (minus the `max_lent_fraction`
   each lender keeps, so 1 + 0.9 (N - 1) pools); `single` is all N GPUs' memory after one copy
   of the weights. The longest prompt is then served to its first token (a prefill across the
   cluster) where N <= --serve-max-instances: serving costs wall time that grows faster than N
   (measured on 2 cores, llama2-7b: lending 5 s at 4 instances, 30 s at 8; single 2.4 s and
   9 s; extrapolated lending ~3 min at 16 and ~15 min at 32), so larger N report admission
   only ("served" = None). Ratio: lending / multi. Paper (v1): up to 1.9M tokens on 32
   A100-80GB with LLaMA2, 2-19x longer context than vLLM.
2. Throughput and goodput vs rate (`rates`): --model on --device, for each trace of --traces
   (infinillm.sim.traces: short = ShareGPT-like, long = L-Eval-like, mixed = 90 % short, 10 %
   long) and each N of --instances, every policy on the same seeded trace at the same rates.
   Requests per trace: a rough analytic capacity of N instances (`capacity_estimate`: prefill
   plus batched decode per request at the trace's mean lengths, from the cost model) x
   --window-s, at least --min-requests (or --num-requests for every cell): at that capacity
   the arrivals span --window-s seconds, whatever the trace. The rate grid starts at a quarter
   of the estimate and doubles until the best policy's output throughput grows < 5 % over the
   previous rate, or every policy's SLO attainment is < 0.5; when already the first rate has
   every policy below 0.5 (the estimate ignores queueing and the cost of long requests,
   so it can be far too high), it halves instead until some policy meets the SLO; at most
   --max-rates rates (--rates: a fixed grid instead).
   Per run: everything `simulate` returns: output and total tokens/s over the whole run (first
   arrival to last finish), `loaded_output_tokens_per_s` (the output tokens produced while
   requests still arrive, over that span: without the drain at the end, where with the
   traces' heavy-tailed output lengths a few long requests can run alone for minutes; it
   still includes the ramp up from an empty cluster), goodput (output tokens/s of the requests
   within the SLO, over the run and loaded), SLO attainment (share of all requests within
   it), TTFT/TPOT p50/p99 (nearest rank), completed, refused at admission, cut short,
   preemptions, block moves, simulated and wall seconds. Per (trace, N) and policy: the
   sustained rate (the highest rate of the grid with SLO attainment >= --slo-attainment; None
   if none), the peak output throughput and peak goodput over the grid (loaded, and over the
   run: `_run`); the ratios lending / multi and lending / single at the peaks (each policy's
   own peak) and at every rate. The grid's stopping rule reads the loaded output throughput.
   Paper: v2 1.35-1.73x over vLLM-multi on short traces, 1.4-3.4x over one big vLLM instance
   (single) on long traces; v1 1.03-2.4x end-to-end throughput.

Runs are independent and run in a process pool of --jobs processes (1: in this process;
bench.lib.sim_runs); a line per finished run with its wall time. The defaults are the
documented full configuration, sized for 15-20 min on 2 cores (estimated from one timed run:
32 instances, lending, mixed trace, 1,340 requests: 23 s; wall time grows with the requests'
output tokens, ~40 us each, and with steps x instances, ~26 us each; the short trace at 32
instances, ~5,000 requests a run, is about two thirds of it); --quick is a smoke test (2 and 4
instances, 60 requests, 2 rates, context up to 4 instances; 90 s). Writes
bench/results/sim_paper.json and, in --img-dir (docs/img), sim_longest_context.png,
sim_throughput_vs_rate.png and sim_goodput_vs_rate.png; prints tables, the total wall time
and, last, one JSON line (the file's content).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.sim_runs import (
    METRICS,
    POLICIES,
    Job,
    RateSweep,
    capacity_estimate,
    fmt,
    run_jobs,
)

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    "full": {"context_instances": "1,2,4,8,16,32", "instances": "8,32", "max_rates": 8,
             "num_requests": None, "serve_max_instances": 8},
    "quick": {"context_instances": "1,2,4", "instances": "2,4", "max_rates": 2,
              "num_requests": 60, "serve_max_instances": 4},
}
# The paper's figures (PAPER.md), printed beside ours: (low, high) ratio, against which policy.
PAPER_RATES = {
    "short": ((1.35, 1.73), "multi", "v2: 1.35-1.73x over vLLM-multi (short traces)"),
    "long": ((1.4, 3.4), "single", "v2: 1.4-3.4x over vLLM-single (long traces)"),
    "mixed": ((1.03, 2.4), None, "v1: 1.03-2.4x end-to-end throughput over vLLM"),
}
PAPER_CONTEXT = {"max_tokens": 1_900_000, "instances": 32,
                 "text": "v1: up to 1.9M tokens on 32 A100-80GB (LLaMA2); 2-19x longer "
                         "context than vLLM, 2 to 32 instances"}


# ---- experiment 1: longest context ------------------------------------------------------


def context_jobs(models: Iterable[str], device: str, instances: Iterable[int],
                 serve_max_instances: int) -> list[Job]:
    return [Job("context", m, device, n, p, serve=n <= serve_max_instances)
            for m in models for n in instances for p in POLICIES]


def context_rows(results: list[dict]) -> list[dict]:
    """A row per (model, instances, policy), with lending / multi beside every policy's row."""
    by_key = {(r["model"], r["instances"], r["policy"]): r for r in results}
    rows = []
    for (model, n, policy), r in sorted(by_key.items(), key=lambda kv: (
            kv[0][0], kv[0][1], POLICIES.index(kv[0][2]))):
        multi = by_key.get((model, n, "multi"))
        tokens = r["longest_context_tokens"]
        rows.append({"model": model, "instances": n, "policy": policy,
                     "longest_tokens": tokens, "served": r["served"],
                     "prefill_s": r.get("prefill_s"),
                     "ratio_vs_multi": _ratio(tokens, multi and multi["longest_context_tokens"]),
                     "paper": _paper_context(n, policy)})
    return rows


def _paper_context(instances: int, policy: str) -> str:
    if policy != "lending":
        return ""
    if instances == PAPER_CONTEXT["instances"]:
        return "1.9M tokens; 2-19x (v1)"
    return "2-19x vs vLLM (v1, 2-32 inst.)" if instances >= 2 else ""


# ---- experiment 2: throughput and goodput vs rate ---------------------------------------


def summarize_sweep(sweep: RateSweep, attainment: float) -> dict:
    """Sustained rate and peaks per policy, ratios at the peaks and at every rate, and the
    paper's figure for the trace."""
    runs = sweep.results()
    rates = sorted({r["rate"] for r in runs})
    policies = {}
    for p in POLICIES:
        rs = [r for r in runs if r["policy"] == p]
        ok = [r["rate"] for r in rs if r["slo_attainment"] >= attainment]
        policies[p] = {"sustained_rate": max(ok) if ok else None}
        for name, key in METRICS.items():
            top = max(rs, key=lambda r, key=key: r[key] or 0.0)
            policies[p][f"peak_{name}"] = top[key]
            policies[p][f"peak_{name}_rate"] = top["rate"]
    by_rate = {(r["rate"], r["policy"]): r for r in runs}
    per_rate = [{"rate": rate, **_ratios(lambda p, name, rate=rate: by_rate[
        rate, p][METRICS[name]])} for rate in rates]
    claim = PAPER_RATES[sweep.trace]
    return {"trace": sweep.trace, "instances": sweep.instances, "rates": rates,
            "num_requests": sweep.template.num_requests, "stop_reason": sweep.stop_reason,
            "policies": policies,
            "peak_ratios": _ratios(lambda p, name: policies[p][f"peak_{name}"]),
            "per_rate_ratios": per_rate,
            "paper": {"range": list(claim[0]), "versus": claim[1], "text": claim[2]}}


RATIOS = (("lending", "multi"), ("lending", "single"), ("proactive", "multi"),
          ("proactive", "single"), ("proactive", "lending"))


def _ratios(value: Callable[[str, str], float | None]) -> dict:
    """Lending (reactive and proactive) over multi and single, and proactive over reactive,
    of every metric of METRICS."""
    return {f"{name}_{a}/{b}": _ratio(value(a, name), value(b, name))
            for name in METRICS for a, b in RATIOS}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---- running ----------------------------------------------------------------------------


def make_sweeps(args) -> dict[tuple[str, int], RateSweep]:
    """A sweep per (trace, instances). Requests per trace: --num-requests, else the capacity
    estimate x --window-s (at least --min-requests): at the estimated capacity the arrivals
    then span --window-s seconds, whatever the trace."""
    sweeps = {}
    for n in args.instances:
        for trace in args.traces:
            capacity = capacity_estimate(args.model, args.device, n, trace)
            num = args.num_requests or max(args.min_requests, round(capacity * args.window_s))
            template = Job("rate", args.model, args.device, n, "", num_requests=num,
                           seed=args.seed, slo=args.slo)
            rates = list(args.rates) if args.rates else [float(f"{capacity / 4:.3g}")]
            sweeps[trace, n] = RateSweep(trace, n, template, rates, args.max_rates,
                                         args.slo_attainment, fixed=bool(args.rates))
    return sweeps


def run_experiments(args, log: Callable[[str], None] = print) -> dict:
    """Both experiments as `args` asks; the report (settings, runs, summaries, paper)."""
    started = time.perf_counter()
    sweeps = make_sweeps(args) if "rates" in args.experiments else {}
    # the biggest cells first, so that the pool's last minutes are not one long run
    first = [j for key in sorted(sweeps, key=lambda k: -k[1]) for j in sweeps[key].jobs(0)]
    if "context" in args.experiments:
        first += context_jobs(args.context_models, args.device, args.context_instances,
                              args.serve_max_instances)
    results = run_jobs(first, sweeps, args.jobs, log)
    context = [r for r in results if r["kind"] == "context"]
    return {"bench": "sim_paper", "modelled": True,
            "note": "simulated: every figure is modelled by infinillm.sim, not measured",
            "settings": settings_of(args), "wall_s": time.perf_counter() - started,
            "context": context_rows(context) if context else [],
            "rate_runs": [r for s in sweeps.values() for r in s.results()],
            "rate_summaries": [summarize_sweep(s, args.slo_attainment) for s in sweeps.values()],
            "paper": {"context": PAPER_CONTEXT,
                      "rates": {k: v[2] for k, v in PAPER_RATES.items()}}}


def settings_of(args) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if k not in ("out", "img_dir")}


# ---- printing ---------------------------------------------------------------------------


def print_report(report: dict) -> None:
    print("\nMODELLED (simulated cluster, infinillm.sim); nothing here was measured on GPUs")
    if report["context"]:
        print("\n1. Longest context (tokens) vs instances; paper:", PAPER_CONTEXT["text"])
        print_table([{**r, "prefill_s": r["prefill_s"] and round(r["prefill_s"], 1),
                      "ratio_vs_multi": r["ratio_vs_multi"] and round(r["ratio_vs_multi"], 2)}
                     for r in report["context"]])
    for s in report["rate_summaries"]:
        print(f"\n2. {s['trace']} trace, {s['instances']} instances, {s['num_requests']} requests "
              f"(stopped: {s['stop_reason']}); paper: {s['paper']['text']}")
        print_table([_run_row(r) for r in report["rate_runs"]
                     if (r["trace"], r["instances"]) == (s["trace"], s["instances"])])
        print_table([{"policy": p, "sustained rate": v["sustained_rate"],
                      **{f"peak {name}": f"{fmt(v[f'peak_{name}'])} @ {v[f'peak_{name}_rate']:g}"
                         for name in METRICS}} for p, v in s["policies"].items()])
        print(f"ratios: L = lending (reactive), P = proactive, M = multi, S = single; paper: "
              f"{s['paper']['text']}")
        print_table([{"at": "peaks", **_short(s["peak_ratios"])}]
                    + [{"at": f"{r['rate']:g} req/s", **_short(r)} for r in s["per_rate_ratios"]])


def _run_row(r: dict) -> dict:
    return {"rate": r["rate"], "policy": r["policy"],
            "out tok/s": r["loaded_output_tokens_per_s"],
            "goodput": r["loaded_goodput_tokens_per_s"],
            "out (run)": r["output_tokens_per_s"], "goodput (run)": r["goodput_tokens_per_s"],
            "SLO att": r["slo_attainment"],
            "TTFT p99": r["ttft_p99_s"], "TPOT p99": r["tpot_p99_s"],
            "done": r["completed"], "refused": r["refused"], "cut": r["cut_short"],
            "preempt": r["preemptions"], "moves": r["block_moves"], "wall s": r["wall_s"]}


def _short(ratios: dict) -> dict:
    """Ratio columns under short names: `output_run_lending/multi` -> `output_run L/M`."""
    letters = {"lending": "L", "proactive": "P", "multi": "M", "single": "S"}
    out = {}
    for k, v in ratios.items():
        if k == "rate":
            continue
        for a, b in RATIOS:
            k = k.replace(f"_{a}/{b}", f" {letters[a]}/{letters[b]}")
        out[k] = None if v is None else round(v, 2)
    return out


# ---- command line -----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 and 4 instances, 60 requests, 2 rates")
    ap.add_argument("--experiments", default="context,rates", help="context and/or rates")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (1: this process)")
    ap.add_argument("--device", default="a100-80gb")
    ap.add_argument("--context-models", default="llama2-7b,llama2-13b")
    ap.add_argument("--context-instances", default=None, help="default 1,2,4,8,16,32")
    ap.add_argument("--serve-max-instances", type=int, default=None,
                    help="serve the longest prompt where instances <= this (default 8)")
    ap.add_argument("--no-serve", action="store_true", help="admission only, serve nothing")
    ap.add_argument("--model", default="llama2-13b", help="model of the rate experiment")
    ap.add_argument("--instances", default=None, help="default 8,32")
    ap.add_argument("--traces", default="short,long,mixed")
    ap.add_argument("--window-s", type=float, default=25.0,
                    help="requests per trace = capacity estimate x this (default 25)")
    ap.add_argument("--min-requests", type=int, default=100)
    ap.add_argument("--num-requests", type=int, default=None,
                    help="requests per trace, every trace and instance count (overrides "
                         "--window-s; --quick: 60)")
    ap.add_argument("--rates", default=None, help="a fixed rate grid, req/s (default: adaptive)")
    ap.add_argument("--max-rates", type=int, default=None, help="adaptive grid's cap (default 8)")
    ap.add_argument("--slo-ttft", type=float, default=None)
    ap.add_argument("--slo-tpot", type=float, default=None)
    ap.add_argument("--slo-attainment", type=float, default=0.9,
                    help="share of requests within the SLO for a rate to count as sustained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/sim_paper.json"))
    ap.add_argument("--img-dir", default=str(ROOT / "docs/img"), help="where the plots go")
    return finish_args(ap, ap.parse_args(argv))


def finish_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    from infinillm.sim.cli import SLO_TPOT_S, SLO_TTFT_S

    preset = PRESETS["quick" if args.quick else "full"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.no_serve:
        args.serve_max_instances = 0
    args.slo = (SLO_TTFT_S if args.slo_ttft is None else args.slo_ttft,
                SLO_TPOT_S if args.slo_tpot is None else args.slo_tpot)
    args.experiments = _names(ap, "--experiments", args.experiments, ("context", "rates"))
    args.traces = _names(ap, "--traces", args.traces, tuple(PAPER_RATES))
    args.context_models = args.context_models.split(",")
    args.context_instances = [int(x) for x in str(args.context_instances).split(",")]
    args.instances = [int(x) for x in str(args.instances).split(",")]
    args.rates = [float(x) for x in args.rates.split(",")] if args.rates else None
    if args.jobs < 1 or args.max_rates < 1:
        ap.error(f"--jobs and --max-rates must be >= 1, got {args.jobs} and {args.max_rates}")
    return args


def _names(ap, flag: str, value: str, valid: tuple[str, ...]) -> list[str]:
    names = value.split(",")
    bad = [n for n in names if n not in valid]
    if bad or not value:
        ap.error(f"{flag} must name some of {', '.join(valid)}, got {value!r}")
    return names


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run_experiments(args, log=lambda line: print(line, flush=True))
    report["machine"] = machine_info()
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if not args.no_plots:
        from bench.lib.sim_plots import plot_sim_paper

        plot_sim_paper(report, Path(args.img_dir))
    print(f"\ntotal wall time {report['wall_s']:.1f} s on {args.jobs} process(es); "
          f"wrote {out}", flush=True)
    emit_json(report)


if __name__ == "__main__":
    main()
