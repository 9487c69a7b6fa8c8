"""Placement ablation on the simulated cluster at saturation: multi, reactive lending and
proactive placement on the same seeded trace, and the same trace without the requests that
`multi` cannot hold (so that every system serves the same work). MODELLED, not measured.

    python -m bench.sim_placement [--cells mixed:32:89:1500,long:32:18.6:300,...]
        [--policies lending,proactive,multi] [--fits] [--device a100-80gb]
        [--model llama2-13b] [--seed 0]

A cell is trace:instances:rate:requests. The defaults are the saturated cells of
docs/simulation.md ("Placement at saturation"): the rates where the paper's experiment grid
(bench/sim_paper.py) finds every policy's SLO attainment falling. With --fits each cell also
runs on the trace filtered to the requests whose prompt and output fit one instance's pool
(what multi serves). Every run is deterministic (virtual clock, seeded trace): the same command
gives the same figures on any machine; only `wall_s` depends on the machine.

Prints a table (loaded output and goodput tok/s, SLO attainment, completed, refused, block
moves, preemptions), the ratios proactive / multi and proactive / lending per cell, and one JSON
line last.
"""

from __future__ import annotations

import argparse
import time

from bench.lib.report import emit_json, machine_info, print_table

DEFAULT_CELLS = ("mixed:32:89:1500,long:32:18.6:300,short:32:826:6000,"
                 "mixed:8:22:1000,long:8:4.7:300,short:8:300:2500")


def run_cell(args, trace: str, instances: int, rate: float, num: int, fits: bool) -> list[dict]:
    from infinillm.sim.run import SimSetup, build_sim_engine, simulate
    from infinillm.sim.traces import make_trace

    requests = make_trace(trace, num, rate=rate, seed=args.seed)
    if fits:
        pool = build_sim_engine(SimSetup(model=args.model, device=args.device, instances=1,
                                         policy="multi")).num_blocks_per_instance * 16
        requests = [r for r in requests if r.prompt_tokens + r.output_tokens < pool - 16]
    rows = []
    for policy in args.policies:
        started = time.perf_counter()
        setup = SimSetup(model=args.model, device=args.device, instances=instances,
                         policy=policy)
        r = simulate(setup, requests, slo=args.slo)
        r.update(trace=trace, fits=fits, rate=rate, wall_s=time.perf_counter() - started)
        rows.append(r)
        print(f"{trace}{' (fits)' if fits else ''} x{instances} @ {rate:g} {policy}: "
              f"{r['loaded_output_tokens_per_s']:.0f} out tok/s loaded", flush=True)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["trace"], r["fits"], r["instances"], r["rate"], r["policy"]): r for r in rows}
    out = []
    for (trace, fits, n, rate, policy), r in by.items():
        if policy != "proactive":
            continue
        row = {"trace": trace + (" (fits)" if fits else ""), "N": n, "rate": rate}
        for other in ("multi", "lending"):
            o = by.get((trace, fits, n, rate, other))
            if o is None:
                continue
            for key, name in (("loaded_output_tokens_per_s", "out"),
                              ("loaded_goodput_tokens_per_s", "goodput")):
                row[f"{name} P/{other[0].upper()}"] = (round(r[key] / o[key], 3)
                                                       if o[key] else None)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=DEFAULT_CELLS)
    ap.add_argument("--policies", default="lending,proactive,multi")
    ap.add_argument("--fits", action="store_true", help="also the trace multi can hold")
    ap.add_argument("--model", default="llama2-13b")
    ap.add_argument("--device", default="a100-80gb")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft", type=float, default=10.0)
    ap.add_argument("--slo-tpot", type=float, default=0.2)
    args = ap.parse_args()
    args.policies = args.policies.split(",")
    args.slo = (args.slo_ttft, args.slo_tpot)
    cells = []
    for cell in args.cells.split(","):
        try:
            trace, n, rate, num = cell.split(":")
            cells.append((trace, int(n), float(rate), int(num)))
        except ValueError:
            ap.error(f"a cell is trace:instances:rate:requests, got {cell!r}")
    rows = []
    for trace, n, rate, num in cells:
        for fits in (False, True) if args.fits else (False,):
            rows += run_cell(args, trace, n, rate, num, fits)
    print("\nMODELLED (simulated cluster); nothing here was measured on GPUs")
    print_table([{"trace": r["trace"] + (" (fits)" if r["fits"] else ""), "N": r["instances"],
                  "rate": r["rate"], "policy": r["policy"],
                  "out tok/s": round(r["loaded_output_tokens_per_s"]),
                  "goodput": round(r["loaded_goodput_tokens_per_s"]),
                  "SLO att": round(r["slo_attainment"], 2), "done": r["completed"],
                  "refused": r["refused"], "moves": r["block_moves"],
                  "preempt": r["preemptions"], "wall s": round(r["wall_s"], 1)} for r in rows])
    print()
    print_table(ratios(rows))
    emit_json({"bench": "sim_placement", "modelled": True, "machine": machine_info(),
               "model": args.model, "device": args.device, "seed": args.seed,
               "slo": list(args.slo), "runs": rows, "ratios": ratios(rows)})


if __name__ == "__main__":
    main()
