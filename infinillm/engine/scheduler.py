"""Scheduler: one instance's continuous batch, with chunked prefill and preemption by recompute.

Each step gets a token budget. Running requests go first, in arrival order: a decoding request
takes one token, a request still prefilling takes the next chunk of its prompt. Waiting requests
are then admitted, oldest first, while budget, the sequence limit and blocks allow. When a running
request needs a block and none is free, the newest running request is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed from its prompt and the tokens
it already produced.
"""

from __future__ import annotations

from collections import deque

from infinillm.cluster import RManager
from infinillm.config import SchedulerConfig
from infinillm.types import (
    FinishReason,
    InstanceId,
    Request,
    RequestId,
    RequestStatus,
    ScheduledChunk,
    StepPlan,
)


class Scheduler:
    def __init__(self, instance_id: InstanceId, config: SchedulerConfig, rmanager: RManager):
        self.instance_id = instance_id
        self.config = config
        self.rmanager = rmanager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # requests that outgrew the whole pool; the engine finishes them with reason "length"
        self.out_of_blocks: list[Request] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        request.instance_id = self.instance_id
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Drop a request (finished or aborted) and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.rmanager.free(request.request_id)

    def schedule(self) -> StepPlan:
        plan = StepPlan(self.instance_id)
        budget = self.config.max_num_batched_tokens
        preempted = False
        scheduled: list[Request] = []
        while len(scheduled) < len(self.running) and budget > 0:
            request = self.running[len(scheduled)]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._make_room(request, num_new):
                preempted = True
                continue  # `request` or a newer one left `running`; look again
            plan.chunks.append(self._chunk(request, num_new))
            scheduled.append(request)
            budget -= num_new
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.rmanager.allocate_slots(request.request_id, num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.chunks.append(self._chunk(request, num_new))
            budget -= num_new
        return plan

    def _make_room(self, request: Request, num_new: int) -> bool:
        """Allocate blocks for `request`'s next chunk, preempting newer requests if needed.
        False when `request` itself had to give way (it is then waiting again)."""
        target = request.num_computed_tokens + num_new
        while not self.rmanager.allocate_slots(request.request_id, target):
            victim = self.running[-1]
            if victim is request and len(self.running) == 1:
                # Alone and still out of blocks: the pool cannot hold this request any longer.
                self.running.remove(request)
                self.rmanager.free(request.request_id)
                request.finish_reason = FinishReason.LENGTH
                self.out_of_blocks.append(request)
                return False
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.rmanager.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = start + num_new
        prompt_len = len(request.prompt_token_ids)
        if start >= prompt_len:
            tokens = request.output_token_ids[start - prompt_len : end - prompt_len]
        else:
            tokens = request.all_token_ids()[start:end]
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=tokens,
            start_pos=start,
            block_ids=self.rmanager.block_ids(request.request_id),
            sample=end == request.num_tokens,
            params=request.params,
            num_output_tokens=len(request.output_token_ids),
        )

    def running_ids(self) -> list[RequestId]:
        return [r.request_id for r in self.running]
