"""Micro-attention and the exact merge of partial attentions (DistAttention's two primitives).

A micro-attention is attention of some queries over one holder's keys. It returns the output
normalised over those keys *and* the log-sum-exp of the scaled scores, which is all the owner
needs to combine partials computed anywhere into attention over the whole sequence:

    LSE = logsumexp_j(lse_j);   O = sum_j exp(lse_j - LSE) * O_j

Shapes (one sequence; Hq query heads, Hkv key/value heads, Hq % Hkv == 0 for GQA):
    query  [Lq, Hq, D]            any float dtype
    key    [Hkv, Lk, D]           same dtype as query (may be a strided view of the cache)
    value  [Hkv, Lk, D]
    out    [Lq, Hq, D]            query dtype
    lse    [Hq, Lq]               float32, natural log, scale included; -inf where no key is seen

`causal=True` means Lq == Lk and query i sees keys 0..i (the chunk attending to itself);
otherwise every query sees every key. Two backends compute the same thing: "torch" (plain
matmuls in float32, the reference) and "cpu_flash" (ATen's fused CPU flash attention, which
also returns lse). Select with `set_backend` or `INFINILLM_ATTENTION_BACKEND`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

BACKENDS = ("torch", "cpu_flash")
_backend = os.environ.get("INFINILLM_ATTENTION_BACKEND", "cpu_flash")


def set_backend(name: str) -> None:
    """Choose the micro-attention backend for this process ("torch" or "cpu_flash")."""
    global _backend
    if name == "auto":
        name = "cpu_flash"
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def micro_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `query` over `key`/`value`; returns (out [Lq, Hq, D], lse [Hq, Lq] fp32)."""
    lq, hq, d = query.shape
    hkv, lk, _ = key.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if lk == 0:
        return query.new_zeros(lq, hq, d), query.new_full((hq, lq), -math.inf, dtype=torch.float32)
    if causal and lq != lk:
        raise ValueError(f"causal micro-attention needs Lq == Lk, got {lq} and {lk}")
    if (backend or _backend) == "torch":
        return _reference(query, key, value, scale, causal)
    return _cpu_flash(query, key, value, scale, causal)


def _reference(q, k, v, scale, causal):
    hq, hkv = q.shape[1], k.shape[0]
    group = hq // hkv
    qf = q.float().permute(1, 0, 2)  # [Hq, Lq, D]
    kf = k.float().repeat_interleave(group, dim=0)
    vf = v.float().repeat_interleave(group, dim=0)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, Lq, Lk]
    if causal:
        n = scores.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Lq]
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe.unsqueeze(-1))
    out = torch.matmul(probs, vf).permute(1, 0, 2)
    return out.to(q.dtype), lse


_flash = None


def _cpu_flash(q, k, v, scale, causal):
    global _flash
    if _flash is None:
        _flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # The ATen kernel takes [B, H, L, D] (strides free) and supports GQA natively.
    out, lse = _flash(
        q.permute(1, 0, 2).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
        dropout_p=0.0, is_causal=causal, scale=scale,
    )[:2]
    return out[0].permute(1, 0, 2), lse[0]


def merge(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly combine partial attentions over disjoint key sets.

    outs: n tensors [..., Lq, Hq, D]; lses: n tensors [..., Hq, Lq] float32 (-inf = saw nothing).
    Returns (out, lse) of the same shapes; accumulation is float32, out has the inputs' dtype.
    A query that saw no key in any partial gets out 0 and lse -inf.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(f"merge needs matching, non-empty partials, got {len(outs)}/{len(lses)}")
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = torch.stack(lses).float()  # [n, ..., Hq, Lq]
    peak = lse.amax(dim=0)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(lse - peak)  # 0 for partials that saw nothing
    total = weights.sum(dim=0)
    merged_lse = peak + torch.log(total)  # log(0) = -inf where nothing was seen
    norm = torch.where(total > 0, total, torch.ones_like(total))
    # weights [n, ..., Hq, Lq] -> [n, ..., Lq, Hq, 1] to scale outs
    w = (weights / norm).transpose(-1, -2).unsqueeze(-1)
    out = (torch.stack(outs).float() * w).sum(dim=0)
    return out.to(outs[0].dtype), merged_lse
