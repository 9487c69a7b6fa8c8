"""ClusterEngine: the instances of one deployment and the step that drives them.

    step():  schedule -> run -> update
      schedule: each instance's Scheduler builds its StepPlan (blocks from its RManager)
      run:      each instance's Worker executes its plan and samples
      update:   sampled tokens go to their requests; finished requests free their blocks

New requests go to the instance with the most free blocks (ties: fewest unfinished requests),
which spreads both memory and batch work. All instances of this process share one read-only
copy of the weights.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from infinillm.attention import set_backend
from infinillm.cluster import RManager
from infinillm.config import Config
from infinillm.engine.output import OutputStream
from infinillm.engine.scheduler import Scheduler
from infinillm.kvcache import KVStorage, block_bytes, blocks_needed
from infinillm.model import LlamaModel, load_arch, load_state_dict
from infinillm.model.arch import config_eos_token_ids
from infinillm.model.resolve import resolve_model_path
from infinillm.model.tokenizer import Tokenizer
from infinillm.runtime import Worker
from infinillm.types import (
    FinishReason,
    InstanceId,
    Request,
    RequestId,
    RequestOutput,
    SamplingParams,
)

logger = logging.getLogger("infinillm")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class Instance:
    instance_id: InstanceId
    rmanager: RManager
    scheduler: Scheduler
    worker: Worker


class ClusterEngine:
    def __init__(self, config: Config) -> None:
        self.config = config
        started = time.perf_counter()
        path = resolve_model_path(config.model.model)
        self.model_path = path
        arch = load_arch(path)
        self.arch = arch
        dtype = TORCH_DTYPES[config.model.dtype]
        set_backend(config.runtime.attention_backend)
        if config.runtime.num_threads:
            torch.set_num_threads(config.runtime.num_threads)
        # A folder without a tokenizer still serves token-id prompts (text is then empty).
        self.tokenizer = (Tokenizer.from_pretrained(path)
                          if (path / "tokenizer.json").is_file() else None)
        self.eos_token_ids = config_eos_token_ids(path)
        if self.tokenizer is not None:
            self.eos_token_ids |= set(self.tokenizer.eos_token_ids)
        user_len = config.model.max_model_len or arch.max_model_len
        self.max_model_len = min(arch.max_model_len, user_len)
        model = LlamaModel(arch, load_state_dict(path, dtype), dtype)
        cache = config.cache
        per_block = block_bytes(arch.num_layers, arch.num_kv_heads, arch.head_dim,
                                cache.block_size, dtype)
        num_blocks = cache.num_blocks or cache.memory_bytes // per_block
        if num_blocks < 1:
            raise ValueError(f"kv memory budget {cache.memory_bytes} bytes holds no block of "
                             f"{per_block} bytes")
        self.num_blocks_per_instance = num_blocks
        self.instances = [self._make_instance(InstanceId(i), model, num_blocks)
                          for i in range(config.num_instances)]
        self.streams: dict[RequestId, OutputStream] = {}
        self._ids = itertools.count()
        self.load_seconds = time.perf_counter() - started
        logger.info("loaded %s (%s, %d layers) in %.1f s; %d instance(s) x %d blocks of %d tokens",
                    path, arch.architecture, arch.num_layers, self.load_seconds,
                    config.num_instances, num_blocks, cache.block_size)

    def _make_instance(self, iid: InstanceId, model: LlamaModel, num_blocks: int) -> Instance:
        arch, cache = self.arch, self.config.cache
        storage = KVStorage(arch.num_layers, arch.num_kv_heads, arch.head_dim, num_blocks,
                            cache.block_size, model.dtype, self.config.runtime.device)
        rmanager = RManager(iid, num_blocks, cache.block_size)
        scheduler = Scheduler(iid, self.config.scheduler, rmanager)
        return Instance(iid, rmanager, scheduler, Worker(iid, model, storage))

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> RequestId:
        """Queue a request; ValueError (and nothing queued) for a prompt that cannot be served."""
        return self.add_prepared(self.prepare(prompt, params), request_id)

    def prepare(
        self, prompt: str | list[int], params: SamplingParams | None = None
    ) -> tuple[str | None, list[int], SamplingParams]:
        """Tokenize and check a prompt without queueing it: (text, token ids, params)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        self._check_fits(token_ids)
        return text, token_ids, params

    def add_prepared(self, prepared: tuple[str | None, list[int], SamplingParams],
                     request_id: str | None = None) -> RequestId:
        text, token_ids, params = prepared
        rid = RequestId(request_id if request_id is not None else str(next(self._ids)))
        if rid in self.streams:
            raise ValueError(f"request id {rid!r} is already in use")
        request = Request(rid, text, token_ids, params, arrival=len(self.streams))
        self.streams[rid] = OutputStream(request, self.tokenizer, self.max_model_len,
                                         self.eos_token_ids)
        self._route(request).scheduler.add(request)
        return rid

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError(f"model {str(self.model_path)!r} has no tokenizer.json; "
                                 "pass prompts as token ids")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"prompt must be a non-empty string or token id list, got {prompt!r}")
        vocab = self.arch.vocab_size
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {vocab}), got {bad[:5]}")
        return None, list(prompt)

    def _check_fits(self, token_ids: list[int]) -> None:
        n = len(token_ids)
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens; the model's context is {self.max_model_len} "
                             "tokens, including at least one generated token")
        need = blocks_needed(n + 1, self.config.cache.block_size)
        if need > self.num_blocks_per_instance:
            raise ValueError(f"prompt has {n} tokens and needs {need} KV blocks; an instance "
                             f"holds {self.num_blocks_per_instance}")

    def _route(self, request: Request) -> Instance:
        return max(self.instances, key=lambda i: (i.rmanager.num_free_blocks,
                                                  -i.scheduler.num_unfinished, -i.instance_id))

    def abort_request(self, request_id: RequestId) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return
        stream.request.finish_reason = FinishReason.ABORT
        self.instances[stream.request.instance_id].scheduler.remove(stream.request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.streams)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One schedule -> run -> update round; returns the requests that made progress."""
        plans = [inst.scheduler.schedule() for inst in self.instances]
        sampled: dict[RequestId, int] = {}
        for inst, plan in zip(self.instances, plans):
            sampled.update(inst.worker.execute(plan))
        return self._update(plans, sampled)

    def _update(self, plans, sampled: dict[RequestId, int]) -> list[RequestOutput]:
        outputs = []
        for inst, plan in zip(self.instances, plans):
            for chunk in plan.chunks:
                stream = self.streams[chunk.request_id]
                stream.request.num_computed_tokens += len(chunk.token_ids)
                if chunk.request_id in sampled:
                    stream.append(sampled[chunk.request_id])
                    outputs.append(self._emit(inst, stream))
            for request in inst.scheduler.out_of_blocks:
                outputs.append(self._emit(inst, self.streams[request.request_id]))
            inst.scheduler.out_of_blocks.clear()
        return outputs

    def _emit(self, inst: Instance, stream: OutputStream) -> RequestOutput:
        out = stream.output()
        if out.finished:
            inst.scheduler.remove(stream.request)
            del self.streams[stream.request.request_id]
        return out

    # ---- inspection -----------------------------------------------------------------------

    def check_integrity(self) -> None:
        for inst in self.instances:
            inst.rmanager.check_integrity()
            live = {r.request_id for r in inst.scheduler.running}
            if set(inst.rmanager.tables) - live:
                raise RuntimeError(f"instance {inst.instance_id} holds blocks of requests that "
                                   f"are not running: {sorted(set(inst.rmanager.tables) - live)}")

    def num_free_blocks(self) -> list[int]:
        return [inst.rmanager.num_free_blocks for inst in self.instances]
