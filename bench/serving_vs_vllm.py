"""How does infinillm's OpenAI server compare with vLLM's? One after the other, at Poisson loads.

    python -m bench.serving_vs_vllm [--systems infinillm,vllm] [--instances 2] [--rates 1,2,4]
        [--engine-process on|off|on,off] [--num-requests 40] [--input-len 64-256]
        [--output-len 32-128] [--duration-cap 60]

For each system (and each `--instances` count for infinillm: `--instances 1,2` runs both; one
instance is the like-for-like peer of vLLM's one engine; `--engine-process on,off` runs each with
the engine in its own process and on a thread of the API process) the script starts the server as a
subprocess on a free loopback port (bench.lib.servers; vLLM's command from bench.lib.vllm), times
its start-up (launch to /health for infinillm, /v1/models for vLLM), sends `--warmup` short untimed
requests, then for each rate a seeded workload (bench.lib.workloads `uniform`): Poisson arrivals,
prompts of random token ids (the same ids for both engines), greedy, ignore_eos, `max_tokens`
uniform in --output-len, streamed with usage (bench.lib.http_load). Between rates it waits until the
server's /metrics shows no request held. A rate stops at --duration-cap seconds: streams still open
are cut, unsent requests dropped (both counted). Then it stops the server (SIGINT, then SIGKILL of
its process group after --stop-timeout) and checks that none of its processes is left (any are
killed and listed as `orphans`). Without .venv-vllm the vLLM system is skipped with a note.

Servers never run at the same time; the client shares the 2 cores with the server being
measured, alike for both. Both run with prefix caching off, and each rate draws its own prompts
anyway. Prints a table per system (a row per rate; percentiles are nearest rank,
bench.lib.metrics), start-up times, the ratios infinillm / vLLM per rate (throughput: above 1 is
better; TTFT, TPOT: below 1 is better), and LAST one JSON line with every figure, the machine
and the settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx

from bench.lib.http_load import run_load, summarize_streams, texts, wait_idle
from bench.lib.report import emit_json, machine_info, other_benchmarks, print_table
from bench.lib.servers import Server, ServerSpec, free_port
from bench.lib.vllm import VLLM_ENV, api_server_command, have_vllm
from bench.lib.workloads import make_workload, parse_range

BUSY_METRICS = {
    "infinillm": ("infinillm_num_requests_running_all", "infinillm_num_requests_waiting_all"),
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
}


def server_specs(args, model_dir: str) -> list[ServerSpec]:
    """What to start, without the port (each start gets a fresh free one)."""
    specs = []
    for system in args.systems:
        if system == "infinillm":
            for n in args.instances:
                for process in args.engine_process:
                    # this interpreter, so that the server runs the same infinillm as this script
                    cmd = [sys.executable, "-m", "infinillm.cli", "serve", "--instances", str(n)]
                    cmd += ["--model", args.model] if args.model else []
                    cmd += ["--kv-blocks", str(args.kv_blocks)] if args.kv_blocks else []
                    cmd += [] if process == "on" else ["--no-engine-process"]
                    cmd += ["--no-prefix-caching"]  # as vLLM's server here
                    label = f"infinillm x{n}" + ("" if process == "on" else " (engine thread)")
                    specs.append(ServerSpec(label, "infinillm", cmd, {}, "/health"))
        elif have_vllm():
            specs.append(ServerSpec("vllm", "vllm", api_server_command(model_dir), VLLM_ENV,
                                    "/v1/models"))
        else:
            print("[serving] no .venv-vllm: vLLM skipped (bench/setup_vllm.sh makes it)",
                  file=sys.stderr)
    return specs


def bench_system(spec: ServerSpec, workloads: dict, args) -> dict:
    server = Server(spec, free_port())
    result = {"command": server.command, "env": spec.env, "runs": []}
    try:
        result["startup_s"] = server.start(args.startup_timeout)
        print(f"[serving] {spec.label}: ready in {result['startup_s']:.1f} s", file=sys.stderr)
        model = httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        result["model_id"] = model
        result["warmup_s"] = asyncio.run(_warm_up(server.base_url, model, workloads["warmup"]))
        for rate in args.rates:
            result["runs"].append(_one_rate(server, spec, model, rate, workloads[rate], args))
        result["texts"] = {r["rate"]: r.pop("texts") for r in result["runs"]}
    except Exception as e:  # still stop the server; the report says what went wrong
        result["failure"] = f"{type(e).__name__}: {e}"
        print(f"[serving] {spec.label} failed: {e}\n{server.log_tail()}", file=sys.stderr)
    finally:
        if server.proc is not None:
            result.update(server.stop(args.stop_timeout))
    return result


def _one_rate(server: Server, spec: ServerSpec, model: str, rate: float, workload, args) -> dict:
    idle = asyncio.run(wait_idle(server.base_url, BUSY_METRICS[spec.kind]))
    records, span = asyncio.run(run_load(server.base_url, model, workload, args.duration_cap))
    server.note_pids()
    run = {"rate": rate, "idle_before": idle, **summarize_streams(records, span),
           "texts": texts(records)}
    print(f"[serving] {spec.label} rate {rate}: {run['completed']}/{len(workload)} done in "
          f"{span:.1f} s, {run['errors']} errors", file=sys.stderr)
    return run


async def _warm_up(base_url: str, model: str, workload) -> float:
    t0 = time.perf_counter()
    records, _ = await run_load(base_url, model, workload, duration_cap=120)
    bad = [r.error or r.status for r in records if r.status != "ok"]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad[:3]}")
    return time.perf_counter() - t0


# ---- reporting -------------------------------------------------------------------------------

COLUMNS = {"rate": "rate/s", "completed": "done", "errors": "err", "cut": "cut",
           "request_throughput": "req/s", "output_tokens_per_s": "out tok/s",
           "ttft_p50_ms": "TTFT p50", "ttft_p99_ms": "TTFT p99", "tpot_p50_ms": "TPOT p50",
           "tpot_p99_ms": "TPOT p99", "latency_p50_ms": "lat p50", "latency_p99_ms": "lat p99",
           "mean_in_flight": "in flight"}
RATIOS = {"request_throughput": "req/s", "output_tokens_per_s": "tok/s",
          "ttft_p50_ms": "TTFT p50", "ttft_p99_ms": "TTFT p99", "tpot_p50_ms": "TPOT p50",
          "tpot_p99_ms": "TPOT p99"}


def print_system(label: str, result: dict) -> None:
    print(f"\n{label}: start-up {result.get('startup_s', float('nan')):.1f} s, "
          f"stopped by {result.get('stopped_by')}, orphans {result.get('orphans')} "
          "(times in ms)")
    if "failure" in result:
        print(f"  FAILED: {result['failure']}")
    print_table([{title: _round(run.get(key)) for key, title in COLUMNS.items()}
                 for run in result["runs"]])


def comparison(results: dict) -> list[dict]:
    """infinillm / vLLM per rate for each infinillm configuration, and how many completed
    requests made the same greedy text on both."""
    if "vllm" not in results:
        return []
    theirs = {run["rate"]: run for run in results["vllm"]["runs"]}
    rows = []
    for label, result in results.items():
        if label == "vllm":
            continue
        for run in result["runs"]:
            other = theirs.get(run["rate"])
            if other is None:
                continue
            row = {"system": label, "rate/s": run["rate"]}
            for key, title in RATIOS.items():
                a, b = run.get(key), other.get(key)
                row[title] = round(a / b, 3) if a is not None and b else None
            ours_texts = result.get("texts", {}).get(run["rate"], [])
            theirs_texts = results["vllm"].get("texts", {}).get(run["rate"], [])
            pairs = [(x, y) for x, y in zip(ours_texts, theirs_texts)
                     if x is not None and y is not None]
            row["same text"] = f"{sum(x == y for x, y in pairs)}/{len(pairs)}"
            rows.append(row)
    return rows


def print_comparison(rows: list[dict]) -> None:
    print("\ninfinillm / vLLM (throughput: above 1 is better; TTFT, TPOT: below 1 is better)")
    print_table([{k: f"{v:.2f}".rstrip("0").rstrip(".") if k == "rate/s" else
                  (f"{v:.2f}" if isinstance(v, float) else "-" if v is None else v)
                  for k, v in row.items()} for row in rows])


def _round(value):
    """Cells as text: print_table would give every float three decimals."""
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}".rstrip("0").rstrip(".")
    return "-" if value is None else value


# ---- main ------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="infinillm,vllm")
    ap.add_argument("--instances", default="2", help="infinillm instance counts, e.g. 1,2")
    ap.add_argument("--engine-process", default="on",
                    help="infinillm's engine: on (its own process), off (a thread of the API "
                         "process) or on,off (both, one after the other)")
    ap.add_argument("--rates", default="1,2,4", help="requests per second")
    ap.add_argument("--num-requests", type=int, default=40, help="per rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input-len", default="64-256", help="prompt tokens, uniform range")
    ap.add_argument("--output-len", default="32-128", help="max_tokens, uniform range")
    ap.add_argument("--duration-cap", type=float, default=60.0, help="seconds per rate")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests after start-up")
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--kv-blocks", type=int, default=None, help="infinillm blocks per instance")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--stop-timeout", type=float, default=30.0)
    args = ap.parse_args()
    args.systems = [s for s in args.systems.split(",") if s]
    if not args.systems or set(args.systems) - {"infinillm", "vllm"}:
        ap.error(f"--systems takes infinillm and/or vllm, got {args.systems}")
    args.instances = [int(n) for n in args.instances.split(",")]
    args.engine_process = [p for p in args.engine_process.split(",") if p]
    if not args.engine_process or set(args.engine_process) - {"on", "off"}:
        ap.error(f"--engine-process takes on and/or off, got {args.engine_process}")
    args.rates = [float(r) for r in args.rates.split(",")]
    args.input_len, args.output_len = parse_range(args.input_len), parse_range(args.output_len)
    if min(args.instances) < 1 or min(args.rates) <= 0 or args.num_requests < 1:
        ap.error(f"need instances >= 1, rates > 0, num-requests >= 1, got "
                 f"{args.instances}, {args.rates}, {args.num_requests}")
    return args


def resolve_model(model: str | None) -> str:
    if model:
        return str(Path(model).resolve())
    from infinillm.model.default_model import default_model_path

    return str(default_model_path())


def make_workloads(args, vocab: int) -> dict:
    """Per rate, and the warm-up ("warmup"): 2 requests of 32 tokens making 8."""
    workloads = {rate: make_workload("uniform", args.num_requests, vocab, seed=args.seed,
                                     rate=rate, prompt_len=args.input_len,
                                     new_tokens=args.output_len)
                 for rate in args.rates}
    workloads["warmup"] = make_workload("uniform", args.warmup, vocab, seed=args.seed + 1,
                                        rate=100.0, prompt_len=(32, 32), new_tokens=(8, 8))
    return workloads


def main() -> None:
    args = parse_args()
    busy = other_benchmarks()
    if busy:
        print(f"[serving] warning: other benchmarks running: {busy}", file=sys.stderr)
    model_dir = resolve_model(args.model)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    workloads = make_workloads(args, vocab)
    results = {}
    for spec in server_specs(args, model_dir):
        results[spec.label] = bench_system(spec, workloads, args)
        print_system(spec.label, results[spec.label])
    rows = comparison(results)
    if rows:
        print_comparison(rows)
    for result in results.values():  # the texts were for the comparison only
        result.pop("texts", None)
        for run in result["runs"]:
            run.pop("texts", None)
    emit_json({"bench": "serving_vs_vllm", "machine": machine_info(), "model": model_dir,
               "vocab_size": vocab, "settings": vars(args), "other_benchmarks_at_start": busy,
               "other_benchmarks_at_end": other_benchmarks(), "loadavg_at_end": os.getloadavg(),
               "systems": results, "comparison": rows})


if __name__ == "__main__":
    main()
