"""AttentionBackend: every attention operation a worker runs, behind one interface.

A micro-attention is attention of some queries over one holder's keys. It returns the output
normalised over those keys *and* the log-sum-exp of the scaled scores, which is all the owner
needs to merge partials computed anywhere into attention over the whole sequence (`merge`).

Shapes (one sequence; Hq query heads, Hkv key/value heads, Hq % Hkv == 0 for GQA):
    query        [Lq, Hq, D]                       any float dtype
    key, value   [Hkv, Lk, D]                      query's dtype (may be strided views)
    key_cache,
    value_cache  [Hkv, num_blocks, block_size, D]  one layer of one holder's KVStorage
    out          [Lq, Hq, D]                       query's dtype
    lse          [Hq, Lq]                          float32, natural log, scale included;
                                                   -inf where no key is seen

What a worker runs per layer, and the operation for each:
    decode tokens of short, all-local requests, in one call    padded_decode_attention
    each other request's chunk over itself (causal) and its
    prefix stored here, merged with other holders' partials    chunk_attention
    a holder's part of another owner's request (fabric)        blocks_attention
    new tokens' K/V into slots of this holder's cache           write_kv (KVStorage.write)

A backend implements two kernels, `_micro_attention` and `_padded_decode_attention`;
`blocks_attention` and `chunk_attention` are built from micro-attentions over pieces of the block
cache (attention/blocks.py) and the exact merge, and a backend with a kernel that reads block
tables itself overrides them. Each worker holds its own backend object (see registry.py), and
its fabric serves remote work with it: there is no process-wide choice.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from infinillm.attention.blocks import key_value_pieces
from infinillm.attention.partials import merge

Partial = tuple[torch.Tensor, torch.Tensor]  # (out [Lq, Hq, D], lse [Hq, Lq] float32)


class AttentionBackend(ABC):
    name: ClassVar[str]
    # Device types ("cpu", "cuda") whose tensors the kernels take; None: any device.
    devices: ClassVar[tuple[str, ...] | None] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @classmethod  # noqa: B027 (optional hook)
    def check_device(cls, device: str) -> None:
        """Raise ValueError if this backend cannot run on `device` ("cpu", "cuda:1") in this
        process, for reasons beyond `devices` (the registry checks both before building)."""

    def write_kv(self, key_cache: torch.Tensor, value_cache: torch.Tensor, slots: torch.Tensor,
                 key: torch.Tensor, value: torch.Tensor) -> None:
        """Store new tokens' K/V (KVStorage.write's kernel): key/value [T, Hkv, D] into caches
        [Hkv, num_blocks, block_size, D] at flat slots [T] int64 (block_id * block_size +
        offset)."""
        hkv, d = key_cache.shape[0], key_cache.shape[-1]
        key_cache.view(hkv, -1, d)[:, slots] = key.transpose(0, 1)
        value_cache.view(hkv, -1, d)[:, slots] = value.transpose(0, 1)

    def micro_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scale: float | None = None,
        causal: bool = False,
    ) -> Partial:
        """Attention of `query` [Lq, Hq, D] over `key`/`value` [Hkv, Lk, D].

        Returns (out [Lq, Hq, D] query's dtype, lse [Hq, Lq] float32); Lk == 0 gives out 0 and
        lse -inf. `causal=True` needs Lq == Lk: query i sees keys 0..i (a chunk attending to
        itself); otherwise every query sees every key. `scale` defaults to 1 / sqrt(D).
        """
        lq, hq, d = query.shape
        lk = key.shape[1]
        if scale is None:
            scale = 1.0 / math.sqrt(d)
        if lk == 0:
            return (query.new_zeros(lq, hq, d),
                    query.new_full((hq, lq), -math.inf, dtype=torch.float32))
        if causal and lq != lk:
            raise ValueError(f"causal micro-attention needs Lq == Lk, got {lq} and {lk}")
        return self._micro_attention(query, key, value, scale, causal)

    @abstractmethod
    def _micro_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scale: float, causal: bool) -> Partial:
        """The kernel behind `micro_attention`, same shapes; Lk > 0, and Lq == Lk if causal."""

    def padded_decode_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_table: torch.Tensor,
        mask: torch.Tensor,
        *,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode token for each of B sequences in one kernel call.

        query [B, Hq, D]; caches [Hkv, num_blocks, block_size, D]; slot_table [B, Lmax] int64
        flat slots (block_id * block_size + offset; padding points at any valid slot); mask
        [B, 1, 1, Lmax] float32 additive (0 for keys, -inf for padding). Returns (out [B, Hq, D]
        query's dtype, lse [B, Hq] float32). A row whose keys are all masked saw nothing: out 0
        and lse -inf, whatever the kernel made of it (kernels differ: ATen's CPU flash kernel
        reports lse 0 there), so that a merge leaves it out.
        """
        out, lse = self._padded_decode_attention(query, key_cache, value_cache, slot_table,
                                                 mask, scale=scale)
        # Unconditional (no `if empty.any()`): asking would wait for the device every layer.
        empty = torch.isneginf(mask).all(dim=-1).reshape(-1)  # [B]
        out = out.masked_fill(empty[:, None, None], 0.0)
        lse = lse.masked_fill(empty[:, None], -math.inf)
        return out, lse

    @abstractmethod
    def _padded_decode_attention(self, query: torch.Tensor, key_cache: torch.Tensor,
                                 value_cache: torch.Tensor, slot_table: torch.Tensor,
                                 mask: torch.Tensor, *, scale: float
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel behind `padded_decode_attention`, same shapes."""

    def blocks_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_ids: Sequence[int],
        num_tokens: int,
        *,
        scale: float,
    ) -> Partial:
        """Attention of `query` over the first `num_tokens` slots of `block_ids`, all visible.

        This is a holder's micro-attention: the keys are a request's earlier positions that this
        holder stores (their order does not matter, RoPE is already in the cached keys).
        query [Lq, Hq, D]; caches [Hkv, num_blocks, block_size, D]; returns (out [Lq, Hq, D],
        lse [Hq, Lq] float32), lse -inf for num_tokens == 0.
        """
        if len(block_ids) * key_cache.shape[2] < num_tokens:
            raise ValueError(f"{len(block_ids)} blocks of {key_cache.shape[2]} cannot hold "
                             f"{num_tokens} tokens")
        if num_tokens == 0:
            return self.micro_attention(query, key_cache[:, :0, 0], value_cache[:, :0, 0],
                                        scale=scale)
        parts = [self.micro_attention(query, k, v, scale=scale)
                 for k, v in key_value_pieces(key_cache, value_cache, block_ids, num_tokens)]
        return merge([p[0] for p in parts], [p[1] for p in parts])

    def chunk_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_ids: Sequence[int],
        num_prefix_tokens: int,
        *,
        scale: float,
        partials: Sequence[Partial] = (),
    ) -> Partial:
        """Causal attention of one request's chunk over its whole context, as the worker runs it.

        query [Lq, Hq, D] at positions [P, P + Lq); key, value [Hkv, Lq, D] the chunk's own K/V
        as the model just computed it (so the chunk is never read back from the cache, and may
        be stored on another holder). The prefix [0, P) is the first `num_prefix_tokens` slots
        of `block_ids` in this holder's caches [Hkv, num_blocks, block_size, D] plus, for a
        request with borrowed blocks, `partials` computed by their holders (blocks_attention).
        Returns (out [Lq, Hq, D], lse [Hq, Lq] float32). All parts meet in one merge.
        """
        parts = [self.micro_attention(query, key, value, scale=scale, causal=True)]
        if num_prefix_tokens:
            parts.append(self.blocks_attention(query, key_cache, value_cache, block_ids,
                                               num_prefix_tokens, scale=scale))
        parts += partials
        return merge([p[0] for p in parts], [p[1] for p in parts])
