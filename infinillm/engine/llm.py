"""LLM: the offline API, shaped like vLLM's so that user code ports.

    from infinillm import LLM, SamplingParams
    llm = LLM()                                   # the embedded default model
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from typing import Any

from infinillm.config import SETTINGS, Config, section_doc
from infinillm.engine.engine import ClusterEngine
from infinillm.types import RequestOutput, SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """The offline engine: `N` instances sharing one pool of KV blocks.

    `LLM(model=None, **settings)`: the keyword arguments are the fields of `infinillm.config`
    (listed below with their defaults); an unknown name raises TypeError naming the closest one,
    a bad value raises ValueError naming the value.
    """

    def __init__(self, model: str | None = None, **settings: Any) -> None:
        self.engine = ClusterEngine.from_config(Config.from_kwargs(model=model, **settings))

    def shutdown(self) -> None:
        """Stop the instances (Ray actors and their processes, if any). Idempotent."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def cluster_stats(self) -> dict:
        """Per instance total / free / used / lent / borrowed blocks, the debts between
        instances, remote micro-attention calls and bytes, migrations and preemptions."""
        return self.engine.cluster_stats()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in prompt order.

        All prompts are checked before any runs: one bad prompt raises ValueError and nothing
        is queued.
        """
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        prepared = [self.engine.prepare(p, sp) for p, sp in zip(prompts, params)]
        ids = [self.engine.add_prepared(p) for p in prepared]
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, with the chat template."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"messages must be a non-empty list, got {messages!r}")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = [tok.encode(tok.apply_chat_template(c), add_special_tokens=False)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req", leave=False)
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in done:
                    self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[rid] for rid in ids]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompts
    ):
        return [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(
            f"prompts must be a string, token ids, or a non-empty list, got {prompts!r}"
        )
    return list(prompts)


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params


def _signature() -> inspect.Signature:
    """`LLM.__init__`'s real keywords and defaults, for help(), inspect and notebooks."""
    assert SETTINGS[0].name == "model", "model is LLM's one positional argument"
    kw, positional = inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(s.name, kw, default=s.default, annotation=s.annotation)
              for s in SETTINGS]
    params[0] = params[0].replace(kind=positional)
    return inspect.Signature([inspect.Parameter("self", positional), *params],
                             return_annotation=None)


def _settings_doc() -> str:
    lines = []
    for section, group in itertools.groupby(SETTINGS, key=lambda s: s.section):
        lines.append(f"\n{section}: {section_doc(section)}")
        for s in group:
            shown = s.show(s.default)
            default = f"{s.default!r}" + (f" ({shown})" if shown != str(s.default) else "")
            lines.append(f"    {s.name}={default}: {s.help}")
    return "\n".join(lines)


LLM.__init__.__signature__ = _signature()
LLM.__doc__ = f"{inspect.cleandoc(LLM.__doc__)}\n{_settings_doc()}\n"
