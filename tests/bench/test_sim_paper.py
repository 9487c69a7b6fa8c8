"""bench/sim_paper.py at a tiny size: every policy at every rate of a sweep, the rate grid's
stopping rule, summaries and ratios computed from the runs, the longest-context rows, plots."""

from __future__ import annotations

import pytest

from bench.lib.sim_runs import METRICS, POLICIES, Job, RateSweep, capacity_estimate
from bench.sim_paper import parse_args, run_experiments, summarize_sweep


@pytest.fixture(scope="module")
def report():
    # 2 instances, 6 short and 6 long requests, 2 fixed rates, in this process: ~2 s
    args = parse_args(["--jobs", "1", "--instances", "2", "--traces", "short,long",
                       "--num-requests", "6", "--rates", "0.5,4", "--context-models",
                       "llama2-7b", "--context-instances", "2", "--no-serve", "--no-plots"])
    lines: list[str] = []
    out = run_experiments(args, log=lines.append)
    out["log"] = lines
    return out


def test_every_policy_runs_every_rate_on_the_same_trace(report):
    runs = report["rate_runs"]
    for trace in ("short", "long"):
        cell = [r for r in runs if r["trace"] == trace]
        assert sorted((r["rate"], r["policy"]) for r in cell) == sorted(
            (rate, p) for rate in (0.5, 4.0) for p in POLICIES)
        assert {(r["num_requests"], r["seed"], r["instances"]) for r in cell} == {(6, 0, 2)}
        for r in cell:  # what simulate returns is kept whole
            assert r["completed"] + r["refused"] + r["cut_short"] == 6
            for key in ("slo_attainment", "ttft_p99_s", "tpot_p50_s", "block_moves",
                        "simulated_s", "wall_s", *METRICS.values()):
                assert key in r
    # a line per finished run, rate runs and context searches alike
    assert len(report["log"]) == len(runs) + len(report["context"])


def test_summaries_follow_the_runs(report):
    thr = report["settings"]["slo_attainment"]
    for s in report["rate_summaries"]:
        runs = [r for r in report["rate_runs"] if r["trace"] == s["trace"]]
        assert s["rates"] == [0.5, 4.0] and s["stop_reason"] == "last rate of the grid"
        for p in POLICIES:
            mine = {r["rate"]: r for r in runs if r["policy"] == p}
            ok = [rate for rate, r in mine.items() if r["slo_attainment"] >= thr]
            sustained = s["policies"][p]["sustained_rate"]
            assert sustained == (max(ok) if ok else None)
            if sustained is not None:  # nothing above it is within the SLO
                assert all(r["slo_attainment"] < thr for rate, r in mine.items()
                           if rate > sustained)
            for name, key in METRICS.items():
                assert s["policies"][p][f"peak_{name}"] == max(r[key] or 0.0 for r in
                                                               mine.values())
        at = {(r["rate"], r["policy"]): r for r in runs}
        for row in s["per_rate_ratios"]:
            for name, key in METRICS.items():
                for other in ("multi", "single"):
                    mine, theirs = at[row["rate"], "lending"][key], at[row["rate"], other][key]
                    want = mine / theirs if theirs else None  # None: nothing to divide by
                    assert row[f"{name}_lending/{other}"] == pytest.approx(want)
        peaks = s["policies"]
        assert s["peak_ratios"]["output_lending/single"] == pytest.approx(
            peaks["lending"]["peak_output"] / peaks["single"]["peak_output"])
        assert s["paper"]["text"]


def test_longest_context_pools_with_lending_only(report):
    rows = {r["policy"]: r for r in report["context"]}
    assert [r["instances"] for r in report["context"]] == [2, 2, 2, 2]
    one = rows["multi"]["longest_tokens"]  # no pooling: one instance's pool
    assert one > 0 and rows["multi"]["ratio_vs_multi"] == 1.0
    # lending pools both pools but the share each lender keeps (max_lent_fraction 0.9)
    assert rows["lending"]["longest_tokens"] == pytest.approx(1.9 * one, rel=0.01)
    assert rows["lending"]["ratio_vs_multi"] == pytest.approx(
        rows["lending"]["longest_tokens"] / one)
    # placement changes where KV lives, not how much of it one request may have
    assert rows["proactive"]["longest_tokens"] == rows["lending"]["longest_tokens"]
    assert rows["single"]["longest_tokens"] > 2 * one  # one copy of the weights over 2 GPUs
    assert all(r["served"] is None for r in rows.values())  # --no-serve


def test_plots_are_written(report, tmp_path):
    pytest.importorskip("matplotlib")
    from bench.lib.sim_plots import plot_sim_paper

    paths = plot_sim_paper(report, tmp_path)
    assert sorted(p.name for p in paths) == ["sim_goodput_vs_rate.png",
                                             "sim_longest_context.png",
                                             "sim_throughput_vs_rate.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def _fake(sweep: RateSweep, index: int, tok_s: tuple[float, ...],
          slo: float | tuple[float, ...] = 1.0) -> list:
    """Feed `sweep` made-up results for its `index`-th rate; the jobs it asks for next."""
    nxt: list[Job] = []
    slos = slo if isinstance(slo, tuple) else (slo,) * len(POLICIES)
    for p, t, a in zip(POLICIES, tok_s, slos, strict=True):
        nxt = sweep.add({"rate_index": index, "rate": sweep.rates[index], "policy": p,
                         "slo_attainment": a, METRICS["output"]: t})
    return nxt


def test_the_grid_doubles_until_throughput_stops_growing():
    sweep = RateSweep("short", 8, Job("rate", "m", "d", 8, ""), [1.0], max_rates=8)
    assert len(sweep.jobs(0)) == len(POLICIES)
    assert _fake(sweep, 0, (10, 10, 9, 8))[0].rate == 2.0
    assert [j.policy for j in _fake(sweep, 1, (19, 19, 9, 8))] == list(POLICIES)
    assert _fake(sweep, 2, (19.5, 19.5, 19.9, 8)) == []  # best 19.9 < 1.05 x 19
    assert sweep.rates == [1.0, 2.0, 4.0] and "grew < 5%" in sweep.stop_reason


def test_the_grid_stops_at_saturated_slo_and_at_its_cap():
    sweep = RateSweep("long", 8, Job("rate", "m", "d", 8, ""), [1.0], max_rates=8)
    assert _fake(sweep, 0, (10, 10, 9, 8))
    assert _fake(sweep, 1, (20, 20, 18, 16), slo=0.4) == []
    assert "SLO attainment" in sweep.stop_reason and sweep.rates == [1.0, 2.0]
    capped = RateSweep("long", 8, Job("rate", "m", "d", 8, ""), [1.0], max_rates=2)
    assert _fake(capped, 0, (1, 1, 1, 1))
    assert _fake(capped, 1, (5, 5, 5, 5)) == [] and capped.rates == [1.0, 2.0]


def test_a_saturated_start_steps_down_until_a_policy_meets_the_slo():
    sweep = RateSweep("mixed", 32, Job("rate", "m", "d", 32, ""), [8.0], max_rates=8)
    assert _fake(sweep, 0, (10, 10, 9, 8), slo=(0.3, 0.3, 0.2, 0.1))[0].rate == 4.0
    assert _fake(sweep, 1, (10, 10, 9, 8), slo=(0.8, 0.8, 0.6, 0.1))[0].rate == 2.0  # 0.8 < 0.9
    assert _fake(sweep, 2, (9, 9, 9, 8), slo=(0.95, 0.95, 0.7, 0.3)) == []
    assert sweep.rates == [8.0, 4.0, 2.0] and sweep.stop_reason.startswith("down")
    assert [r["rate"] for r in sweep.results()][::len(POLICIES)] == [2.0, 4.0, 8.0]


def test_quick_and_full_presets_and_the_slo_default():
    from infinillm.sim.cli import SLO_TPOT_S, SLO_TTFT_S

    full, quick = parse_args([]), parse_args(["--quick"])
    assert full.instances == [8, 32] and full.context_instances == [1, 2, 4, 8, 16, 32]
    assert quick.instances == [2, 4] and quick.num_requests == 60 and quick.max_rates == 2
    assert full.slo == (SLO_TTFT_S, SLO_TPOT_S)
    assert parse_args(["--no-serve"]).serve_max_instances == 0
    with pytest.raises(SystemExit):
        parse_args(["--traces", "short,bogus"])


def test_capacity_estimate_grows_with_instances_and_shrinks_with_length():
    one = capacity_estimate("llama2-13b", "a100-80gb", 1, "short")
    assert capacity_estimate("llama2-13b", "a100-80gb", 8, "short") == pytest.approx(8 * one)
    assert capacity_estimate("llama2-13b", "a100-80gb", 1, "long") < one / 5


def test_summarize_sweep_with_no_rate_within_the_slo():
    sweep = RateSweep("mixed", 2, Job("rate", "m", "d", 2, ""), [1.0], max_rates=1)
    for p in POLICIES:
        sweep.add({"rate_index": 0, "rate": 1.0, "policy": p, "slo_attainment": 0.2,
                   **{key: 0.0 if p == "multi" else 3.0 for key in METRICS.values()}})
    s = summarize_sweep(sweep, 0.9)
    assert all(v["sustained_rate"] is None for v in s["policies"].values())
    assert s["peak_ratios"]["output_lending/multi"] is None  # nothing to divide by
    assert s["peak_ratios"]["output_lending/single"] == 1.0
