"""The results suite's four figures (docs/benchmarks.md "Results suite"), from its report dict.

Contract: `plot_all(report, folder)` writes throughput_vs_rate, goodput_vs_rate, longest_context
and memory_timeline PNGs; matplotlib is imported when called (Agg backend, no display).
"""

from __future__ import annotations

from pathlib import Path

COLORS = {"lending": "tab:blue", "proactive": "tab:red", "multi": "tab:orange",
          "single": "tab:green", "vllm": "tab:purple"}
SYSTEMS = tuple(COLORS)  # plotting order


def plot_all(report: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for name, fn in (("throughput_vs_rate", _plot_throughput), ("goodput_vs_rate", _plot_goodput),
                     ("longest_context", _plot_context), ("memory_timeline", _plot_memory)):
        fig = fn(plt, report)
        if fig is not None:
            fig.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(fig)


def _plot_rates(plt, report, key: str, ylabel: str, title: str):
    """One panel per workload (columns) and clock (rows): `key` against the offered rate."""
    kinds = report["settings"]["workloads"]
    clocks = report["settings"]["clocks"]
    fig, axes = plt.subplots(len(clocks), len(kinds),
                             figsize=(4.2 * len(kinds), 3.2 * len(clocks)), squeeze=False)
    rates = sorted({r["rate"] for r in report["online"]})
    mean_new = sum(report["settings"][k] for k in ("min_new", "max_new")) / 2
    for row, clock in zip(axes, clocks, strict=True):
        for ax, kind in zip(row, kinds, strict=True):
            for system in SYSTEMS:
                pts = sorted((r["rate"], r[key]) for r in report["online"]
                             if (r["workload"], r["system"], r["clock"]) == (kind, system, clock))
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=system,
                            color=COLORS[system])
            ax.plot(rates, [x * mean_new for x in rates], ls="--", color="0.5", label="offered")
            ax.set(title=f"{kind}, {clock} clock", xlabel="request rate (req/s)", ylabel=ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plot_throughput(plt, report):
    return _plot_rates(plt, report, "output_tok_s", "output tokens/s",
                       "Output throughput vs request rate (served requests only)")


def _plot_goodput(plt, report):
    ttft, tpot = report["settings"]["slo"]
    return _plot_rates(plt, report, "goodput_tok_s", "goodput (output tokens/s in SLO)",
                       f"Goodput vs request rate: output tokens of requests with TTFT <= "
                       f"{ttft:g} s and TPOT <= {tpot:g} s")


def _plot_context(plt, report):
    rows = report["max_context"]
    sizes = sorted({r["instances"] for r in rows})
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(systems)
    for s_i, system in enumerate(systems):
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
                             sharex=True, squeeze=False)
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
                 f"{runs[0]['rate']:g} req/s ({runs[0]['clock']} clock)")
    fig.tight_layout()
    return fig
