"""Linear layers with weights packed once for oneDNN, the CPU fast path.

On this class of CPU, MKL's GEMM behind `F.linear` is slow for the few-row inputs of decoding
(an 8 x 576 by 576 x 49152 product runs at a fifth of the cores' peak), while oneDNN with a
weight reordered once at load reads the weights at close to memory speed. The packed copy
replaces the plain weight, so memory does not double. Other devices, or
`INFINILLM_LINEAR=aten`, use `F.linear`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# oneDNN picks its blocked weight layout for an expected row count; 8 (a decode batch) serves
# 1-64 rows well in measurements (bench/linear_kernels.py).
_PACK_ROWS = 8


def onednn_usable(weight: torch.Tensor) -> bool:
    return (
        os.environ.get("INFINILLM_LINEAR", "onednn") == "onednn"
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn._linear_pointwise, "binary")
    )


class Linear:
    """y = x @ weight.T + bias for x [T, in] -> [T, out]; weight [out, in] as in checkpoints."""

    __slots__ = ("weight", "bias", "packed", "out_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features = weight.shape[0]
        self.bias = bias
        self.packed = None
        self.weight = weight
        if onednn_usable(weight):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_ROWS)
            self.weight = None

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] -> [T, out]; `residual` [T, out], if given, is added to the result (by
        oneDNN as a post-op, one pass fewer over the output; the same sum, bit for bit)."""
        if self.packed is not None:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed,
                                                                 self.bias, "add")
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if residual is not None:
            return residual + F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
