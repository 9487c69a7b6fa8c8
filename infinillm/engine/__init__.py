"""Engine: schedulers, the cluster step (schedule -> run -> update) and the offline LLM API."""

from infinillm.engine.engine import ClusterEngine
from infinillm.engine.llm import LLM
from infinillm.engine.scheduler import Scheduler

__all__ = ["LLM", "ClusterEngine", "Scheduler"]
