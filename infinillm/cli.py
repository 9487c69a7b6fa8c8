"""Command line: `infinillm generate "prompt" [options]`, `infinillm serve [options]`,
`infinillm simulate [options]` and `infinillm calibrate` (the simulator: infinillm/sim/cli.py).

User errors (bad values, missing model) print one line and exit with status 2; no traceback.
`serve` runs until Ctrl-C (or SIGTERM): the engine loop stops first, so open streams end at once
with an error event and [DONE], then uvicorn closes, then the instances shut down. By default
the engine runs in an engine-core process of its own (server/core.py), which the API process
stops and joins (terminates, if it must) on the way out; `--no-engine-process` keeps it on a
thread of the API process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infinillm.config import SETTINGS, Alias, Setting, section_doc
from infinillm.sim.cli import (
    add_calibrate_parser,
    add_simulate_parser,
    run_calibrate,
    run_simulate,
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One flag per setting of `infinillm.config`, grouped by section. The flag is the setting's
    name with dashes (plus its declared older aliases); default, type, choices and help are the
    setting's own, so a new config field is a new flag with nothing to add here."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for s in SETTINGS:
        if s.section not in groups:
            groups[s.section] = parser.add_argument_group(s.section, section_doc(s.section))
        if s.value_type is bool:
            _add_switch(groups[s.section], s)
        else:
            _add_valued(groups[s.section], s)


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed settings as `LLM` keywords (`Config.from_kwargs` takes them too)."""
    return {s.name: getattr(args, s.name) for s in SETTINGS}


def _add_valued(group: argparse._ArgumentGroup, s: Setting) -> None:
    flags = [_flag(s.name), *(a for a in s.aliases if isinstance(a, str))]
    default = "" if s.default is None else f" (default: {s.show(s.default)})"
    group.add_argument(*flags, dest=s.name, default=s.default, choices=s.choices,
                       type=_reader(s.parse or s.value_type), metavar=_metavar(s),
                       help=_escape(s.help) + default)
    for alias in s.aliases:
        if isinstance(alias, Alias):  # its own unit: a separate flag filling the same setting
            group.add_argument(alias.flag, dest=s.name, default=argparse.SUPPRESS,
                               type=_reader(alias.parse or s.parse or s.value_type),
                               metavar=alias.metavar or _metavar(s), help=_escape(alias.help))


def _add_switch(group: argparse._ArgumentGroup, s: Setting) -> None:
    """A bool setting is one flag that flips its default: lending is on, so `--no-lending`."""
    verb, flag = ("turn off", f"no_{s.name}") if s.default else ("turn on", s.name)
    group.add_argument(_flag(flag), dest=s.name, default=s.default,
                       action="store_false" if s.default else "store_true",
                       help=_escape(f"{verb} {s.name}: {s.help}"))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _metavar(s: Setting) -> str | None:
    if s.choices is not None:
        return None  # argparse shows {a,b,c}
    return s.metavar or {int: "N", float: "NUM"}.get(s.value_type, "STR")


def _reader(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse type: its ValueError message becomes argparse's error line."""
    if parse in (int, float, str):
        return parse  # argparse's own "invalid int value: 'x'" reads well

    def read(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return read


def _escape(help: str | None) -> str | None:
    return None if help is None else help.replace("%", "%%")  # argparse %-formats help


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
    add_config_args(gen)
    _sampling_args(gen)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API and live page")
    add_config_args(serve)
    _serve_args(serve)
    add_simulate_parser(sub)
    add_calibrate_parser(sub)
    return parser


def _serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    g.add_argument("--api-key", default=os.environ.get("INFINILLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* "
                        "(default: $INFINILLM_API_KEY, else no key)")
    g.add_argument("--served-model-name", default=None,
                   help="the model id of the API (default: the model folder's name)")


def _make_llm(args: argparse.Namespace):
    from infinillm.engine import LLM

    return LLM(**config_kwargs(args))


def _generate(args: argparse.Namespace) -> int:
    from infinillm.types import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )
    started = time.perf_counter()
    with _make_llm(args) as llm:  # shuts Ray actors down on every exit, Ctrl-C included
        print(f"[infinillm] model loaded in {llm.engine.load_seconds:.1f} s", file=sys.stderr)
        tokenizer = llm.get_tokenizer()
        use_chat = not args.raw and tokenizer is not None and tokenizer.has_chat_template
        t0 = time.perf_counter()
        if use_chat:
            messages = [{"role": "user", "content": args.prompt}]
            out = llm.chat(messages, params, use_tqdm=False)[0]
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


def served_model_name(model: str | None) -> str:
    """The API's model id: the folder's (or .gguf file's) name, or the default model's."""
    if model is None:
        return DEFAULT_MODEL_NAME
    path = Path(model).expanduser()
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from infinillm.server import create_app

    sock = _listen(args.host, args.port)  # before loading the model: a busy port fails fast
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"[infinillm] warning: listening on {args.host} without --api-key: anyone who "
              "can reach this port can use the server", file=sys.stderr)
    async_engine, summary, model_path, stop = _start_engine(args)
    name = args.served_model_name or served_model_name(args.model)
    aliases = {a for a in (args.model, model_path) if a}
    app = create_app(async_engine, name, args.api_key, model_aliases=aliases)
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="off",
                            log_level="info" if args.verbose else "warning",
                            timeout_graceful_shutdown=3)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # Stop the engine first: open streams then end at once with an error event and
            # [DONE] (plain requests get 503) instead of being cancelled after a timeout.
            await asyncio.to_thread(async_engine.shutdown)
            await super().shutdown(sockets)

    server = Server(config)
    try:
        asyncio.run(_run_server(server, sock, f"{name}: {summary}", name, args.api_key))
    finally:
        sock.close()
        stop()
        print("[infinillm] server stopped", file=sys.stderr)
    return 0 if server.started else 1


def _start_engine(args: argparse.Namespace):
    """The started engine the app serves (an EngineClient over an engine-core process, or an
    AsyncEngine on a thread here), a one-line summary, the model folder, and how to stop it."""
    if args.engine_process:
        from infinillm.config import Config
        from infinillm.server.client import EngineClient

        client = EngineClient(Config.from_kwargs(**config_kwargs(args)))
        i = client.info
        summary = (f"{i.num_instances} instance(s) x {i.num_blocks_per_instance} blocks of "
                   f"{i.block_size} tokens, lending {'on' if i.lending else 'off'}; loaded in "
                   f"{i.load_seconds:.1f} s; engine core pid {i.pid}")
        return client, summary, i.model_path, client.shutdown
    from infinillm.engine import AsyncEngine

    llm = _make_llm(args)
    engine = llm.engine
    async_engine = AsyncEngine(engine)
    async_engine.start()
    summary = (f"{len(engine.instances)} instance(s) x {engine.num_blocks_per_instance} "
               f"blocks of {engine.config.cache.block_size} tokens, lending "
               f"{'on' if engine.lending else 'off'}; loaded in {engine.load_seconds:.1f} s")

    def stop() -> None:
        async_engine.shutdown()
        llm.shutdown()

    return async_engine, summary, str(engine.model_path), stop


def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


async def _run_server(server, sock: socket.socket, summary: str, name: str,
                      api_key: str | None) -> None:
    """Run uvicorn on `sock`; once it listens, print the URL and a curl example."""
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        host, port = sock.getsockname()[:2]
        print(_banner(f"http://{f'[{host}]' if ':' in host else host}:{port}", summary, name,
                      api_key), flush=True)
    await task


def _banner(url: str, summary: str, name: str, api_key: str | None) -> str:
    body = json.dumps({"model": name, "max_tokens": 32, "temperature": 0, "messages": [
        {"role": "user", "content": "What is the capital of France?"}]})
    auth = ' -H "Authorization: Bearer $INFINILLM_API_KEY"' if api_key else ""
    return (f"[infinillm] {summary}\n"
            f"[infinillm] OpenAI API at {url}/v1, live cluster page at {url}/ (Ctrl-C stops)\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
            f"    -d {shlex.quote(body)}")


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: engines and Ray actors shut down


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="[%(name)s] %(message)s")
    # A shell that starts us in the background ignores SIGINT for us; a service manager stops
    # us with SIGTERM. Either way, shut down cleanly. (uvicorn installs its own while serving.)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "simulate":
            return run_simulate(args)
        if args.command == "calibrate":
            return run_calibrate(args)
    except ValueError as e:
        print(f"infinillm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
