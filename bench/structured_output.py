"""What structured output (response_format json_schema) costs, measured side by side.

    python -m bench.structured_output [--batch 32] [--rounds 5] [--steps 8] [--threads N]
                                      [--no-steps]

Configurations alternate in every round (AB BA ...) so that drift of a shared machine cancels;
medians over rounds, with the ratio to the baseline of the same round.

1. Per step, on the host, for R constrained requests in a batch of B rows of the default
   model's vocabulary (49,152 float32 logits), R/B = 1/1, 1/32 and 32/32:
   `fill` (the engine's `StructuredOutput.fill_bitmasks`: llguidance computes every
   constrained request's bitmask; each matcher then consumes the next token of a valid
   document, as in decoding, and starts over at its end), `sample` (the sampler on the B rows
   with the R bitmasks applied) against `sample, none` (the same batch unconstrained, with a
   `token_bitmasks` list of None: the path every unconstrained batch takes) and `sample, old`
   (the call without the argument, as before structured output existed).
2. Whole decode steps of the default model (`engine.step()`, greedy, ignore_eos) on
   `--batch // 4` unconstrained requests plus one more: `plain` (it is unconstrained too) and
   `constrained` (it follows a JSON schema that keeps it running: at least 500 integers);
   one engine each, the same prompts, timed in turns of `--steps` steps. The figure that
   matters: tokens/s of the unconstrained requests, `constrained` against `plain`.

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.lib.report import emit_json, machine_info, print_table
from bench.lib.workloads import seeded_prompts
from infinillm.runtime.sampler import sample
from infinillm.types import RequestId, SamplingParams, ScheduledChunk, StepPlan

VOCAB = 49152
PERSON = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "member": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "member", "tags"], "additionalProperties": False}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "member": True,
            "tags": ["mathematician", "writer", "analytical engine"]}
LONG = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
        "minItems": 500}
PLAIN = SamplingParams(temperature=0, ignore_eos=True)


def _host_cases(batch: int, num_constrained: int) -> dict:
    from infinillm.engine.grammar import StructuredOutput
    from infinillm.model.default_model import default_model_path
    from infinillm.model.tokenizer import Tokenizer
    from infinillm.types import Request

    tokenizer = Tokenizer.from_pretrained(default_model_path())
    structured = StructuredOutput(tokenizer, VOCAB, tokenizer.eos_token_ids)
    params = SamplingParams(temperature=0, json_schema=json.dumps(PERSON))
    document = tokenizer.encode(json.dumps(DOCUMENT, separators=(",", ":")))
    chunks, grammars, cursors = [], [], []
    for i in range(batch):
        rid = RequestId(f"r{i}")
        chunks.append(ScheduledChunk(rid, [0], 0, [], True, params))
        if i < num_constrained:
            grammar = structured.admit(Request(rid, None, [0], params, i))
            cursors.append(i % len(document))  # staggered: each at its own place
            grammar.matcher.consume_tokens(document[: cursors[-1]])
            grammars.append(grammar)
    plan = StepPlan(0, chunks)

    def fill() -> None:
        structured.fill_bitmasks([plan])
        for k, grammar in enumerate(grammars):  # decode on: the next token of the document
            if cursors[k] == len(document):
                grammar.matcher.reset()
                cursors[k] = 0
            grammar.matcher.consume_token(document[cursors[k]])
            cursors[k] += 1

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, VOCAB, generator=gen) * 3
    plain = [PLAIN] * batch
    counts = [0] * batch
    structured.fill_bitmasks([plan])
    masks = [c.token_bitmask for c in chunks]
    return {
        "fill": fill,
        "sample": lambda: sample(logits, plain, counts, token_bitmasks=masks),
        "sample, none": lambda: sample(logits, plain, counts, token_bitmasks=[None] * batch),
        "sample, old": lambda: sample(logits, plain, counts),
    }


def _time_ms(fn, repeat: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) * 1e3 / repeat


def _alternating(names: list[str], rounds: int):
    for r in range(rounds):
        yield names if r % 2 == 0 else names[::-1]


def bench_host(rounds: int, batch: int) -> list[dict]:
    rows = []
    for b, r in ((1, 1), (batch, 1), (batch, batch)):
        cases = _host_cases(b, r)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for order in _alternating(list(cases), rounds):
            for name in order:
                samples[name].append(_time_ms(cases[name], 50))
        rows += _rows(f"host {r}/{b}", samples, "sample, old", rounds)
    return rows


def bench_steps(num_free: int, rounds: int, steps: int) -> list[dict]:
    from infinillm import LLM

    total = rounds * steps * 2 + 64  # tokens each request may produce: it outlasts the run
    free = SamplingParams(temperature=0, ignore_eos=True, max_tokens=total)
    extra = {"plain": free,
             "constrained": SamplingParams(temperature=0, max_tokens=total,
                                           json_schema=json.dumps(LONG))}
    engines = {}
    for name, params in extra.items():  # one engine each, the same prompts decoding
        engine = LLM(kv_blocks_per_instance=1024, max_num_seqs=num_free + 1).engine
        prompts = seeded_prompts(engine.arch.vocab_size, num_free + 1, 200, 256, seed=1)
        for prompt in prompts[:-1]:
            engine.add_request(prompt, free)
        engine.add_request(prompts[-1], params)
        while engine.last_step is None or engine.last_step.num_tokens != num_free + 1:
            engine.step()  # prefill, until a step decodes the whole batch
        engines[name] = engine
    samples: dict[str, list[float]] = {name: [] for name in extra}
    for order in _alternating(list(extra), rounds):
        for name in order:
            engine = engines[name]
            started = time.perf_counter()
            for _ in range(steps):
                engine.step()
            seconds = time.perf_counter() - started
            samples[name].append(num_free * steps / seconds)  # unconstrained tokens/s
            if engine.last_step.num_tokens != num_free + 1:
                raise RuntimeError(f"{name}: a step ran {engine.last_step.num_tokens} tokens, "
                                   f"not the batch of {num_free + 1}")
    for engine in engines.values():
        engine.shutdown()
    return _rows(f"decode {num_free}+1, free tok/s", samples, "plain", rounds)


def _rows(part: str, samples: dict[str, list[float]], base: str, rounds: int) -> list[dict]:
    rows = []
    for name, values in samples.items():
        ratios = [v / b for v, b in zip(values, samples[base])]
        rows.append({"part": part, "config": name, "p50": statistics.median(values),
                     "ratio_p50": statistics.median(ratios), "rounds": rounds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-steps", action="store_true", help="the host part only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_host(args.rounds, args.batch)
    if not args.no_steps:
        rows += bench_steps(args.batch // 4, args.rounds, args.steps)
    print_table(rows)
    emit_json({"bench": "structured_output", "rows": rows, "machine": machine_info(),
               "args": vars(args)})


if __name__ == "__main__":
    main()
