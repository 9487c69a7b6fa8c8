"""The results page in one command: seeded online workloads x systems x rates, longest context,
plots.

    .venv/bin/python bench/run_all.py [--quick | --full] [--rates 1,2,4] [--num-requests 12]
        [--workloads short,mixed,long] [--blocks-per-instance 64] [--instances 4] [--seed 0]

Systems, each measured in this process one after the other on a fresh, warmed-up engine
(`LLM(...).engine` driven by hand, see bench/run_all_workloads.py for the loop and workloads):
- `lending`: --instances instances of --blocks-per-instance blocks, lending on;
- `multi`: the same instances and pools, `lending=False` (the paper's "vLLM-multi");
- `single`: one instance with --instances x the blocks (the paper's "vLLM-single").
vLLM itself is not run (`--with-vllm` is accepted and only reported as not done; see
bench/serving.py for infinillm vs vLLM's server).

Per (workload, system, rate): output tok/s and req/s over the run (first arrival to last
finish), TTFT and TPOT p50/p99, requests refused at admission, preemptions, most blocks borrowed
and lent at once, remote micro-attention bytes. Then the longest prompt each system admits for
1, 2 and --instances instances (bisection on the admission check, bench/max_context.py); the
lending one at --instances is also served (2 new tokens; all of them with --full). Writes
bench/results/results.json, docs/img/{throughput_vs_rate,longest_context,memory_timeline}.png,
prints tables and, last, one JSON line (the same as the file, without the memory timelines).

On this machine the instances of a step run one after another on 2 cores, so "single" reads the
weights once per step and the 4-instance systems four times: the 4-instance rows measure
scheduling (what lending buys against multi), not what four devices would do.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json, machine_info, print_table, seeded_prompts  # noqa: E402
from max_context import longest_admitted, serve  # noqa: E402
from run_all_workloads import WORKLOADS, make_workload, serve_online  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("lending", "multi", "single")
PRESETS = {"quick": {"num_requests": 10, "rates": "1,2,4"},
           "full": {"num_requests": 48, "rates": "0.5,1,2,4"}}


def make_llm(args, system: str, num_instances: int | None = None):
    """A fresh engine for `system`, warmed up with two equal prompts per instance."""
    from infinillm import LLM, SamplingParams

    n = num_instances or args.instances
    inst, blocks = (1, n * args.blocks) if system == "single" else (n, args.blocks)
    llm = LLM(args.model, block_size=args.block_size, kv_blocks_per_instance=blocks,
              num_instances=inst, lending=system == "lending",
              max_num_batched_tokens=args.max_num_batched_tokens)
    warm = seeded_prompts(llm.engine.arch.vocab_size, 2 * inst, 48, 48, seed=args.seed + 1)
    llm.generate(warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    return llm


def warm_process(args) -> None:
    """One untimed lending engine serving a long prompt among short ones: the first long prefill
    and first remote attention of a process are slow (allocator, kernel set-up); no run gets
    them."""
    from infinillm import SamplingParams

    llm = make_llm(args, "lending")
    pool = args.blocks * args.block_size
    lens = [2 * pool, 300, 200, 100]
    prompts = [seeded_prompts(llm.engine.arch.vocab_size, 1, k, k, seed=args.seed + 2)[0]
               for k in lens]
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    llm.shutdown()


def run_online(args, vocab: int, bar) -> list[dict]:
    from infinillm import SamplingParams

    results = []
    for kind in args.workloads:
        for r_i, rate in enumerate(args.rates):
            workload = make_workload(kind, args.num_requests, rate, vocab, args.min_new,
                                     args.max_new, args.seed)
            order = SYSTEMS if r_i % 2 == 0 else SYSTEMS[::-1]  # alternate who runs first
            for system in order:
                bar.set_description(f"{kind} {system} {rate:g} req/s")
                llm = make_llm(args, system)
                keep = kind == args.timeline_workload and rate == args.timeline_rate
                r = serve_online(llm, workload, SamplingParams, keep_timeline=keep)
                llm.shutdown()
                del llm
                gc.collect()
                results.append({"workload": kind, "system": system, "rate": rate, **r})
                bar.update(1)
    return results


def run_max_context(args, bar) -> list[dict]:
    """Longest admitted prompt per system and instance count; lending's are served too."""
    from infinillm import SamplingParams

    sampling = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
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
                served = serve(llm, base, sampling)
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
    """lending / multi and lending / single output tok/s per workload and rate."""
    by = {(r["workload"], r["rate"], r["system"]): r for r in online}
    out = []
    for (kind, rate, system), r in by.items():
        if system != "lending":
            continue
        multi, single = by[(kind, rate, "multi")], by[(kind, rate, "single")]
        out.append({"workload": kind, "rate": rate,
                    "tok/s lending/multi": _div(r["output_tok_s"], multi["output_tok_s"]),
                    "tok/s lending/single": _div(r["output_tok_s"], single["output_tok_s"]),
                    "prompt+out tok/s lending/multi": _div(r["total_tok_s"],
                                                           multi["total_tok_s"]),
                    "served lending/multi/single":
                        f"{r['served']}/{multi['served']}/{single['served']}",
                    "TTFT p99 lending/multi": _div(r["ttft_p99_s"], multi["ttft_p99_s"])})
    return out


def _div(a, b):
    return round(a / b, 3) if a is not None and b else None


def online_row(r: dict) -> dict:
    def ms(x):
        return round(1000 * x) if x is not None else ""

    return {"workload": r["workload"], "rate": r["rate"], "system": r["system"],
            "tok/s": round(r["output_tok_s"], 1), "req/s": round(r["req_s"], 2),
            "prompt+out tok/s": round(r["total_tok_s"]),
            "TTFT p50 ms": ms(r["ttft_p50_s"]), "TTFT p99 ms": ms(r["ttft_p99_s"]),
            "TPOT p50 ms": ms(r["tpot_p50_s"]), "TPOT p99 ms": ms(r["tpot_p99_s"]),
            "served": f"{r['served']}/{r['submitted']}", "refused": r["refused"],
            "preempt": r["preemptions"], "max borrowed": r["max_borrowed_blocks"],
            "max lent": r["max_lent_blocks"], "remote MB": round(r["remote_bytes"] / 1e6, 1)}


def targets(online: list[dict], ctx: list[dict], n: int) -> dict:
    """The issue's targets: lending >= 1.5x multi tok/s on mixed/long (best rate), never more
    than 5 % slower than multi, and longest context >= 0.9 N."""
    rat = ratios(online)
    ml = [r["tok/s lending/multi"] for r in rat if r["workload"] in ("mixed", "long")]
    lend_n = [r for r in ctx if r["system"] == "lending" and r["instances"] == n]
    return {"best_lending_over_multi_mixed_long": max(ml, default=None),
            "worst_lending_over_multi": min((r["tok/s lending/multi"] for r in rat),
                                            default=None),
            "lending_ratio_per_instance_at_n": lend_n[0]["ratio_per_instance"] if lend_n else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: 10 requests per run")
    mode.add_argument("--full", action="store_true", help="48 requests per run, 4 rates")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
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
    ap.add_argument("--with-vllm", action="store_true", help="not implemented: reported only")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/results.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    preset = PRESETS["full" if args.full else "quick"]
    args.rates = [float(x) for x in (args.rates or preset["rates"]).split(",")]
    args.num_requests = args.num_requests or preset["num_requests"]
    args.workloads = args.workloads.split(",")
    if args.timeline_rate is None:
        args.timeline_rate = args.rates[len(args.rates) // 2]

    from tqdm import tqdm

    from infinillm.model import load_arch
    from infinillm.model.resolve import resolve_model_path

    model_path = resolve_model_path(args.model)
    vocab = load_arch(model_path).vocab_size
    num_ctx = len({1, 2, args.instances}) * len(SYSTEMS)
    t0 = time.perf_counter()
    warm_process(args)
    with tqdm(total=len(args.workloads) * len(args.rates) * len(SYSTEMS) + num_ctx,
              unit="run", file=sys.stderr) as bar:
        online = run_online(args, vocab, bar)
        ctx = run_max_context(args, bar)
    elapsed = time.perf_counter() - t0

    for kind in args.workloads:
        print_table([online_row(r) for r in online if r["workload"] == kind])
        print()
    print_table(ratios(online))
    print()
    print_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                 for r in ctx])
    goals = targets(online, ctx, args.instances)
    print("\ntargets:", json.dumps(goals))
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    report = {"bench": "run_all", "machine": machine_info(), "model": str(model_path),
              "settings": settings, "mode": "full" if args.full else "quick",
              "vllm": "not run" + (" (--with-vllm is not implemented yet)" if args.with_vllm
                                   else " (pass --with-vllm; see bench/serving.py)"),
              "elapsed_s": elapsed, "online": online, "max_context": ctx, "ratios": ratios(online),
              "targets": goals}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if not args.no_plots:
        plot_all(report, ROOT / "docs/img")
    emit_json({**report, "online": [{k: v for k, v in r.items() if k != "timeline"}
                                    for r in online]})


COLORS = {"lending": "tab:blue", "multi": "tab:orange", "single": "tab:green"}


def plot_all(report: dict, folder: Path) -> None:
    """The three PNGs of docs/benchmarks.md "Results suite"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for name, fn in (("throughput_vs_rate", _plot_throughput),
                     ("longest_context", _plot_context), ("memory_timeline", _plot_memory)):
        fig = fn(plt, report)
        if fig is not None:
            fig.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(fig)


def _plot_throughput(plt, report):
    kinds = report["settings"]["workloads"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for system in SYSTEMS:
            pts = sorted((r["rate"], r["output_tok_s"]) for r in report["online"]
                         if r["workload"] == kind and r["system"] == system)
            ax.plot(*zip(*pts, strict=True), marker="o", label=system, color=COLORS[system])
        rates = sorted({r["rate"] for r in report["online"]})
        mean_new = sum(report["settings"][k] for k in ("min_new", "max_new")) / 2
        ax.plot(rates, [x * mean_new for x in rates], ls="--", color="0.5", label="offered")
        ax.set(title=f"{kind}", xlabel="request rate (req/s)", ylabel="output tokens/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("Output throughput vs request rate (served requests only; refused not counted)")
    fig.tight_layout()
    return fig


def _plot_context(plt, report):
    rows = report["max_context"]
    sizes = sorted({r["instances"] for r in rows})
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(SYSTEMS)
    for s_i, system in enumerate(SYSTEMS):
        vals = [next(r["max_prompt_tokens"] for r in rows
                     if r["system"] == system and r["instances"] == n) for n in sizes]
        xs = [i + (s_i - 1) * width for i in range(len(sizes))]
        bars = ax.bar(xs, vals, width, label=system, color=COLORS[system])
        ax.bar_label(bars, fmt="%d", fontsize=7)
    ax.set_xticks(range(len(sizes)), [f"{n} instance{'s' if n > 1 else ''}" for n in sizes])
    ax.set(ylabel="longest prompt admitted (tokens)",
           title="Longest context (single = one instance with N x the blocks)")
    ax.legend()
    return fig


def _plot_memory(plt, report):
    runs = [r for r in report["online"] if "timeline" in r and r["system"] != "single"]
    if not runs:
        return None
    n = len(runs[0]["timeline"][0]) - 1
    fig, axes = plt.subplots(len(runs), n, figsize=(3.2 * n, 2.6 * len(runs)), sharey=True,
                             sharex=True,
                             squeeze=False)
    for row, r in zip(axes, runs, strict=True):
        t = [p[0] for p in r["timeline"]]
        for i, ax in enumerate(row):
            used, lent, borrowed, free = zip(*(p[1 + i] for p in r["timeline"]), strict=True)
            ax.stackplot(t, used, lent, free, labels=["used (own pool)", "lent to others", "free"],
                         colors=["tab:blue", "tab:red", "0.85"], step="post")
            ax.step(t, borrowed, where="post", color="k", lw=1.2, label="borrowed (elsewhere)")
            ax.set_title(f"{r['system']}: instance {i}", fontsize=9)
            ax.set_xlabel("s")
        row[0].set_ylabel("blocks")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Blocks per instance over time, {runs[0]['workload']} workload at "
                 f"{runs[0]['rate']:g} req/s")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
