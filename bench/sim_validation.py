"""Is the simulator faithful? The results suite's workloads on the real engine (wall clock) and on
the simulated one (this machine's calibrated `cpu` profile), same seeds, request by request.

    python -m bench.sim_validation [--workloads short,mixed,long] [--systems lending,multi,single]
        [--rates 1,2,4] [--num-requests 12] [--instances 4] [--blocks-per-instance 64]
        [--profile FILE] [--seed 0]

Both sides run the same `bench.lib.workloads` requests (greedy, ignore_eos, 16-64 new tokens)
with the same engine settings; the real side is `LLM(...)` on this machine's wall clock (the
results suite's `wall` rows: the instances of a step run one after another in this process),
the simulated side the same control plane on a `SimExecutor` with `concurrent=False` (every
instance on one device, one after another) on simulated time. Systems: `lending` and `multi`
(--instances instances of --blocks-per-instance blocks, lending on / off) and `single` (one
instance with all the blocks).

The profile is measured first by `infinillm calibrate` (into bench/results/cpu-profile.json)
unless --profile names one. Calibration runs different requests (fixed decode batches and
prefill chunks), so this is a test of the model on workloads it was not fitted to.

Per run: output tokens/s, median TTFT and TPOT, real and simulated. Per request: the relative
error |sim - real| / real of TTFT and of TPOT. Printed: a table per run, the error distribution
(p10 .. p90) and, last, one JSON line; docs/img/sim_validation.png plots simulated against
measured per request.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from bench.lib.metrics import percentile
from bench.lib.online import WallClock, run_arrivals
from bench.lib.ours import _Online, model_info, warm_up
from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.workloads import make_workload

ROOT = Path(__file__).resolve().parent.parent


def real_run(args, system: str, workload) -> list:
    from infinillm import LLM

    inst, blocks = (1, args.instances * args.blocks) if system == "single" else (
        args.instances, args.blocks)
    llm = LLM(args.model, block_size=16, kv_blocks_per_instance=blocks, num_instances=inst,
              lending=system == "lending", max_num_batched_tokens=args.max_num_batched_tokens)
    warm_up(llm, 2 * inst, (48, 48), 4, seed=args.seed + 1)
    records, _ = run_arrivals(workload, _Online(llm.engine), WallClock())
    llm.engine.check_integrity()
    llm.shutdown()
    return list(records.values())  # admission order = workload order


def sim_run(args, system: str, workload, profile) -> list:
    from infinillm.sim.run import SimSetup, build_sim_engine, run_trace
    from infinillm.sim.traces import TraceRequest

    inst, blocks = (1, args.instances * args.blocks) if system == "single" else (
        args.instances, args.blocks)
    setup = SimSetup(model=str(args.model_path), profile=profile, instances=inst,
                     policy="lending" if system == "lending" else "multi", dtype="float32",
                     block_size=16, kv_blocks_per_instance=blocks, max_num_seqs=64,
                     max_num_batched_tokens=args.max_num_batched_tokens, concurrent=False)
    trace = [TraceRequest(a.at_s, len(a.prompt_ids), a.max_new) for a in workload]
    records = run_trace(build_sim_engine(setup), trace, check_integrity=True)
    return [r for r in records if not r.refused]


def rel_error(sim: float | None, real: float | None) -> float | None:
    if sim is None or real is None or real <= 0:
        return None
    return abs(sim - real) / real


def throughput(records) -> float:
    ends = [r.end_s for r in records if r.end_s is not None]
    return sum(r.num_tokens for r in records if r.end_s is not None) / max(ends) if ends else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--workloads", default="short,mixed,long")
    ap.add_argument("--systems", default="lending,multi,single")
    ap.add_argument("--rates", default="1,2,4")
    ap.add_argument("--num-requests", type=int, default=12)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--blocks-per-instance", dest="blocks", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--min-new", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--profile", default=None, help="a calibrated profile JSON (default: "
                                                    "calibrate now)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args()

    from infinillm.sim.devices import load_profile

    args.model_path, arch = model_info(args.model)
    profile_path = args.profile
    if profile_path is None:
        from infinillm.sim.calibrate import calibrate

        profile_path = calibrate(args.model, str(ROOT / "bench/results/cpu-profile.json"),
                                 log=print)
    profile = load_profile(str(profile_path))

    rows, ttft_err, tpot_err, tput_err, pairs = [], [], [], [], []
    for kind in args.workloads.split(","):
        for rate in [float(r) for r in args.rates.split(",")]:
            workload = make_workload(kind, args.num_requests, arch.vocab_size, seed=args.seed,
                                     new_tokens=(args.min_new, args.max_new), rate=rate)
            for system in args.systems.split(","):
                real = real_run(args, system, workload)
                gc.collect()
                sim = sim_run(args, system, workload, profile)
                if len(real) != len(sim):
                    raise RuntimeError(f"{kind} {rate} {system}: {len(real)} admitted for real, "
                                       f"{len(sim)} simulated")
                e_ttft = [rel_error(s.ttft_s, r.ttft_s) for r, s in zip(real, sim)]
                e_tpot = [rel_error(s.tpot_s, r.tpot_s) for r, s in zip(real, sim)]
                e_ttft = [e for e in e_ttft if e is not None]
                e_tpot = [e for e in e_tpot if e is not None]
                ttft_err += e_ttft
                tpot_err += e_tpot
                pairs += [(kind, system, r.ttft_s, s.ttft_s, r.tpot_s, s.tpot_s)
                          for r, s in zip(real, sim)]
                t_real, t_sim = throughput(real), throughput(sim)
                tput_err.append(rel_error(t_sim, t_real))
                rows.append({
                    "workload": kind, "rate": rate, "system": system,
                    "real_tok_s": t_real, "sim_tok_s": t_sim,
                    "real_ttft_p50": percentile([r.ttft_s for r in real if r.ttft_s], 50),
                    "sim_ttft_p50": percentile([s.ttft_s for s in sim if s.ttft_s], 50),
                    "real_tpot_p50": percentile([r.tpot_s for r in real if r.tpot_s], 50),
                    "sim_tpot_p50": percentile([s.tpot_s for s in sim if s.tpot_s], 50),
                    "ttft_err_p50": percentile(e_ttft, 50), "tpot_err_p50": percentile(e_tpot, 50),
                    "tput_err": tput_err[-1]})
                print(f"{kind} rate {rate} {system}: tok/s real {t_real:.1f} sim {t_sim:.1f}; "
                      f"median TTFT err {rows[-1]['ttft_err_p50']:.3f}, TPOT err "
                      f"{rows[-1]['tpot_err_p50']:.3f}", flush=True)
    print("\nsimulated (modelled: cpu profile, instances serial) vs measured (wall clock)")
    print_table(rows)
    quantiles = (10, 25, 50, 75, 90)
    dist = {f"{name}_err_p{q}": percentile(errs, q) for name, errs in
            (("ttft", ttft_err), ("tpot", tpot_err), ("throughput", tput_err)) for q in quantiles}
    print("\nrelative error |sim - real| / real, per request (throughput: per run)")
    print_table([{"error": name, **{f"p{q}": percentile(errs, q) for q in quantiles}}
                 for name, errs in (("TTFT", ttft_err), ("TPOT", tpot_err),
                                    ("throughput", tput_err))])
    if not args.no_plots:
        plot(pairs, ROOT / "docs/img/sim_validation.png")
    emit_json({"bench": "sim_validation", "machine": machine_info(),
               "profile": str(profile_path), "runs": rows, **dist,
               "num_requests_compared": len(ttft_err)})


def plot(pairs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (name, ri, si) in zip(axes, (("TTFT (s)", 2, 3), ("TPOT (s)", 4, 5))):
        for system, marker in (("lending", "o"), ("multi", "s"), ("single", "^")):
            pts = [(p[ri], p[si]) for p in pairs if p[1] == system and p[ri] and p[si]]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, marker=marker,
                           alpha=0.6, label=system)
        values = [v for p in pairs for v in (p[ri], p[si]) if v]
        if values:
            lo, hi = min(values), max(values)
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="sim = real")
            ax.plot([lo, hi], [lo * 1.15, hi * 1.15], "k:", lw=0.8, label="±15 %")
            ax.plot([lo, hi], [lo * 0.85, hi * 0.85], "k:", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {name}")
        ax.set_ylabel(f"simulated {name} (modelled)")
        ax.legend(fontsize=8)
    fig.suptitle("Simulator vs real engine, per request (this machine, instances serial)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
