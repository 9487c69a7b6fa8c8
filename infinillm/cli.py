"""Command line: `infinillm generate "prompt" [options]`.

User errors (bad values, missing model) print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="Hugging Face model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--block-size", type=int, default=16, help="tokens per rBlock")
    g.add_argument("--kv-blocks", type=int, default=None,
                   help="rBlocks per instance (default: as many as --kv-memory-gb holds)")
    g.add_argument("--kv-memory-gb", type=float, default=2.0,
                   help="KV cache memory per instance in GiB")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--instances", type=int, default=1, help="serving instances")
    g.add_argument("--no-lending", dest="lending", action="store_false",
                   help="keep every request's KV on its own instance (the baseline)")
    g.add_argument("--max-lent-fraction", type=float, default=0.9,
                   help="at most this share of an instance's pool is lent to others")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "cpu_flash"])
    g.add_argument("--threads", type=int, default=None, help="CPU threads for compute")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinillm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a reply to one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true",
                     help="send the prompt as is, without the model's chat template")
    _engine_args(gen)
    _sampling_args(gen)
    return parser


def _make_llm(args: argparse.Namespace):
    from infinillm.engine import LLM

    return LLM(
        args.model,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_blocks_per_instance=args.kv_blocks,
        kv_cache_memory_bytes=int(args.kv_memory_gb * (1 << 30)),
        max_model_len=args.max_model_len,
        num_instances=args.instances,
        lending=args.lending,
        max_lent_fraction=args.max_lent_fraction,
        attention_backend=args.attention_backend,
        num_threads=args.threads,
    )


def _generate(args: argparse.Namespace) -> int:
    from infinillm.types import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )
    started = time.perf_counter()
    llm = _make_llm(args)
    print(f"[infinillm] model loaded in {llm.engine.load_seconds:.1f} s", file=sys.stderr)
    tokenizer = llm.get_tokenizer()
    use_chat = not args.raw and tokenizer is not None and tokenizer.has_chat_template
    t0 = time.perf_counter()
    if use_chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    seconds = time.perf_counter() - t0
    completion = out.outputs[0]
    print(completion.text)
    n = len(completion.token_ids)
    print(f"[infinillm] {len(out.prompt_token_ids)} prompt + {n} generated tokens in "
          f"{seconds:.2f} s ({n / seconds:.1f} tok/s; {time.perf_counter() - started:.1f} s "
          f"total), finish: {completion.finish_reason}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="[%(name)s] %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
    except ValueError as e:
        print(f"infinillm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
