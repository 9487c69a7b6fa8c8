"""How long a large simulation takes: 10,000 requests on 32 simulated A100-80GB instances of
LLaMA2-13B (thousands of blocks each), the control plane's scale test.

    python -m bench.sim_scale [--num-requests 10000] [--instances 32] [--trace mixed]
        [--rate 8] [--policies lending] [--seed 0] [--target-s 300]

Runs `infinillm.sim.run.simulate` once per policy, in this process, and reports the wall time
(this machine's seconds for the whole run: building the engine, every step of the real control
plane and the cost model) against --target-s, with the run's steps, simulated seconds and
throughput (modelled). Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import gc

from bench.lib.report import emit_json, machine_info, print_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-13b")
    ap.add_argument("--device", default="a100-80gb")
    ap.add_argument("--instances", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--trace", default="mixed")
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--policies", default="lending")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-s", type=float, default=300.0)
    args = ap.parse_args()

    from infinillm.sim.run import SimSetup, simulate
    from infinillm.sim.traces import make_trace

    trace = make_trace(args.trace, args.num_requests, rate=args.rate, seed=args.seed)
    rows = []
    for policy in args.policies.split(","):
        gc.collect()
        setup = SimSetup(model=args.model, device=args.device, instances=args.instances,
                         policy=policy)
        r = simulate(setup, trace)
        rows.append({"policy": policy, "requests": r["requests"], "completed": r["completed"],
                     "steps": r["steps"], "block_moves": r["block_moves"],
                     "simulated_s": r["simulated_s"],
                     "output_tok_s (modelled)": r["output_tokens_per_s"],
                     "wall_s": r["wall_s"], "within_target": r["wall_s"] <= args.target_s})
        print(f"{policy}: {r['wall_s']:.1f} s wall for {r['steps']} steps", flush=True)
    print_table(rows)
    emit_json({"bench": "sim_scale", "machine": machine_info(), "model": args.model,
               "device": args.device, "instances": args.instances, "trace": args.trace,
               "rate": args.rate, "target_s": args.target_s, "runs": rows})


if __name__ == "__main__":
    main()
