"""The figures of bench/sim_paper.py (simulated cluster), from its report dict. Every figure is
MODELLED and its title says so.

Contract: `plot_sim_paper(report, folder)` writes sim_longest_context.png (when the report has
context rows) and sim_throughput_vs_rate.png, sim_goodput_vs_rate.png (when it has rate runs);
matplotlib is imported when called (Agg backend, no display).
"""

from __future__ import annotations

from pathlib import Path

COLORS = {"lending": "tab:blue", "proactive": "tab:red", "multi": "tab:orange",
          "single": "tab:green"}
# lending and multi coincide where nothing is borrowed: dashes let both lines show
LINES = {"lending": {"ls": "-", "marker": "o"}, "proactive": {"ls": "-", "marker": "D", "ms": 4},
         "multi": {"ls": "--", "marker": "s", "ms": 4},
         "single": {"ls": "-.", "marker": "^"}}
MARKERS = ("o", "s", "^", "D")


def plot_sim_paper(report: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    figures = [("sim_longest_context", _plot_context(plt, report))]
    if report["rate_runs"]:
        ttft, tpot = report["settings"]["slo"]
        figures += [
            ("sim_throughput_vs_rate", _plot_rates(
                plt, report, ("loaded_output_tokens_per_s", "output_tokens_per_s"),
                "output tokens/s while requests arrive",
                "Output throughput vs request rate (MODELLED: simulated cluster)")),
            ("sim_goodput_vs_rate", _plot_rates(
                plt, report, ("loaded_goodput_tokens_per_s", "goodput_tokens_per_s"),
                "goodput (output tokens/s in SLO)",
                f"Goodput vs request rate, SLO TTFT <= {ttft:g} s, TPOT <= {tpot:g} s "
                "(MODELLED: simulated cluster)"))]
    for name, fig in figures:
        if fig is not None:
            path = folder / f"{name}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


def _plot_context(plt, report: dict):
    rows = report["context"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = sorted({r["model"] for r in rows})
    styles = {"lending": "-", "proactive": "-.", "multi": ":", "single": "--"}
    for m_i, model in enumerate(models):
        for policy, color in COLORS.items():
            pts = sorted((r["instances"], r["longest_tokens"]) for r in rows
                         if r["model"] == model and r["policy"] == policy)
            if pts:
                ax.plot(*zip(*pts, strict=True), styles[policy], marker=MARKERS[m_i % 4],
                        color=color, label=f"{model} {policy}")
    paper = report["paper"]["context"]
    ax.plot([paper["instances"]], [paper["max_tokens"]], "k*", ms=12,
            label="paper v1: 1.9M tokens, 32 GPUs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({r["instances"] for r in rows} | {paper["instances"]})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set(xlabel="instances (GPUs)", ylabel="longest prompt admitted (tokens)",
           title=f"Longest context vs instances on {report['settings']['device']} "
                 "(MODELLED: simulated cluster)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


def _plot_rates(plt, report: dict, keys: tuple[str, str], ylabel: str, title: str):
    """A panel per (instances: rows, trace: columns); a line per policy of the figure while
    requests arrive (`keys[0]`) and a thin dotted one over the whole run, drain included
    (`keys[1]`); rates on log2 x."""
    runs = report["rate_runs"]
    traces = [t for t in report["settings"]["traces"] if any(r["trace"] == t for r in runs)]
    sizes = sorted({r["instances"] for r in runs})
    fig, axes = plt.subplots(len(sizes), len(traces), squeeze=False,
                             figsize=(4.2 * len(traces), 3.3 * len(sizes)))
    for row, n in zip(axes, sizes, strict=True):
        for ax, trace in zip(row, traces, strict=True):
            for policy, color in COLORS.items():
                for key, style in zip(keys, ({**LINES[policy], "label": policy},
                                             {"ls": ":", "lw": 1}), strict=True):
                    pts = sorted((r["rate"], r[key]) for r in runs if (
                        r["trace"], r["instances"], r["policy"]) == (trace, n, policy)
                        and r[key] is not None)
                    if pts:
                        ax.plot(*zip(*pts, strict=True), color=color, **style)
            rates = sorted({r["rate"] for r in runs if (r["trace"], r["instances"]) == (trace, n)})
            ax.set_xscale("log", base=2)
            ax.set_xticks(rates, [f"{x:.3g}" for x in rates])
            ax.minorticks_off()
            ax.set(title=f"{trace}, {n} instances", xlabel="request rate (req/s)",
                   ylabel=ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[0][0].plot([], [], "k:", lw=1, label="whole run (drain included)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}\n{report['settings']['model']} on {report['settings']['device']}")
    fig.tight_layout()
    return fig
