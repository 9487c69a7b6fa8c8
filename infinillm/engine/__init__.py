"""Engine: the builder, intake, schedulers, the cluster step (rebalance -> schedule -> run ->
update) on an injected clock, and the offline LLM API."""

from infinillm.engine.async_engine import AsyncEngine, EngineDeadError
from infinillm.engine.builder import EngineParts, Instance, build_engine_parts
from infinillm.engine.clock import Clock, VirtualClock, WallClock
from infinillm.engine.engine import ClusterEngine
from infinillm.engine.intake import Intake, PreparedPrompt, route
from infinillm.engine.llm import LLM
from infinillm.engine.scheduler import Scheduler, SchedulerOutput

__all__ = [
    "LLM",
    "AsyncEngine",
    "Clock",
    "ClusterEngine",
    "EngineDeadError",
    "EngineParts",
    "Instance",
    "Intake",
    "PreparedPrompt",
    "Scheduler",
    "SchedulerOutput",
    "VirtualClock",
    "WallClock",
    "build_engine_parts",
    "route",
]
