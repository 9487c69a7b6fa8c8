"""Prefix keys: what names a full block's K/V in the prefix cache.

A full block's K/V depend on every token before and in it (and on nothing else for the
Llama-family models served here). Its key chains the previous block's key with its own token
ids: key_i = sha256(key_{i-1} | token ids of block i | extra), so equal keys mean equal
prefixes (a collision of SHA-256 is not a practical concern; Python's 64-bit `hash` would be).
`extra` is a tuple of whatever else would change the K/V (LoRA adapter, multimodal inputs);
empty today, part of every key so that it can grow without changing the scheme.

Only full blocks have keys: the block still being written is never shared.
"""

from __future__ import annotations

import hashlib
from array import array

BlockKey = bytes

_ROOT = b""


def block_keys(token_ids: list[int], block_size: int, keys: list[BlockKey],
               extra: tuple = ()) -> list[BlockKey]:
    """Extend `keys` (those of the first len(keys) blocks of `token_ids`) in place to one per
    full block of `token_ids`; returns it. Tokens never change once appended, so a request's
    keys are computed once and extended as it grows."""
    suffix = repr(extra).encode() if extra else b""
    for i in range(len(keys), len(token_ids) // block_size):
        parent = keys[i - 1] if i else _ROOT
        tokens = array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        keys.append(hashlib.sha256(parent + tokens + suffix).digest())
    return keys
