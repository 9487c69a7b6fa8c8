"""The "cpu_flash" backend: ATen's fused flash attention for CPU tensors.

`_scaled_dot_product_flash_attention_for_cpu` takes [B, H, L, D] with any strides (so block runs
are read in place), handles GQA itself, and returns the log-sum-exp along with the output, which
the public `scaled_dot_product_attention` does not.
"""

from __future__ import annotations

import torch

from infinillm.attention.backend import AttentionBackend, Partial
from infinillm.attention.blocks import gather_slots

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


class CpuFlashBackend(AttentionBackend):
    name = "cpu_flash"
    devices = ("cpu",)

    def _micro_attention(self, query, key, value, scale, causal) -> Partial:
        out, lse = _flash(
            query.permute(1, 0, 2).unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
            dropout_p=0.0, is_causal=causal, scale=scale,
        )[:2]
        return out[0].permute(1, 0, 2), lse[0]

    def _padded_decode_attention(self, query, key_cache, value_cache, slot_table, mask, *,
                                 scale):
        keys, values = gather_slots(key_cache, value_cache, slot_table)  # [B, Hkv, Lmax, D]
        out, lse = _flash(
            query.unsqueeze(2), keys, values,
            dropout_p=0.0, is_causal=False, attn_mask=mask.to(query.dtype), scale=scale,
        )[:2]
        return out[:, :, 0], lse[:, :, 0]
