"""Cluster control plane: per-instance RManager, the GManager's ledger, and the rebalancer that
takes the cluster-wide decisions between steps (block moves, standstills, instance loss), with
proactive placement driven by each instance's fitted step-time model."""

from infinillm.cluster.gmanager import GManager
from infinillm.cluster.messages import Grant
from infinillm.cluster.perf_model import StepFeatures, StepTimeModel
from infinillm.cluster.placement import Placement
from infinillm.cluster.rebalancer import (
    Demand,
    InstanceView,
    Rebalancer,
    Settlement,
    choose_victim,
)
from infinillm.cluster.rmanager import RManager

__all__ = [
    "Demand",
    "GManager",
    "Grant",
    "InstanceView",
    "Placement",
    "RManager",
    "Rebalancer",
    "Settlement",
    "StepFeatures",
    "StepTimeModel",
    "choose_victim",
]
