"""Engine: schedulers, the cluster step (schedule -> run -> update) and the offline LLM API."""

from infinillm.engine.async_engine import AsyncEngine, EngineDeadError
from infinillm.engine.engine import ClusterEngine
from infinillm.engine.llm import LLM
from infinillm.engine.scheduler import Scheduler

__all__ = ["LLM", "AsyncEngine", "ClusterEngine", "EngineDeadError", "Scheduler"]
