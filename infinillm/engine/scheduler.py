"""Scheduler: one instance's continuous batch, with chunked prefill and preemption by recompute.

Each step gets a token budget. Running requests go first, in arrival order: a decoding request
takes one token, a request still prefilling takes the next chunk of its prompt. Waiting requests
are then admitted, oldest first, while budget, the sequence limit and blocks allow. When a running
request needs a block and none is free: a prefill chunk is cut to the blocks there are, or waits
while other requests decode; otherwise the request cheapest to recompute among it and the newer
ones (`choose_victim`, the engine's one victim policy) is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed from its prompt and the tokens it already
produced.

With prefix caching, a request starts (first admission, or again after preemption) with the
longest run of cached full blocks that begins its tokens, wherever they live (RManager
`take_cached`): its computed tokens jump past them, leaving at least one token to compute (the
one whose logits give the next token). Requests that ask for prompt logprobs compute their whole
prompt. After each step, the full blocks a request computed are published (`publish`).

`schedule()` returns one typed result: the plan for the worker, the requests it preempted, and
the requests that ended because the pool can never hold them (without lending).

Cost: a step's scheduling work follows its batch, not the blocks held. A chunk gets its
request's block table as a view, not a copy (see ScheduledChunk), and the blocks the queue needs
(`queued_blocks`, asked by routing for every instance on every new request) are a running total,
kept wherever `waiting` changes; a waiting request's length does not change while it waits
(tokens are appended only to requests with a chunk in the step, which are running).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from infinillm.cluster import Demand, RManager, choose_victim
from infinillm.config import SchedulerConfig
from infinillm.kvcache import blocks_needed
from infinillm.kvcache.prefix import block_keys
from infinillm.types import (
    FinishReason,
    InstanceId,
    Request,
    RequestId,
    RequestStatus,
    ScheduledChunk,
    StepPlan,
)


class _Room(enum.Enum):
    READY = "ready"  # blocks allocated
    GONE = "gone"  # the request left `running` (preempted, or ended out of blocks)
    STALLED = "stalled"  # no blocks this step; it stays running and waits
    HELD = "held"  # a prefill with no blocks this step, waiting on decodes to finish


@dataclass(slots=True)
class SchedulerOutput:
    """One instance's scheduling decisions for a step."""

    plan: StepPlan
    preempted: list[Request] = field(default_factory=list)  # back in the queue, to recompute
    ended: list[Request] = field(default_factory=list)  # the pool can never hold them: "length"


class Scheduler:
    def __init__(self, instance_id: InstanceId, config: SchedulerConfig, rmanager: RManager,
                 can_wait: bool = False, local_first: bool = False,
                 prefix_caching: bool = False):
        self.instance_id = instance_id
        # When blocks can come from other instances, a request that finds none waits rather
        # than ending: the rebalancer breaks a cluster-wide standstill.
        self.can_wait = can_wait
        self.local_first = local_first  # admission by local blocks (proactive placement)
        self.config = config
        self.rmanager = rmanager
        self.waiting: deque[Request] = deque()  # changed only by the methods below
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefix_caching = prefix_caching
        # Prefix cache lookups at admission, in tokens: asked for (the request's tokens) and
        # found cached (vLLM's prefix_cache_queries / prefix_cache_hits).
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0
        self._queued_blocks = 0  # sum of _blocks_to_start over `waiting`
        # the batch's tokens and its longest request, as of the last schedule()
        self._kv_tokens = 0
        self._longest: RequestId | None = None

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def queued_blocks(self) -> int:
        """Blocks the whole queue needs to start (prompts and tokens so far): what routing
        counts against this instance's free blocks. O(1): a running total."""
        return self._queued_blocks

    def recount_queued_blocks(self) -> int:
        """`queued_blocks` recomputed from the queue (for the integrity check)."""
        return sum(self._blocks_to_start(r) for r in self.waiting)

    def _blocks_to_start(self, request: Request) -> int:
        return blocks_needed(request.num_tokens + 1, self.rmanager.block_size)

    def demand(self) -> Demand:
        """What the queue head asks of the cluster: the free blocks it needs, if the local pool
        can give them now (not to be lent this step; a head that needs more borrows anyway, and
        holding blocks back for it would only starve the borrowers it waits for); and the lent
        blocks it needs back to start locally, when those would be enough. With the load of
        the batch, for proactive placement."""
        load = dict(num_running=len(self.running), kv_tokens=self._kv_tokens,
                    longest=self._longest)
        if not self.waiting:
            return Demand(**load)
        rm = self.rmanager
        head = self.waiting[0]
        need = blocks_needed(head.num_tokens + 1, rm.block_size)
        keep = need if need <= rm.num_free_blocks else 0
        short = need - rm.num_free_blocks
        return Demand(keep, short if 0 < short <= rm.num_lent_blocks else 0,
                      head_blocks=self._admission_blocks(head), head_tokens=head.num_tokens,
                      **load)

    def _admission_blocks(self, request: Request) -> int:
        """Free blocks a waiting request needs to start: its prefill, and a block of headroom
        per running request (so admitting it does not force a preemption at the next decode
        step)."""
        return blocks_needed(request.num_tokens, self.rmanager.block_size) + len(self.running)

    def _can_admit(self, request: Request) -> bool:
        """Whether the free blocks allow starting `request` now. Reactive: counting what the
        creditors may lend. Local first (proactive placement): only this pool's, unless the
        request can never fit in it; the rebalancer makes room by moving other KV away."""
        need = self._admission_blocks(request)
        rm = self.rmanager
        if self.local_first and need <= rm.num_blocks:
            return need <= rm.num_free_blocks
        return need <= rm.num_available_blocks()

    def add(self, request: Request) -> None:
        request.instance_id = self.instance_id
        self.waiting.append(request)
        self._queued_blocks += self._blocks_to_start(request)

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request and free its blocks (no-op if already gone)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
            self._queued_blocks -= self._blocks_to_start(request)
        request.status = RequestStatus.FINISHED
        self.rmanager.free(request.request_id)
        self._forget_load(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(StepPlan(self.instance_id))
        plan = out.plan
        budget = self.config.max_num_batched_tokens
        preempted = held = stalled = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            room, num_new = self._make_room(request, num_new, out)
            if room is _Room.READY:
                plan.chunks.append(self._chunk(request, num_new))
                budget -= num_new
                i += 1
            elif room is _Room.STALLED:
                stalled = True
                i += 1
            elif room is _Room.HELD:
                held = True
                i += 1
            else:  # `request` or newer ones left `running`: index i holds the next one
                preempted = True
        while self.waiting and budget > 0 and not (preempted or held or stalled):
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            # Start a request only when its whole prefill fits now (here or by borrowing).
            # Admitting long prompts on their first chunk alone let several half-prefilled ones
            # fill the cluster and wait on each other, preempted and readmitted in turn.
            if not self._can_admit(request):
                break
            num_cached = self._take_cached(request)
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.rmanager.allocate_slots(request.request_id, num_cached + num_new):
                self.rmanager.free(request.request_id)  # the cached blocks it took, if any
                break
            request.num_computed_tokens = num_cached
            self._count_hit(request, num_cached)
            self.waiting.popleft()
            self._queued_blocks -= self._blocks_to_start(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.chunks.append(self._chunk(request, num_new))
            budget -= num_new
        self._note_load()
        return out

    def _take_cached(self, request: Request) -> int:
        """Give a starting request the cached blocks of its longest cached prefix; the tokens
        they hold (0 without caching, or for a request that asks for prompt logprobs)."""
        if not self.prefix_caching or request.params.prompt_logprobs is not None:
            return 0
        bs = self.rmanager.block_size
        if len(request.block_keys) < request.num_tokens // bs:
            block_keys(request.all_token_ids(), bs, request.block_keys)
        # At least one token is computed: its logits give the next token.
        usable = request.block_keys[: (request.num_tokens - 1) // bs]
        return self.rmanager.take_cached(request.request_id, usable) * bs if usable else 0

    def _count_hit(self, request: Request, num_cached: int) -> None:
        if not self.prefix_caching:
            return
        self.num_prefix_queries += request.num_tokens
        self.num_prefix_hits += num_cached
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_cached

    def publish(self, request: Request) -> None:
        """Enter the full blocks `request` has computed into the prefix cache (after a step)."""
        if not self.prefix_caching:
            return
        bs = self.rmanager.block_size
        num_full = request.num_computed_tokens // bs
        if len(request.block_keys) < num_full:
            block_keys(request.all_token_ids(), bs, request.block_keys)
        self.rmanager.publish(request.request_id, request.block_keys, num_full)

    def _forget_load(self, request: Request) -> None:
        if request.request_id == self._longest:
            self._longest = None  # its blocks are gone: nothing of it to move

    def _note_load(self) -> None:
        """The batch's load for `demand` (one pass per step, not one per question asked)."""
        kv, longest, most = 0, None, -1
        for r in self.running:
            n = r.num_tokens
            kv += n
            if n > most:
                longest, most = r.request_id, n
        self._kv_tokens, self._longest = kv, longest

    def _make_room(self, request: Request, num_new: int,
                   out: SchedulerOutput) -> tuple[_Room, int]:
        """Allocate blocks for `request`'s next chunk, preempting newer requests if needed;
        the outcome and the chunk's tokens.

        A prefill chunk that does not fit whole is cut to the blocks there are, and one that gets
        none waits while other requests decode (HELD): a long prompt then goes on as blocks free
        up, instead of preempting itself and recomputing its prefix from scratch over and over
        while the requests before it decode.
        """
        target = request.num_computed_tokens + num_new
        while not self.rmanager.allocate_slots(request.request_id, target):
            # What a creditor may lend is left out: a whole chunk already failed to borrow it.
            fits = self.rmanager.tokens_that_fit(request.request_id, request.num_computed_tokens)
            if 0 < fits < num_new:
                num_new, target = fits, request.num_computed_tokens + fits
                continue
            # Among this request and the newer ones (not yet planned this step), give way
            # the one whose recompute costs least; the newest on ties.
            victim = choose_victim(self.running[self.running.index(request):])
            if victim is request and num_new > 1 and any(
                    r.num_computed_tokens >= r.num_tokens - 1 for r in self.running):
                # A prefill that would give way to nobody but itself: keep what it computed
                # and wait for a decoding request (one token a step, never held) to finish or
                # to give way itself; either frees blocks.
                return _Room.HELD, num_new
            if victim is request and len(self.running) == 1:
                # Alone here, nothing to preempt. With lending, blocks freed elsewhere may come:
                # wait (the rebalancer breaks a cluster-wide standstill). Without, the pool can
                # never hold this request: it ends.
                if self.can_wait:
                    return _Room.STALLED, num_new
                self.finish(request)
                request.finish_reason = FinishReason.LENGTH
                out.ended.append(request)
                return _Room.GONE, num_new
            self.preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return _Room.GONE, num_new
        return _Room.READY, num_new

    def preempt(self, request: Request) -> None:
        """Free a running request's blocks and queue it first, to be recomputed."""
        self.running.remove(request)
        self.rmanager.free(request.request_id)
        self._forget_load(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self._queued_blocks += self._blocks_to_start(request)

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = start + num_new
        prompt, output = request.prompt_token_ids, request.output_token_ids
        prompt_len = len(prompt)
        # Slices of the chunk's own span only: joining prompt and output first would copy the
        # whole prompt for every chunk of a long prefill.
        if start >= prompt_len:
            tokens = output[start - prompt_len : end - prompt_len]
        elif end <= prompt_len:
            tokens = prompt[start:end]
        else:
            tokens = prompt[start:] + output[: end - prompt_len]
        rid = request.request_id
        chunk = ScheduledChunk(
            request_id=rid,
            token_ids=tokens,
            start_pos=start,
            blocks=self.rmanager.block_view(rid),  # not copied: valid for this step
            sample=end == request.num_tokens,
            params=request.params,
            num_output_tokens=len(request.output_token_ids),
            holders=self.rmanager.holder_counts(rid),
        )
        params = request.params
        if chunk.sample and params.adjusts_logits:
            chunk.prompt_token_ids = prompt if params.needs_prompt_ids else None
            chunk.output_token_ids = output if params.needs_output_ids else None
        if params.prompt_logprobs is not None:
            # Position p's logits give the logprob of prompt token p + 1. Those known already
            # (computed before a preemption) are not asked for again.
            first = max(start, len(request.prompt_logprobs))
            last = min(end, prompt_len - 1)
            if first < last:
                chunk.prompt_logprob_pos = first
                chunk.prompt_logprob_ids = prompt[first + 1 : last + 1]
        return chunk
