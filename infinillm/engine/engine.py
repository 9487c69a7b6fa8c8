"""ClusterEngine: the instances of one deployment and the step that drives them.

    step():  rebalance -> schedule -> run -> update
      rebalance: the rebalancer's cluster-wide decisions between steps: a standstill of the
                 last step, block moves (recall, swaps, reclaims)
      schedule:  each instance's Scheduler builds its StepPlan (blocks from its RManager,
                 borrowed through the GManager's ledger when its pool runs short)
      run:       the executor runs every instance's plan and samples
      update:    sampled tokens go to their requests; finished requests free their blocks;
                 an instance lost during the step (or a move) is settled at once by the
                 rebalancer, so nothing is routed to it afterwards

`step()` runs every instance in one synchronous cluster step and advances the clock by it.
`step(instances)` runs only those instances and leaves time to the caller: an event loop that
keeps one timeline per instance (the simulator's asynchronous cluster, sim/run.py), reading each
instance's seconds from the executor and the moves' from `last_move_seconds`.

What the engine runs on is made by the builder (builder.py); new requests pass the intake
(intake.py: validation, admission, routing); time comes from an injected clock (clock.py).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from infinillm.cluster import InstanceView, Settlement, StepFeatures
from infinillm.config import Config
from infinillm.engine.builder import EngineParts, ExecutorFactory, Instance, build_engine_parts
from infinillm.engine.clock import Clock, WallClock
from infinillm.engine.grammar import StructuredOutput
from infinillm.engine.intake import Intake, PreparedPrompt, route
from infinillm.engine.output import OutputStream
from infinillm.engine.scheduler import SchedulerOutput
from infinillm.engine.stats import check_integrity, cluster_stats
from infinillm.runtime.executor import InstanceLost, StepResult
from infinillm.types import (
    BlockMove,
    FinishReason,
    InstanceId,
    InstanceStep,
    Request,
    RequestId,
    RequestOutput,
    RequestStatus,
    SamplingParams,
    StepRecord,
)

logger = logging.getLogger("infinillm")


class ClusterEngine:
    def __init__(self, config: Config, parts: EngineParts, clock: Clock | None = None) -> None:
        self.config = config
        self.model_path = parts.model_path
        self.arch = parts.arch
        self.tokenizer = parts.tokenizer
        self.eos_token_ids = parts.eos_token_ids
        self.max_model_len = parts.max_model_len
        self.num_blocks_per_instance = parts.num_blocks_per_instance
        self.lending = parts.lending
        self.max_lent_blocks = parts.max_lent_blocks
        self.instances = parts.instances
        self.gmanager = parts.gmanager
        self.rebalancer = parts.rebalancer
        self.executor = parts.executor
        self.load_seconds = parts.load_seconds
        self.perf_models = parts.perf_models
        self.clock = clock if clock is not None else WallClock()
        self.intake = Intake(self.tokenizer, self.model_path, self.arch.vocab_size,
                             self.max_model_len, config.cache.block_size, self.lending,
                             lambda: self.max_blocks_per_request)
        self.streams: dict[RequestId, OutputStream] = {}
        # compiled JSON schemas and the matchers of constrained requests (engine/grammar.py)
        self.structured = StructuredOutput(self.tokenizer, self.arch.vocab_size,
                                           self.eos_token_ids)
        self.num_steps = 0
        self.last_step: StepRecord | None = None
        self._by_id = {i.instance_id: i for i in self.instances}
        self._lost: list[InstanceId] = []  # found by the executor; settled at once
        self._standstill = False  # no instance with requests ran anything since progress
        self._stalled: set[InstanceId] = set()  # ran nothing since some instance last ran
        self.last_move_seconds = 0.0  # block moves before the last step (executor seconds)
        self._ended: list[Request] = []  # ended by a decision, to be emitted this step

    @classmethod
    def from_config(cls, config: Config, clock: Clock | None = None,
                    executor_factory: ExecutorFactory | None = None) -> ClusterEngine:
        return cls(config, build_engine_parts(config, executor_factory), clock)

    def instance(self, iid: InstanceId) -> Instance:
        try:
            return self._by_id[iid]
        except KeyError:
            raise KeyError(f"instance {iid} is not (or no longer) part of the cluster") from None

    @property
    def max_blocks_per_request(self) -> int:
        """Its owner's pool, plus what every other instance may lend."""
        return self.num_blocks_per_instance + (len(self.instances) - 1) * self.max_lent_blocks

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> RequestId:
        """Queue a request; ValueError (and nothing queued) for a prompt that cannot be served."""
        return self.add_prepared(self.prepare(prompt, params), request_id)

    def prepare(self, prompt: str | list[int],
                params: SamplingParams | None = None) -> PreparedPrompt:
        """Tokenize and check a prompt without queueing it (safe from another thread)."""
        prepared = self.intake.prepare(prompt, params)
        self.structured.check(prepared.params)  # compiles a JSON schema once, or ValueError
        return prepared

    def add_prepared(self, prepared: PreparedPrompt, request_id: str | None = None) -> RequestId:
        request = self.intake.admit(prepared, request_id, self.streams.__contains__)
        grammar = self.structured.admit(request)
        self.streams[request.request_id] = OutputStream(request, self.tokenizer,
                                                        self.max_model_len, self.eos_token_ids,
                                                        grammar)
        route(self.instances).scheduler.add(request)
        return request.request_id

    def abort_request(self, request_id: RequestId) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return
        stream.request.finish_reason = FinishReason.ABORT
        self.structured.free(request_id)
        self.instance(stream.request.instance_id).scheduler.finish(stream.request)
        self._unstall()  # blocks were freed: the next step may run again

    def has_unfinished_requests(self) -> bool:
        return bool(self.streams)

    # ---- the step -------------------------------------------------------------------------

    def step(self, instances: Collection[InstanceId] | None = None) -> list[RequestOutput]:
        """One rebalance -> schedule -> run -> update round; returns the requests that made
        progress (or finished). With `instances`, only those schedule and run, and the clock
        is not moved (module docstring)."""
        started = self.clock.now()
        whole = instances is None
        self.last_move_seconds = 0.0
        num_preempted, num_moves = self._rebalance(advance=whole)
        stepping = self.instances if whole else [self.instance(i) for i in instances]
        scheduled = [inst.scheduler.schedule() for inst in stepping]
        self.structured.fill_bitmasks(s.plan for s in scheduled)
        result = self._run(scheduled, advance=whole)
        outputs = self._update(scheduled, result)
        if self._lost:
            num_preempted += self._settle_loss()
        outputs += [self._emit(self.streams[r.request_id]) for r in self._ended]
        self._ended.clear()
        num_preempted += sum(len(s.preempted) for s in scheduled)
        self._record(started, scheduled, result, num_preempted, num_moves, outputs)
        return outputs

    def _views(self) -> list[InstanceView]:
        return [InstanceView(i.instance_id, i.scheduler.running, i.scheduler.waiting)
                for i in self.instances]

    def _rebalance(self, advance: bool) -> tuple[int, int]:
        """Apply the rebalancer's decisions for the cluster as a whole: settle a standstill,
        then move blocks. Returns the requests preempted and the blocks moved."""
        num_preempted = 0
        if self._standstill:
            settled = self.rebalancer.settle(self._views(), [], standstill=True)
            self._unstall()
            self._apply(settled)
            num_preempted = len(settled.preempt)
        if not self.lending:
            return num_preempted, 0
        moves = self.rebalancer.plan_moves({i.instance_id: i.scheduler.demand()
                                            for i in self.instances})
        if not self._execute_moves(moves, advance):
            return num_preempted + self._settle_loss(), 0
        return num_preempted, len(moves)

    def _unstall(self) -> None:
        self._stalled.clear()
        self._standstill = False

    def _settle_loss(self) -> int:
        """Settle the instances lost in a step or a move at once, so that nothing is routed to
        them; end what the smaller cluster can never hold. Returns the requests preempted."""
        settled = self.rebalancer.settle(self._views(), self._lost, standstill=False)
        self._lost = []
        self._apply(settled)
        for inst in self.instances:
            for request in list(inst.scheduler.waiting):
                if not self.intake.blocks_fit(request.num_tokens):
                    inst.scheduler.finish(request)
                    request.finish_reason = FinishReason.LENGTH
                    self._ended.append(request)
        return len(settled.preempt)

    def _apply(self, settled: Settlement) -> None:
        """Free what orphans held, preempt and end as decided, forget lost instances, then give
        the orphans to the survivors, to be recomputed from their prompt and output so far."""
        for request in settled.orphans:
            self.instance(request.instance_id).rmanager.free(request.request_id)
        for request in settled.preempt:
            self.instance(request.instance_id).scheduler.preempt(request)
        for request in settled.end:
            self.instance(request.instance_id).scheduler.finish(request)
            request.finish_reason = FinishReason.LENGTH
            self._ended.append(request)
        for iid in settled.lost:
            if self.gmanager is not None:
                self.gmanager.unregister(iid)
            self.executor.remove_instance(iid)
            self.instances.remove(self._by_id.pop(iid))
        if not self.instances:
            raise RuntimeError("every instance of the cluster was lost")
        for request in sorted(settled.orphans, key=lambda r: r.arrival):
            request.num_computed_tokens = 0
            request.status = RequestStatus.WAITING
            route(self.instances).scheduler.add(request)

    def _execute_moves(self, moves: list[BlockMove], advance: bool = True) -> bool:
        """Copy the data of every move, then switch tables: no step runs in between. False
        (the moves cancelled, the loss noted) when an instance is lost during the copy."""
        if not moves:
            return True
        try:
            seconds = self.executor.move_blocks(moves)
            self.last_move_seconds += seconds
            if advance:
                self.clock.advance(seconds)
        except InstanceLost as lost:
            logger.warning("%s while moving blocks; recomputing its requests on the others", lost)
            self.rebalancer.cancel(moves)
            self._lost = list(lost.instances)
            return False
        self.rebalancer.commit(moves)
        return True

    def _run(self, scheduled: list[SchedulerOutput], advance: bool) -> StepResult | None:
        """Run the plans; None when an instance was lost (nothing of the step is applied, and
        the loss is settled right after, so no request loses a token)."""
        try:
            result = self.executor.execute([s.plan for s in scheduled])
        except InstanceLost as lost:
            logger.warning("%s; recomputing its requests on the others", lost)
            self._lost = list(lost.instances)
            return None
        for s in scheduled:  # each instance's step-time model learns from its own steps
            seconds = result.seconds.get(s.plan.instance_id)
            if s.plan.chunks and seconds:
                self.perf_models[s.plan.instance_id].observe(
                    StepFeatures.of(s.plan.instance_id, s.plan.chunks), seconds)
        # The cluster step is synchronous: it lasts as long as its slowest instance, or as all
        # of them where they run one after another on one device.
        if advance:
            seconds = result.seconds.values()
            self.clock.advance(max(seconds, default=0.0) if self.executor.concurrent_instances
                               else sum(seconds))
        self._note_progress(scheduled)
        return result

    def _note_progress(self, scheduled: list[SchedulerOutput]) -> None:
        """A standstill: every instance with requests has run nothing since the last time any
        instance ran something (in one whole step: nothing ran anywhere)."""
        if any(s.plan.chunks for s in scheduled):
            self._unstall()
            return
        self._stalled.update(s.plan.instance_id for s in scheduled)
        self._standstill = self.lending and all(
            i.instance_id in self._stalled for i in self.instances if i.scheduler.num_unfinished)

    def _update(self, scheduled: list[SchedulerOutput],
                result: StepResult | None) -> list[RequestOutput]:
        outputs = []
        if result is not None:
            for s in scheduled:
                for chunk in s.plan.chunks:
                    stream = self.streams[chunk.request_id]
                    stream.request.num_computed_tokens += len(chunk.token_ids)
                    if chunk.prompt_logprob_ids:
                        stream.add_prompt_logprobs(result.prompt_logprobs.get(chunk.request_id))
                    token = result.sampled.get(chunk.request_id)
                    if token is not None:
                        stream.append(token, result.logprobs.get(chunk.request_id))
                        outputs.append(self._emit(stream))
        for s in scheduled:
            self._ended += s.ended
        return outputs

    def _emit(self, stream: OutputStream) -> RequestOutput:
        out = stream.output()
        if out.finished:
            owner = self._by_id.get(stream.request.instance_id)
            if owner is not None:  # None: its instance ended it, then was lost in that step
                owner.scheduler.finish(stream.request)
            del self.streams[stream.request.request_id]
            self.structured.free(stream.request.request_id)
        return out

    def _record(self, started: float, scheduled: list[SchedulerOutput],
                result: StepResult | None, num_preempted: int, num_moves: int,
                outputs: list[RequestOutput]) -> None:
        seconds = result.seconds if result is not None else {}
        self.last_step = StepRecord(
            self.num_steps, started, self.clock.now(),
            tuple(InstanceStep(s.plan.instance_id, len(s.plan.chunks), s.plan.num_tokens,
                               seconds.get(s.plan.instance_id, 0.0)) for s in scheduled),
            num_moves, num_preempted, sum(o.finished for o in outputs))
        self.num_steps += 1

    # ---- between steps --------------------------------------------------------------------

    def migrate_block(self, request_id: RequestId, index: int, dst: InstanceId) -> bool:
        """Move logical block `index` of a running request to instance `dst` (between steps).
        False when `dst` cannot take it or already holds it."""
        if not self.lending:
            raise ValueError("migrating blocks needs lending (num_instances > 1, lending=True)")
        stream = self.streams.get(request_id)
        owner = stream.request.instance_id if stream else None
        if owner is None or request_id not in self.instance(owner).rmanager.request_ids():
            raise ValueError(f"request {request_id!r} holds no blocks")
        move = self.rebalancer.plan_migration(owner, request_id, index, dst)
        if move is None:
            return False
        self._unstall()  # the placement changed: the next step may run again
        if not self._execute_moves([move]):
            self._settle_loss()
            return False
        return True

    def shutdown(self) -> None:
        self.executor.shutdown()

    # ---- inspection -----------------------------------------------------------------------

    def check_integrity(self) -> None:
        """RuntimeError with the numbers if the pools, tables, ledger or batches disagree."""
        check_integrity(self)

    def block_locations(self, request_id: RequestId) -> list[tuple[InstanceId, int]] | None:
        """Where each logical block of a running request lives, as (instance, block) pairs in
        position order; None when the request holds no blocks."""
        stream = self.streams.get(request_id)
        if stream is None or stream.request.instance_id not in self._by_id:
            return None
        rm = self.instance(stream.request.instance_id).rmanager
        return rm.block_locations(request_id) if request_id in rm.request_ids() else None

    def num_free_blocks(self) -> list[int]:
        return [inst.rmanager.num_free_blocks for inst in self.instances]

    def cluster_stats(self) -> dict:
        """Per instance block counts, the debts, remote attention traffic, migrations and
        preemptions: a JSON-ready snapshot of the ledger."""
        return cluster_stats(self)
