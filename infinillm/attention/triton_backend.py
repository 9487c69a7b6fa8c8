"""The "triton" backend: Triton kernels that read block tables themselves (triton_kernels.py).

On CUDA tensors the kernels are compiled for the GPU. On CPU tensors they run under Triton's
interpreter, which is how CI checks them without a GPU: TRITON_INTERPRET=1 must be in the
environment before triton is imported (the kernels are compiled or interpreted from the moment
they are defined), else CPU tensors are refused with a ValueError that says so.

Unlike the reference backends, no operation here gathers K/V or cuts a prefix into pieces:
    padded_decode_attention  one launch over all sequences, reading each one's slot table
    blocks_attention         one launch reading the request's block ids
    chunk_attention          one launch over prefix blocks and the chunk's own K/V (causal),
                             then one merge launch with the other holders' partials, if any
    merge, write_kv          one launch each
and no operation synchronises with the device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from infinillm.attention.backend import AttentionBackend, Partial

try:
    from infinillm.attention import triton_kernels as kernels
except ImportError as exc:  # triton is a test / GPU requirement, not a core one
    raise ImportError("attention backend 'triton' needs the triton package "
                      "(pip install triton==3.9.0)") from exc

_NOT_INTERPRETED = (
    "attention backend 'triton' on CPU tensors runs under Triton's interpreter, which needs "
    "TRITON_INTERPRET=1 in the environment before triton is imported (start the process with it "
    "set; kernels defined without it are compiled for a GPU); or choose attention_backend "
    "'cpu_flash' or 'torch' for CPU"
)


@functools.lru_cache(maxsize=4096)
def _table(block_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Block ids as a [1, n] int32 tensor on `device`; every layer of a step asks again."""
    return torch.tensor(block_ids, dtype=torch.int32, device=device)[None]


class TritonBackend(AttentionBackend):
    name = "triton"
    devices = ("cuda", "cpu")

    @classmethod
    def check_device(cls, device: str) -> None:
        if kernels.MODE == "mixed" or (device.split(":")[0] == "cpu"
                                       and kernels.MODE != "interpreted"):
            raise ValueError(_NOT_INTERPRETED)

    @classmethod
    def _check(cls, tensor: torch.Tensor) -> None:
        cls.check_device(tensor.device.type)
        if tensor.device.type not in ("cpu", "cuda"):
            raise ValueError(f"attention backend 'triton' runs on cuda and cpu tensors, not on "
                             f"{tensor.device}")

    def _outputs(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """out [Lq, Hq, D] query's dtype, lse [Hq, Lq] float32, both to be written."""
        lq, hq, _ = query.shape
        return (torch.empty_like(query, memory_format=torch.contiguous_format),
                torch.empty(hq, lq, dtype=torch.float32, device=query.device))

    def _micro_attention(self, query, key, value, scale, causal) -> Partial:
        self._check(query)
        query = query if query.stride(-1) == 1 else query.contiguous()
        out, lse = self._outputs(query)
        kernels.attention(query[None], out[None], lse[None], scale=scale,
                          num_kv_heads=key.shape[0], key=key, value=value, causal=causal)
        return out, lse

    def padded_decode_attention(self, query, key_cache, value_cache, slot_table, mask, *,
                                scale):
        """The base contract (backend.py); rows whose keys are all masked come out of the
        kernel itself as out 0, lse -inf, so there is no check on the host."""
        return self._padded_decode_attention(query, key_cache, value_cache, slot_table, mask,
                                             scale=scale)

    def _padded_decode_attention(self, query, key_cache, value_cache, slot_table, mask, *,
                                 scale):
        self._check(query)
        b, hq, _ = query.shape
        mask = mask.reshape(b, -1).float().contiguous()  # [B, Lmax]
        positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
        # Keys each row visits: up to its last unmasked one (any mask is exact; a padded tail
        # is skipped rather than read).
        num_keys = torch.where(torch.isneginf(mask), 0, positions).amax(dim=1)
        query = query if query.stride(-1) == 1 else query.contiguous()
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
        lse = torch.empty(b, hq, dtype=torch.float32, device=query.device)
        kernels.attention(query[:, None], out[:, None], lse[:, :, None], scale=scale,
                          num_kv_heads=key_cache.shape[0], key_cache=key_cache,
                          value_cache=value_cache, table=slot_table.contiguous(),
                          table_block=1, num_keys=num_keys, max_keys=mask.shape[1],
                          mask=mask)
        return out, lse

    def blocks_attention(self, query, key_cache, value_cache, block_ids, num_tokens, *,
                         scale) -> Partial:
        block_size = key_cache.shape[2]
        if len(block_ids) * block_size < num_tokens:
            raise ValueError(f"{len(block_ids)} blocks of {block_size} cannot hold "
                             f"{num_tokens} tokens")
        if num_tokens == 0:
            return self.micro_attention(query, key_cache[:, :0, 0], value_cache[:, :0, 0],
                                        scale=scale)
        return self._attend(query, key_cache, value_cache, block_ids, num_tokens, scale)

    def chunk_attention(self, query, key, value, key_cache, value_cache, block_ids,
                        num_prefix_tokens, *, scale, partials: Sequence[Partial] = ()
                        ) -> Partial:
        if key.shape[1] != query.shape[0]:
            raise ValueError(f"chunk_attention needs the chunk's own K/V, got {key.shape[1]} "
                             f"keys for {query.shape[0]} queries")
        out, lse = self._attend(query, key_cache, value_cache, block_ids, num_prefix_tokens,
                                scale, key=key, value=value)
        if not partials:
            return out, lse
        return self.merge([out, *(p[0] for p in partials)], [lse, *(p[1] for p in partials)])

    def _attend(self, query, key_cache, value_cache, block_ids, num_tokens, scale, key=None,
                value=None) -> Partial:
        """One launch: query over the first `num_tokens` positions of `block_ids` and, if
        given, causally over the chunk's own key/value [Hkv, Lq, D]."""
        self._check(query)
        query = query if query.stride(-1) == 1 else query.contiguous()
        out, lse = self._outputs(query)
        cache = {}
        if num_tokens:
            block_size = key_cache.shape[2]
            needed = tuple(block_ids[: math.ceil(num_tokens / block_size)])
            cache = dict(key_cache=key_cache, value_cache=value_cache,
                         table=_table(needed, query.device), table_block=block_size,
                         num_keys=num_tokens)
        kernels.attention(query[None], out[None], lse[None], scale=scale,
                          num_kv_heads=key_cache.shape[0], key=key, value=value,
                          causal=key is not None, **cache)
        return out, lse

    def merge(self, outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """partials.merge's contract (exact; a partial with lse -inf contributes nothing,
        whatever its out holds), in one launch."""
        if len(outs) != len(lses) or not outs:
            raise ValueError(f"merge needs matching, non-empty partials, got "
                             f"{len(outs)}/{len(lses)}")
        if len(outs) == 1:
            return outs[0], lses[0]
        self._check(outs[0])
        return kernels.merge(list(outs), list(lses))

    def write_kv(self, key_cache, value_cache, slots, key, value) -> None:
        self._check(key)
        kernels.write_kv(key_cache, value_cache, slots, key, value)
