"""Runtime: the worker that executes one instance's step plan, and token sampling."""

from infinillm.runtime.fabric import Fabric, InProcFabric
from infinillm.runtime.sampler import sample
from infinillm.runtime.worker import Worker

__all__ = ["Fabric", "InProcFabric", "Worker", "sample"]
