"""Cluster control plane: per-instance RManager (and, with lending, the GManager)."""

from infinillm.cluster.rmanager import RManager

__all__ = ["RManager"]
