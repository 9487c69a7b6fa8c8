"""The "torch" backend: plain float32 matmuls, the reference the fast backends are tested against.

It runs on any device, materialises every score, and is slower than a fused kernel; its job is
to be obviously right.
"""

from __future__ import annotations

import math

import torch

from infinillm.attention.backend import AttentionBackend, Partial
from infinillm.attention.blocks import gather_slots


class TorchBackend(AttentionBackend):
    name = "torch"

    def _micro_attention(self, query, key, value, scale, causal) -> Partial:
        group = query.shape[1] // key.shape[0]
        qf = query.float().permute(1, 0, 2)  # [Hq, Lq, D]
        kf = key.float().repeat_interleave(group, dim=0)
        vf = value.float().repeat_interleave(group, dim=0)
        scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, Lq, Lk]
        if causal:
            n = scores.shape[-1]
            mask = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(mask, -math.inf)
        lse = torch.logsumexp(scores, dim=-1)  # [Hq, Lq]
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probs = torch.exp(scores - safe.unsqueeze(-1))
        out = torch.matmul(probs, vf).permute(1, 0, 2)
        return out.to(query.dtype), lse

    def _padded_decode_attention(self, query, key_cache, value_cache, slot_table, mask, *,
                                 scale):
        b, hq, d = query.shape
        keys, values = gather_slots(key_cache, value_cache, slot_table)  # [B, Hkv, Lmax, D]
        hkv = keys.shape[1]
        # The query heads of one KV head side by side: [B, Hkv, group, D] against its keys.
        qf = query.float().view(b, hkv, hq // hkv, d)
        scores = torch.matmul(qf, keys.float().transpose(-1, -2)) * scale + mask.float()
        lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, group]; -inf for a row of no key
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probs = torch.exp(scores - safe.unsqueeze(-1))
        out = torch.matmul(probs, values.float())  # [B, Hkv, group, D]
        return out.view(b, hq, d).to(query.dtype), lse.view(b, hq)
