"""Does the server stay healthy under a long mixed load? A soak of `infinillm serve`.

    python -m bench.soak [--duration 600] [--clients 64] [--instances 2] [--kv-blocks 48]
        [--prompt-len 16-128] [--long-prompt-len 700-1000] [--long-share 0.1]
        [--output-len 4-32] [--warmup 60] [--sample-every 5]
        [--hang-s 300] [--model PATH] [--plot docs/img/soak.png] [--seed 0]

The server runs as a subprocess (bench.lib.servers) with small pools, so that lending is under
pressure. `--clients` concurrent clients each send one request after another until
`--duration` seconds have passed: a tenth send hostile bodies (malformed, wrong types, NaN,
huge n / max_tokens, deep nesting, invalid UTF-8, wrong method or content type; one every
`--hostile-gap-s` seconds each), a third leave every stream after a random number of chunks,
and the rest read every stream to its end (seeded greedy completions of random token ids with
ignore_eos, bench.lib.http_load); `--long-share` of them have a prompt longer than one pool
(`--long-prompt-len`), which its owner must borrow blocks for. Then no new request is sent,
the streams in flight end, and the script waits for every pool to be full again.

Every `--sample-every` seconds it records the server process's RSS and open file descriptors
(/proc), the blocks in use and lent (/v1/cluster), and the latency of the streams completed
since the last sample. Targets, each reported as measured with pass or fail:
- no 5xx: no status >= 500 and no error event, on the clients' side and in the server's own
  /metrics count;
- no hung client: every request got each next byte within `--hang-s` seconds and ended before
  the drain ended;
- no leaked block: every pool is full once the load is over;
- RSS growth <= 5 % from the end of `--warmup` to the end of the load.

Prints a table of samples (one row a minute), the targets, and LAST one JSON line with every
figure, the samples, the machine and the settings; writes a plot of the four series over time.
The clients run in this process and share the cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.lib.http_load import StreamRecord, send_one
from bench.lib.metrics import percentile
from bench.lib.ours import model_info
from bench.lib.report import emit_json, machine_info, other_benchmarks, print_table
from bench.lib.servers import Server, ServerSpec, free_port
from bench.lib.workloads import MIN_REGULAR_TOKEN_ID, Arrival, parse_range

RSS_GROWTH_LIMIT = 0.05
# Bodies and requests that every server must refuse with 4xx: (method, path, body, type).
HOSTILE = [
    ("POST", "/v1/completions", b"{", "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "a", "max_tokens": "9"}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "a", "n": 1000000}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "a", "max_tokens": 1000000000}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "a", "stop": [' + b'"x",' * 99 + b'"x"]}',
     "application/json"),
    ("POST", "/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "\\ud800"}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": [1, 99999999]}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "a", "model": "gpt-4"}', "application/json"),
    ("POST", "/v1/completions", b'{"prompt": "a"}', "text/plain"),
    ("POST", "/v1/chat/completions", b'{"messages": []}', "application/json"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}',
     "application/json"),
    ("GET", "/v1/completions", b"", "application/json"),
]


@dataclass
class Tally:
    """What the clients saw, filled in as the load runs."""

    streams: list[tuple[str, StreamRecord]] = field(default_factory=list)  # (role, record)
    hostile: dict[str, int] = field(default_factory=dict)  # status (or error) -> count

    def count_hostile(self, outcome: str) -> None:
        self.hostile[outcome] = self.hostile.get(outcome, 0) + 1


def roles(num_clients: int) -> list[str]:
    """A tenth hostile, a third leaving mid-stream, the rest reading to the end."""
    hostile, leaving = round(num_clients / 10), round(num_clients / 3)
    return ["hostile"] * hostile + ["leaving"] * leaving + ["full"] * (
        num_clients - hostile - leaving)


async def stream_client(client: httpx.AsyncClient, model: str, role: str, rng: random.Random,
                        args, vocab: int, t0: float, stop: asyncio.Event, tally: Tally) -> None:
    while not stop.is_set():
        lengths = args.long_prompt_len if rng.random() < args.long_share else args.prompt_len
        prompt = [rng.randrange(MIN_REGULAR_TOKEN_ID, vocab)
                  for _ in range(rng.randint(*lengths))]
        max_new = rng.randint(*args.output_len)
        rec = StreamRecord(Arrival(time.perf_counter() - t0, prompt, max_new))
        leave = rng.randint(1, max(1, max_new - 1)) if role == "leaving" else None
        tally.streams.append((role, rec))
        await send_one(client, model, rec, t0, leave_after=leave)


async def hostile_client(client: httpx.AsyncClient, rng: random.Random, gap_s: float,
                         stop: asyncio.Event, tally: Tally) -> None:
    while not stop.is_set():
        method, path, body, ctype = rng.choice(HOSTILE)
        try:
            r = await client.request(method, path, content=body,
                                     headers={"content-type": ctype})
            tally.count_hostile(str(r.status_code))
        except httpx.HTTPError as e:
            tally.count_hostile(type(e).__name__)
        try:  # the pace of a hostile client (a rate, not a wait for an event)
            await asyncio.wait_for(stop.wait(), gap_s)
        except TimeoutError:
            pass


# ---- what the server holds -------------------------------------------------------------------

def proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # the file counts kB
    raise RuntimeError(f"no VmRSS for process {pid}")


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def blocks(stats: dict) -> dict:
    insts = stats["instances"]
    return {"blocks_in_use": sum(i["total_blocks"] - i["free_blocks"] for i in insts),
            "lent_blocks": sum(i["lent_blocks"] for i in insts),
            "running": sum(i["running"] for i in insts),
            "waiting": sum(i["waiting"] for i in insts)}


def server_5xx(metrics_text: str) -> int:
    """Responses with status >= 500 in the server's own count (infinillm_http_requests_total)."""
    total = 0
    for line in metrics_text.splitlines():
        if line.startswith("infinillm_http_requests_total{") and 'status="5' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


async def sample(client: httpx.AsyncClient, pid: int, t0: float, tally: Tally,
                 since_s: float) -> dict:
    now = time.perf_counter() - t0
    done = [rec for _, rec in tally.streams
            if rec.status == "ok" and rec.end_s is not None and rec.end_s > since_s]
    latencies = [rec.end_s - rec.sent_s for rec in done]
    ttfts = [rec.first_text_s - rec.sent_s for rec in done if rec.first_text_s is not None]
    stats = (await client.get("/v1/cluster")).json()

    def ms(values, q):
        p = percentile(values, q)
        return None if p is None else round(p * 1e3, 1)

    return {"t_s": round(now, 1), "rss_mib": round(proc_rss_mib(pid), 1), "fds": proc_fds(pid),
            **blocks(stats), "completed": len(done),
            "left": sum(r.status == "cut" for role, r in tally.streams if role == "leaving"),
            "hostile": sum(tally.hostile.values()), "latency_p50_ms": ms(latencies, 50),
            "latency_p99_ms": ms(latencies, 99), "ttft_p99_ms": ms(ttfts, 99)}


async def sampler(client: httpx.AsyncClient, pid: int, t0: float, every_s: float,
                  stop: asyncio.Event, tally: Tally, samples: list[dict]) -> None:
    since = 0.0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass
        samples.append(await sample(client, pid, t0, tally, since))
        since = samples[-1]["t_s"]


async def wait_all_free(client: httpx.AsyncClient, timeout_s: float) -> dict:
    """Poll /v1/cluster until every pool is full and nothing runs; the last stats."""
    deadline = time.perf_counter() + timeout_s
    while True:
        stats = (await client.get("/v1/cluster")).json()
        b = blocks(stats)
        if (not b["blocks_in_use"] and not b["running"] and not b["waiting"]
                and not stats["debts"]) or time.perf_counter() > deadline:
            return stats
        await asyncio.sleep(0.5)


# ---- the run ---------------------------------------------------------------------------------

async def soak(base_url: str, pid: int, model: str, vocab: int, args) -> dict:
    rng = random.Random(args.seed)
    tally, samples = Tally(), []
    stop_load, stop_sampling = asyncio.Event(), asyncio.Event()
    timeout = httpx.Timeout(30.0, read=args.hang_s)
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client, \
            httpx.AsyncClient(base_url=base_url, timeout=60.0) as probe:
        t0 = time.perf_counter()
        samples.append(await sample(probe, pid, t0, tally, 0.0))
        watcher = asyncio.create_task(sampler(probe, pid, t0, args.sample_every, stop_sampling,
                                              tally, samples))
        tasks = []
        for role in roles(args.clients):
            crng = random.Random(rng.random())
            tasks.append(asyncio.create_task(
                hostile_client(client, crng, args.hostile_gap_s, stop_load, tally)
                if role == "hostile" else
                stream_client(client, model, role, crng, args, vocab, t0, stop_load, tally)))
        await asyncio.sleep(args.duration)  # the length of the run
        stop_load.set()
        load_end_s = time.perf_counter() - t0
        _, stuck = await asyncio.wait(tasks, timeout=args.hang_s + 30)
        for task in stuck:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop_sampling.set()
        await watcher
        stats = await wait_all_free(probe, 60.0)
        after = await sample(probe, pid, t0, tally, samples[-1]["t_s"])
        metrics = (await probe.get("/metrics")).text
    return {"tally": tally, "samples": samples, "after": after, "final_stats": stats,
            "load_end_s": load_end_s, "stuck_clients": len(stuck),
            "server_5xx": server_5xx(metrics)}


def outcome(run: dict, args) -> dict:
    """The figures and the targets."""
    tally, samples = run["tally"], run["samples"]
    streams = [rec for _, rec in tally.streams]
    errors = [rec.error for rec in streams if rec.error]
    client_5xx = sum(e.startswith(("HTTP 5", "error event")) for e in errors)
    hostile_5xx = sum(n for status, n in tally.hostile.items() if status.startswith("5"))
    hung = sum("Timeout" in e for e in errors) + run["stuck_clients"]
    warm = next((s for s in samples if s["t_s"] >= args.warmup), samples[-1])
    last = [s for s in samples if s["t_s"] <= run["load_end_s"] + 1e-6][-1]
    growth = last["rss_mib"] / warm["rss_mib"] - 1
    post = [s for s in samples if warm["t_s"] <= s["t_s"] <= last["t_s"]]
    leaked = blocks(run["final_stats"])["blocks_in_use"]
    targets = {
        "5xx": (client_5xx + hostile_5xx + run["server_5xx"], 0),
        "hung clients": (hung, 0),
        "leaked blocks": (leaked, 0),
        "RSS growth after warm-up %": (round(100 * growth, 2), 100 * RSS_GROWTH_LIMIT),
    }
    lat = [rec.end_s - rec.sent_s for _, rec in tally.streams if rec.status == "ok"]
    return {
        "targets": {k: {"value": v, "limit": lim, "ok": v <= lim} for k, (v, lim) in
                    targets.items()},
        "streams": len(streams), "completed": sum(r.status == "ok" for r in streams),
        "left_mid_stream": sum(r.status == "cut" for r in streams),
        "stream_errors": len(errors), "first_errors": errors[:5],
        "hostile": tally.hostile, "server_5xx": run["server_5xx"],
        "rss_start_mib": samples[0]["rss_mib"], "rss_warm_mib": warm["rss_mib"],
        "rss_end_mib": last["rss_mib"], "rss_after_drain_mib": run["after"]["rss_mib"],
        "rss_slope_mib_per_min": round(_slope([(s["t_s"], s["rss_mib"]) for s in post]) * 60, 3),
        "rss_growth_last_half_pct": round(100 * _half_growth(post), 2),
        "fds_warm": warm["fds"], "fds_end": last["fds"], "fds_after_drain": run["after"]["fds"],
        "max_lent_blocks": max(s["lent_blocks"] for s in samples),
        "latency_p50_ms": _ms(percentile(lat, 50)), "latency_p99_ms": _ms(percentile(lat, 99)),
        "latency_max_ms": _ms(max(lat, default=None)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two points)."""
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def _half_growth(samples: list[dict]) -> float:
    """RSS growth over the second half of the samples after warm-up (does it level off?)."""
    if len(samples) < 2:
        return 0.0
    mid = samples[len(samples) // 2]
    return samples[-1]["rss_mib"] / mid["rss_mib"] - 1


# ---- report ----------------------------------------------------------------------------------

def print_report(samples: list[dict], result: dict, every_s: float) -> None:
    step = max(1, round(60 / every_s))
    rows = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    print("\nServer over time (latency of the streams completed in the window before each row; "
          "ms)")
    print_table([{k: ("-" if v is None else v) for k, v in row.items()} for row in rows])
    print("\nTargets")
    print_table([{"target": k, "measured": t["value"], "limit": t["limit"],
                  "result": "pass" if t["ok"] else "FAIL"}
                 for k, t in result["targets"].items()])
    print(f"\nstreams {result['streams']} (completed {result['completed']}, left mid-stream "
          f"{result['left_mid_stream']}, errors {result['stream_errors']}); hostile "
          f"{result['hostile']}; RSS {result['rss_warm_mib']} MiB after warm-up -> "
          f"{result['rss_end_mib']} MiB at the end ({result['rss_slope_mib_per_min']} MiB/min)")


def plot(samples: list[dict], warmup_s: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    series = [("RSS (MiB)", [("rss_mib", "server RSS")]),
              ("open file descriptors", [("fds", "server fds")]),
              ("blocks", [("blocks_in_use", "in use (all pools)"), ("lent_blocks", "lent")]),
              ("latency (s)", [("latency_p50_ms", "p50"), ("latency_p99_ms", "p99")])]
    for ax, (ylabel, keys) in zip(axes, series, strict=True):
        for key, label in keys:
            scale = 1e-3 if key.endswith("_ms") else 1
            points = [(x, s[key] * scale) for x, s in zip(t, samples) if s[key] is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, lw=1.2)
        ax.axvline(warmup_s / 60, color="0.6", ls="--", lw=1)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_title(title, fontsize=10)
    axes[-1].set_xlabel("minutes (dashed: end of warm-up)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---- main ------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients")
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--kv-blocks", type=int, default=48, help="blocks per instance (16 tokens)")
    ap.add_argument("--prompt-len", default="16-128", help="prompt tokens, uniform range")
    ap.add_argument("--long-prompt-len", default="700-1000",
                    help="prompt tokens of the long requests (one pool holds 16 x --kv-blocks)")
    ap.add_argument("--long-share", type=float, default=0.1, help="share of long requests")
    ap.add_argument("--output-len", default="4-32", help="max_tokens, uniform range")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS is compared")
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--hang-s", type=float, default=300.0,
                    help="a client waiting this long for a byte is hung")
    ap.add_argument("--hostile-gap-s", type=float, default=0.25,
                    help="seconds between two requests of a hostile client")
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--plot", default="docs/img/soak.png", help="where to write the figure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--stop-timeout", type=float, default=30.0)
    args = ap.parse_args()
    args.prompt_len, args.output_len = parse_range(args.prompt_len), parse_range(args.output_len)
    args.long_prompt_len = parse_range(args.long_prompt_len)
    if args.duration <= 0 or args.clients < 1 or args.instances < 1 or args.sample_every <= 0:
        ap.error(f"need duration > 0, clients >= 1, instances >= 1, sample-every > 0, got "
                 f"{args.duration}, {args.clients}, {args.instances}, {args.sample_every}")
    return args


def main() -> None:
    args = parse_args()
    busy = other_benchmarks()
    if busy:
        print(f"[soak] warning: other benchmarks running: {busy}", file=sys.stderr)
    model_dir, arch = model_info(args.model)
    cmd = [sys.executable, "-m", "infinillm.cli", "serve", "--instances", str(args.instances),
           "--kv-blocks", str(args.kv_blocks), "--model", str(model_dir)]
    server = Server(ServerSpec(f"infinillm x{args.instances}", "infinillm", cmd, {}, "/health"),
                    free_port())
    report = {"bench": "soak", "machine": machine_info(), "model": str(model_dir),
              "command": server.command, "settings": vars(args),
              "other_benchmarks_at_start": busy}
    try:
        report["startup_s"] = server.start(args.startup_timeout)
        model = httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        print(f"[soak] server up in {report['startup_s']:.1f} s; {args.duration:.0f} s of load",
              file=sys.stderr)
        run = asyncio.run(soak(server.base_url, server.proc.pid, model, arch.vocab_size, args))
        result = outcome(run, args)
        report.update(result, samples=run["samples"], after_drain=run["after"])
        print_report(run["samples"], result, args.sample_every)
        title = (f"infinillm serve x{args.instances}, {args.kv_blocks} blocks each: "
                 f"{args.clients} clients (a third leave, a tenth hostile)")
        plot(run["samples"], args.warmup, title, Path(args.plot))
        report["plot"] = args.plot
    except Exception as e:  # still stop the server; the report says what went wrong
        report["failure"] = f"{type(e).__name__}: {e}"
        print(f"[soak] failed: {e}\n{server.log_tail()}", file=sys.stderr)
    finally:
        if server.proc is not None:
            report.update(server.stop(args.stop_timeout))
    report["other_benchmarks_at_end"] = other_benchmarks()
    report["loadavg_at_end"] = os.getloadavg()
    emit_json(report)


if __name__ == "__main__":
    main()
