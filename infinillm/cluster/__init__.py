"""Cluster control plane: per-instance RManager, the GManager's ledger, and their messages."""

from infinillm.cluster.gmanager import GManager
from infinillm.cluster.messages import Grant
from infinillm.cluster.rmanager import RManager

__all__ = ["GManager", "Grant", "RManager"]
