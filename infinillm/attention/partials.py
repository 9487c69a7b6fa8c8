"""The exact merge of partial attentions (DistAttention's second primitive).

A partial is attention of some queries over one disjoint set of keys, normalised over that set,
with the log-sum-exp of its scaled scores. Partials computed anywhere combine exactly into
attention over the union of their keys:

    LSE = logsumexp_j(lse_j);   O = sum_j exp(lse_j - LSE) * O_j

This is plain math on (out, lse) pairs, the same whatever backend computed them, so it is a free
function rather than a backend operation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly combine partial attentions over disjoint key sets.

    outs: n tensors [..., Lq, Hq, D]; lses: n tensors [..., Hq, Lq] float32 (-inf = saw nothing).
    Returns (out, lse) of the same shapes; accumulation is float32, out has the inputs' dtype.
    A query that saw no key in any partial gets out 0 and lse -inf. A partial with lse -inf
    contributes nothing, whatever its out holds (inf, NaN).
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
    # Select, do not multiply: a partial that saw nothing (weight 0) contributes nothing even
    # when its out holds inf or NaN (0 * inf is NaN).
    parts = torch.stack(outs).float()
    parts = torch.where(w > 0, parts * w, torch.zeros((), dtype=parts.dtype, device=parts.device))
    out = parts.sum(dim=0)
    return out.to(outs[0].dtype), merged_lse
