"""Attention: backends behind one interface, chosen per worker by name, and the exact merge.

    get_backend("auto" | "torch" | "cpu_flash" | "triton", device) -> AttentionBackend
        .micro_attention, .blocks_attention, .chunk_attention, .padded_decode_attention,
        .write_kv
    merge(outs, lses) -> (out, lse)             backend-independent
    backend_names()                             the names `get_backend` accepts

The registry is imported eagerly and imports no torch; the torch-bound names load on first use,
so that listing backend names (configuration, command line) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from infinillm.attention.registry import backend_names, get_backend, resolve_backend_name

if TYPE_CHECKING:
    from infinillm.attention.backend import AttentionBackend, Partial
    from infinillm.attention.blocks import slot_runs
    from infinillm.attention.partials import merge

_LAZY = {
    "AttentionBackend": "infinillm.attention.backend",
    "Partial": "infinillm.attention.backend",
    "merge": "infinillm.attention.partials",
    "slot_runs": "infinillm.attention.blocks",
}

__all__ = [
    "AttentionBackend",
    "Partial",
    "backend_names",
    "get_backend",
    "merge",
    "resolve_backend_name",
    "slot_runs",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
