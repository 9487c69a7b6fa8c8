"""ClusterEngine: the instances of one deployment and the step that drives them.

    step():  schedule -> run -> update
      schedule: each instance's Scheduler builds its StepPlan (blocks from its RManager)
      run:      each instance's Worker executes its plan and samples
      update:   sampled tokens go to their requests; finished requests free their blocks

With lending on (and more than one instance), an instance short of blocks borrows them through
the GManager, attention over borrowed blocks runs on their holders (DistAttention over the
fabric), and before each step the GManager's recall brings blocks home. Preemption by recompute
happens only when a request cannot get blocks anywhere.

New requests go to the instance with the most free blocks in the ledger (ties: fewest unfinished
requests): free blocks are what limits a long request, and a lightly loaded instance also runs
a smaller batch. All instances of this process share one read-only copy of the weights.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from infinillm.cluster import GManager, RManager
from infinillm.config import Config
from infinillm.engine.output import OutputStream
from infinillm.engine.scheduler import Scheduler
from infinillm.kvcache import block_bytes, blocks_needed
from infinillm.model import load_arch
from infinillm.model.arch import config_eos_token_ids
from infinillm.model.resolve import resolve_model_path
from infinillm.model.tokenizer import Tokenizer
from infinillm.runtime.executor import InstanceLost, InstanceSpec, make_executor
from infinillm.types import (
    BlockMove,
    FinishReason,
    InstanceId,
    Request,
    RequestId,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)

logger = logging.getLogger("infinillm")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class Instance:
    instance_id: InstanceId
    rmanager: RManager
    scheduler: Scheduler


class ClusterEngine:
    def __init__(self, config: Config) -> None:
        self.config = config
        started = time.perf_counter()
        path = resolve_model_path(config.model.model)
        self.model_path = path
        arch = load_arch(path)
        self.arch = arch
        dtype = TORCH_DTYPES[config.model.dtype]
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
        cache = config.cache
        per_block = block_bytes(arch.num_layers, arch.num_kv_heads, arch.head_dim,
                                cache.block_size, dtype)
        num_blocks = cache.kv_blocks_per_instance or cache.kv_cache_memory_bytes // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes={cache.kv_cache_memory_bytes} holds no "
                             f"block of {per_block} bytes")
        self.num_blocks_per_instance = num_blocks
        cluster = config.cluster
        self.lending = cluster.lending and cluster.num_instances > 1
        self.max_lent_blocks = int(num_blocks * cluster.max_lent_fraction) if self.lending else 0
        self.gmanager = GManager(int(num_blocks * cluster.recall_headroom_fraction))
        ids = [InstanceId(i) for i in range(cluster.num_instances)]
        spec = InstanceSpec(path, arch, dtype, num_blocks, cache.block_size,
                            config.runtime.device,
                            attention_backend=config.runtime.attention_backend)
        self.executor = make_executor(config, spec, ids)
        self.instances = [self._make_instance(i, num_blocks) for i in ids]
        self.num_migrations = 0
        self.num_standstills = 0
        self.streams: dict[RequestId, OutputStream] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()  # admission order, for "newest" decisions
        self.load_seconds = time.perf_counter() - started
        logger.info("loaded %s (%s, %d layers) in %.1f s; %d instance(s) x %d blocks of %d tokens",
                    path, arch.architecture, arch.num_layers, self.load_seconds,
                    cluster.num_instances, num_blocks, cache.block_size)

    def _make_instance(self, iid: InstanceId, num_blocks: int) -> Instance:
        rmanager = RManager(iid, num_blocks, self.config.cache.block_size, self.max_lent_blocks)
        if self.lending:
            self.gmanager.register(rmanager)
        scheduler = Scheduler(iid, self.config.scheduler, rmanager, can_wait=self.lending)
        return Instance(iid, rmanager, scheduler)

    def instance(self, iid: InstanceId) -> Instance:
        for inst in self.instances:
            if inst.instance_id == iid:
                return inst
        raise KeyError(f"instance {iid} is not (or no longer) part of the cluster")

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
        request = Request(rid, text, token_ids, params, arrival=next(self._arrivals))
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
        if need > self.max_blocks_per_request:
            where = "the cluster can give one request" if self.lending else "an instance holds"
            raise ValueError(f"prompt has {n} tokens and needs {need} KV blocks; {where} "
                             f"{self.max_blocks_per_request}")

    @property
    def max_blocks_per_request(self) -> int:
        """Its owner's pool, plus what every other instance may lend."""
        return self.num_blocks_per_instance + (len(self.instances) - 1) * self.max_lent_blocks

    def _route(self, request: Request) -> Instance:
        """The instance with the most free blocks once its queue is served; ties: the fewest
        unfinished requests. Counting the queue matters: requests added between two steps
        would otherwise all go to the same instance."""
        return max(self.instances, key=lambda i: (
            i.rmanager.num_free_blocks - i.scheduler.queue_demand(),
            -i.scheduler.num_unfinished, -i.instance_id))

    def abort_request(self, request_id: RequestId) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return
        stream.request.finish_reason = FinishReason.ABORT
        self.instance(stream.request.instance_id).scheduler.remove(stream.request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.streams)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One recall -> schedule -> run -> update round; returns the requests that made
        progress."""
        if self.lending:
            for inst in self.instances:
                inst.rmanager.queue_demand = inst.scheduler.head_demand()
                inst.rmanager.reclaim_wanted = inst.scheduler.reclaim_demand()
            self.gmanager.heartbeat_all()
            self._recall()
        plans = [inst.scheduler.schedule() for inst in self.instances]
        if self.lending and not any(p.chunks for p in plans):
            self._break_standstill()
        try:
            sampled = self.executor.execute(plans)
        except InstanceLost as lost:
            logger.warning("%s; recomputing its requests on the others", lost)
            self._lose_instances(lost.instances)
            return []
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

    def _lose_instances(self, dead: list[InstanceId]) -> None:
        """Drop lost instances; every request they owned or held blocks for is recomputed on
        the survivors from its prompt and the tokens it already has. Nothing of the failed
        step was applied, so no request loses a token."""
        for iid in dead:
            lost = self.instance(iid)
            orphans = list(lost.scheduler.running) + list(lost.scheduler.waiting)
            for request in orphans:
                lost.rmanager.free(request.request_id)  # gives back its loans elsewhere
            for inst in self.instances:
                for request in list(inst.scheduler.running):
                    table = inst.rmanager.tables.get(request.request_id)
                    if table is not None and iid in table.instances():
                        inst.scheduler.preempt(request)
            if self.lending:
                self.gmanager.unregister(iid)
            self.executor.remove_instance(iid)
            self.instances.remove(lost)
            if not self.instances:
                raise RuntimeError("every instance of the cluster was lost") from None
            for request in sorted(orphans, key=lambda r: r.arrival):
                request.num_computed_tokens = 0
                request.status = RequestStatus.WAITING
                self._route(request).scheduler.add(request)

    def _recall(self) -> None:
        """Bring lent blocks home between steps (GManager.plan_recall)."""
        self._execute_moves(self.gmanager.plan_recall(self.config.cluster.recall_blocks_per_step))

    def _execute_moves(self, moves: list[BlockMove]) -> None:
        """Copy the data of every move, then switch tables: no step runs in between."""
        if not moves:
            return
        self.executor.move_blocks(moves)
        self.gmanager.apply_moves(moves)
        self.num_migrations += len(moves)

    def migrate_block(self, request_id: RequestId, index: int, dst: InstanceId) -> bool:
        """Move logical block `index` of a running request to instance `dst` (between steps).
        False when `dst` cannot take it or already holds it."""
        if not self.lending:
            raise ValueError("migrating blocks needs lending (num_instances > 1, lending=True)")
        stream = self.streams.get(request_id)
        owner = stream.request.instance_id if stream else None
        if owner is None or request_id not in self.instance(owner).rmanager.tables:
            raise ValueError(f"request {request_id!r} holds no blocks")
        move = self.gmanager.plan_move(owner, request_id, index, dst)
        if move is None:
            return False
        self._execute_moves([move])
        return True

    def _break_standstill(self) -> None:
        """Every running request waits for blocks that only another running request can free:
        preempt the newest running request of the cluster (recompute later), or end it if it
        is the only one and still does not fit."""
        running = [(r, inst) for inst in self.instances for r in inst.scheduler.running]
        if not running:
            return
        self.num_standstills += 1
        request, inst = max(running, key=lambda ri: ri[0].arrival)
        if len(running) == 1:
            inst.scheduler.remove(request)
            request.finish_reason = FinishReason.LENGTH
            inst.scheduler.out_of_blocks.append(request)
        else:
            inst.scheduler.preempt(request)

    def _emit(self, inst: Instance, stream: OutputStream) -> RequestOutput:
        out = stream.output()
        if out.finished:
            inst.scheduler.remove(stream.request)
            del self.streams[stream.request.request_id]
        return out

    def shutdown(self) -> None:
        self.executor.shutdown()

    # ---- inspection -----------------------------------------------------------------------

    def check_integrity(self) -> None:
        if self.lending:
            self.gmanager.check_integrity()
        for inst in self.instances:
            inst.rmanager.check_integrity()
            live = {r.request_id for r in inst.scheduler.running}
            if set(inst.rmanager.tables) - live:
                raise RuntimeError(f"instance {inst.instance_id} holds blocks of requests that "
                                   f"are not running: {sorted(set(inst.rmanager.tables) - live)}")

    def num_free_blocks(self) -> list[int]:
        return [inst.rmanager.num_free_blocks for inst in self.instances]

    def cluster_stats(self) -> dict:
        """Per instance block counts, the debts, remote attention traffic, migrations and
        preemptions: a JSON-ready snapshot of the ledger."""
        instances = []
        for inst in self.instances:
            rm = inst.rmanager
            own = rm.num_blocks - rm.num_free_blocks - rm.num_lent_blocks
            instances.append({
                "instance": inst.instance_id,
                "total_blocks": rm.num_blocks,
                "free_blocks": rm.num_free_blocks,
                "used_blocks": own,
                "lent_blocks": rm.num_lent_blocks,
                "borrowed_blocks": rm.num_borrowed_blocks(),
                "running": len(inst.scheduler.running),
                "waiting": len(inst.scheduler.waiting),
                "preemptions": inst.scheduler.num_preemptions,
            })
        fabric = self.executor.fabric_stats()
        return {
            "lending": self.lending,
            "block_size": self.config.cache.block_size,
            "instances": instances,
            "debts": [{"debtor": d, "creditor": c, "blocks": n}
                      for (d, c), n in sorted(self.gmanager.debt_matrix().items())],
            "remote_attention_calls": fabric.remote_attention_calls,
            "remote_attention_items": fabric.remote_attention_items,
            "remote_kv_writes": fabric.remote_kv_writes,
            "remote_bytes": fabric.bytes_sent,
            "migrations": self.num_migrations,
            "refused_loans": self.gmanager.num_refused_loans,
            "standstills": self.num_standstills,
            "preemptions": sum(i["preemptions"] for i in instances),
        }
