"""LLM: the offline API, shaped like vLLM's so that user code ports.

    from infinillm import LLM, SamplingParams
    llm = LLM()                                   # the embedded default model
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

from collections.abc import Sequence

from infinillm.config import (
    CacheConfig,
    ClusterConfig,
    Config,
    ModelConfig,
    RuntimeConfig,
    SchedulerConfig,
)
from infinillm.engine.engine import ClusterEngine
from infinillm.types import RequestOutput, SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "float32",
        block_size: int = 16,
        kv_blocks_per_instance: int | None = None,
        kv_cache_memory_bytes: int = 2 << 30,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        num_instances: int = 1,
        lending: bool = True,
        max_lent_fraction: float = 0.9,
        attention_backend: str = "auto",
        num_threads: int | None = None,
        executor: str = "inproc",
        ray_address: str | None = None,
        cpus_per_instance: float = 1.0,
        dist_timeout_s: float = 60.0,
    ) -> None:
        config = Config(
            model=ModelConfig(model=model, dtype=dtype, max_model_len=max_model_len),
            cache=CacheConfig(block_size=block_size, kv_blocks_per_instance=kv_blocks_per_instance,
                              kv_cache_memory_bytes=kv_cache_memory_bytes),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens),
            runtime=RuntimeConfig(attention_backend=attention_backend, num_threads=num_threads,
                                  executor=executor, ray_address=ray_address,
                                  cpus_per_instance=cpus_per_instance,
                                  dist_timeout_s=dist_timeout_s),
            cluster=ClusterConfig(num_instances=num_instances, lending=lending,
                                  max_lent_fraction=max_lent_fraction),
        )
        self.engine = ClusterEngine.from_config(config)

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
