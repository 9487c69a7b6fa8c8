"""Where a decode step's time goes, by part, at a few batch sizes (one instance, in-process).

    python -m bench.decode_profile [--model DIR] [--batch-sizes 32,64] [--steps 16] [--threads N]

For each batch size: that many seeded `offline` prompts (32-40 tokens), greedy; the engine steps
until every request has decoded a few tokens, then `--steps` decode steps are timed by part, with
perf_counter around the engine's and worker's own functions (CPU tensors: no device queue, so a
section's wall time is its work):

    schedule+update  engine.step minus executor.execute (scheduler, block tables, outputs)
    rows             Worker.rows: the flat batch and the attention's slot tables (Python, tensors)
    tensors          the rest of execute outside the forward and sampling (input tensors)
    linears          every Linear but the LM head (qkv, o, gate/up, down)
    attention        the attention callback of all layers (K/V writes, kernels)
    lm_head          the LM head over the sampled rows
    other forward    embedding, norms, rotary, residuals, activation
    sample           Worker.finish (sampler, logprobs)

Prints a table (ms per step and share) and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from bench.lib.ours import greedy, model_info
from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.workloads import make_workload

PARTS = ("schedule+update", "rows", "tensors", "linears", "attention", "lm_head",
         "other forward", "sample")


def _timed(acc: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] += time.perf_counter() - started
    return wrapper


def instrument(llm, acc: dict):
    """Wrap the engine's, executor's, worker's and model's functions to add their time to acc;
    returns what undoes the one class-level patch (Linear)."""
    from infinillm.model.linear import Linear

    engine = llm.engine
    worker = next(iter(engine.executor.workers.values()))
    model = worker.model
    engine.step = _timed(acc, "step", engine.step)
    engine.executor.execute = _timed(acc, "execute", engine.executor.execute)
    worker.rows = _timed(acc, "rows", worker.rows)
    worker.finish = _timed(acc, "sample", worker.finish)
    forward = model.forward

    def timed_forward(input_ids, positions, attn, rows):
        return _timed(acc, "forward", forward)(input_ids, positions,
                                              _timed(acc, "attention", attn), rows)

    model.forward = timed_forward
    call = Linear.__call__

    def timed_linear(self, x, **kwargs):
        key = "lm_head" if self is model.lm_head else "linears"
        return _timed(acc, key, call)(self, x, **kwargs)

    Linear.__call__ = timed_linear
    return lambda: setattr(Linear, "__call__", call)


def profile(model: str | None, prompts: list[list[int]], num_steps: int,
            num_threads: int | None) -> dict[str, float]:
    """Per decode step: milliseconds by part."""
    from infinillm import LLM

    llm = LLM(model, num_threads=num_threads)
    engine = llm.engine
    for p in prompts:
        engine.add_request(p, greedy(num_steps + 100))
    for _ in range(100):  # prefill (in chunks), then two decode steps as warm-up
        engine.step()
        if engine.last_step.instances[0].num_tokens == len(prompts):
            break
    engine.step()
    engine.step()
    acc: dict[str, float] = defaultdict(float)
    restore = instrument(llm, acc)
    try:
        for _ in range(num_steps):
            engine.step()
            if engine.last_step.instances[0].num_tokens != len(prompts):
                raise RuntimeError(f"not a pure decode step: {engine.last_step}")
    finally:
        restore()
    ms = {k: v / num_steps * 1e3 for k, v in acc.items()}
    return {
        "step": ms["step"],
        "schedule+update": ms["step"] - ms["execute"],
        "rows": ms["rows"],
        "tensors": ms["execute"] - ms["rows"] - ms["forward"] - ms["sample"],
        "linears": ms["linears"],
        "attention": ms["attention"],
        "lm_head": ms["lm_head"],
        "other forward": ms["forward"] - ms["linears"] - ms["attention"] - ms["lm_head"],
        "sample": ms["sample"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument("--batch-sizes", default="32,64")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 where other work shares the cores")
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    model_path, arch = model_info(args.model)
    requests = make_workload("offline", max(sizes), arch.vocab_size, seed=0,
                             new_tokens=(args.steps, args.steps))
    prompts = [a.prompt_ids for a in requests]
    results = {b: profile(args.model, prompts[:b], args.steps, args.threads) for b in sizes}
    rows = []
    for part in ("step", *PARTS):
        row = {"part": part}
        for b, ms in results.items():
            row[f"b{b} ms"] = round(ms[part], 2)
            row[f"b{b} %"] = round(100 * ms[part] / ms["step"], 1)
        rows.append(row)
    print_table(rows)
    emit_json({"bench": "decode_profile", "machine": machine_info(), "model": str(model_path),
               "steps": args.steps, "ms_per_step": {str(b): ms for b, ms in results.items()}})


if __name__ == "__main__":
    main()
