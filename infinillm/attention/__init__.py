"""Attention primitives: micro-attention returning (out, lse), the exact merge, paged variants."""

from infinillm.attention.ops import BACKENDS, get_backend, merge, micro_attention, set_backend
from infinillm.attention.paged import (
    blocks_attention,
    padded_decode_attention,
    paged_attention,
    slot_runs,
)

__all__ = [
    "BACKENDS",
    "blocks_attention",
    "get_backend",
    "merge",
    "micro_attention",
    "padded_decode_attention",
    "paged_attention",
    "set_backend",
    "slot_runs",
]
