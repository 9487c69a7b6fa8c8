"""What logit controls and logprobs cost per step, measured side by side.

    python -m bench.sampling_overhead [--batch 32] [--rounds 7] [--steps 24] [--device cpu]
                                      [--threads N] [--no-steps]

Two parts, each alternating its configurations in every round (ABC CBA ...) so that drift of a
shared machine cancels; medians over rounds, with the ratio to the baseline of the same round:

1. The sampler alone on `--batch` rows of the default model's vocabulary (49,152 float32
   logits), each request with a 256-token prompt and a 128-token output so far:
   `argmax` (the batch's argmax and nothing else: what a greedy batch cost before the controls
   existed), `plain` (sample() on a greedy batch that sets no control: the check that skips
   them), `one` (one request of the batch sets repetition, frequency and presence penalties
   and a logit_bias), `all` (every request does), `logprobs` (a plain batch, plus the top-5
   logprobs of every sampled token).
2. Whole decode steps of the default model (`engine.step()`, greedy, ignore_eos) on a batch of
   `--batch // 2` requests with 200-256-token prompts: `plain` against `penalties` (every
   request sets the same controls as in part 1), one engine each, the same prompts, timed in
   turns of `--steps` steps; every timed step decodes the whole batch.

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.workloads import seeded_prompts
from infinillm.runtime.sampler import sample, token_logprobs
from infinillm.types import SamplingParams

VOCAB = 49152
PLAIN = SamplingParams(temperature=0, ignore_eos=True)
CONTROLLED = SamplingParams(temperature=0, ignore_eos=True, repetition_penalty=1.2,
                            frequency_penalty=0.5, presence_penalty=0.5, logit_bias={17: 2.0})


def _sampler_cases(batch: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, VOCAB, generator=gen) * 3).to(device)
    prompts = [torch.randint(0, VOCAB, (256,), generator=gen).tolist() for _ in range(batch)]
    outputs = [torch.randint(0, VOCAB, (128,), generator=gen).tolist() for _ in range(batch)]
    counts = [128] * batch
    one = [CONTROLLED] + [PLAIN] * (batch - 1)

    def run(params):
        return lambda: sample(logits, params, counts, prompts, outputs)

    def with_logprobs():
        tokens = sample(logits, [PLAIN] * batch, counts, prompts, outputs)
        token_logprobs(logits, tokens, [5] * batch)

    return {
        "argmax": lambda: logits.argmax(dim=-1).tolist(),
        "plain": run([PLAIN] * batch),
        "one": run(one),
        "all": run([CONTROLLED] * batch),
        "logprobs": with_logprobs,
    }


def _time_ms(fn, repeat: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) * 1e3 / repeat


def _alternating(names: list[str], rounds: int):
    for r in range(rounds):
        yield r, names if r % 2 == 0 else names[::-1]


def bench_sampler(batch: int, rounds: int, device: str) -> list[dict]:
    cases = _sampler_cases(batch, device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _, order in _alternating(list(cases), rounds):
        for name in order:
            samples[name].append(_time_ms(cases[name], 20))
    return _rows("sampler", samples, "argmax", rounds)


def bench_steps(batch: int, rounds: int, steps: int, device: str) -> list[dict]:
    from infinillm import LLM

    configs = {"plain": PLAIN, "penalties": CONTROLLED}
    total = rounds * steps + 64  # tokens each request may produce: it outlasts the run
    engines = {}
    for name, params in configs.items():  # one engine each, the same prompts decoding
        engine = LLM(device=device, kv_blocks_per_instance=1024, max_num_seqs=batch).engine
        prompts = seeded_prompts(engine.arch.vocab_size, batch, 200, 256, seed=1)
        fields = {f: getattr(params, f) for f in SamplingParams.__dataclass_fields__}
        for prompt in prompts:
            engine.add_request(prompt, SamplingParams(**{**fields, "max_tokens": total}))
        while engine.last_step is None or engine.last_step.num_tokens != batch:
            engine.step()  # prefill, until a step decodes the whole batch
        engines[name] = engine
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for _, order in _alternating(list(configs), rounds):
        for name in order:
            engine = engines[name]
            started = time.perf_counter()
            for _ in range(steps):
                engine.step()
            samples[name].append((time.perf_counter() - started) * 1e3 / steps)
            if engine.last_step.num_tokens != batch:
                raise RuntimeError(f"{name}: a step ran {engine.last_step.num_tokens} tokens, "
                                   f"not the batch of {batch}")
    for engine in engines.values():
        engine.shutdown()
    return _rows("decode step", samples, "plain", rounds)


def _rows(part: str, samples: dict[str, list[float]], base: str, rounds: int) -> list[dict]:
    rows = []
    for name, values in samples.items():
        ratios = [v / b for v, b in zip(values, samples[base])]
        rows.append({"part": part, "config": name, "ms_p50": statistics.median(values),
                     "ratio_p50": statistics.median(ratios), "rounds": rounds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-steps", action="store_true", help="the sampler part only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_sampler(args.batch, args.rounds, args.device)
    if not args.no_steps:
        rows += bench_steps(args.batch // 2, args.rounds, args.steps, args.device)
    print_table(rows)
    emit_json({"bench": "sampling_overhead", "rows": rows, "machine": machine_info(),
               "args": vars(args)})


if __name__ == "__main__":
    main()
