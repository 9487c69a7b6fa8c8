"""Llama-family forward pass over a flat batch of tokens from many sequences.

The model knows nothing of blocks or instances: each layer hands its q, k, v to an
`AttentionFn` supplied by the worker, which writes K/V wherever the blocks live and returns the
attention output. Tokens of all sequences in a step are concatenated ([T, hidden]), so every
linear layer runs once per step; q/k/v and gate/up projections are fused into one matrix each.
Logits are computed only for the rows that are sampled (the LM head is the largest matrix).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from infinillm.model.arch import ModelArch
from infinillm.model.linear import Linear


class AttentionFn(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] at the step's positions -> out [T, Hq, D]."""
        ...


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Rotary inverse frequencies [D/2] float32, with linear or Llama 3 scaling."""
    d = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if arch.rope_type == "linear":
        return inv / arch.rope_factor
    if arch.rope_type == "llama3":
        old = arch.rope_original_max_position
        low_wavelen = old / arch.rope_low_freq_factor
        high_wavelen = old / arch.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / arch.rope_factor, inv)
        smooth = (old / wavelen - arch.rope_low_freq_factor) / (
            arch.rope_high_freq_factor - arch.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / arch.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as transformers' LlamaRMSNorm (float32 statistics).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [T, H, D]: transformers' x * cos + rotate_half(x) * sin, in two
    multiplies, a roll and an add (rotate_half(x) * sin == roll(x, D/2) * sin_signed exactly:
    moving halves and flipping a sign round nothing)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class _Layer:
    __slots__ = ("input_norm", "qkv", "q_norm", "k_norm", "o_proj", "post_norm",
                 "gate_up", "down")


class LlamaModel:
    """Weights of one model copy and its forward pass. Not an nn.Module: inference only.

    It runs on the device its weights are on; the forward's index tensors must be there too."""

    def __init__(self, arch: ModelArch, state: dict[str, torch.Tensor], dtype: torch.dtype):
        self.arch = arch
        self.dtype = dtype
        self.embed = self._take(state, "model.embed_tokens.weight")
        self.layers = [self._load_layer(state, i) for i in range(arch.num_layers)]
        self.norm = self._take(state, "model.norm.weight")
        if arch.tie_word_embeddings or "lm_head.weight" not in state:
            self.lm_head = Linear(self.embed)
        else:
            self.lm_head = Linear(self._take(state, "lm_head.weight"))
        self.device = self.embed.device
        self.inv_freq = rope_inv_freq(arch).to(self.device)
        self.scale = 1.0 / math.sqrt(arch.head_dim)
        self._q_size = arch.num_heads * arch.head_dim
        self._kv_size = arch.num_kv_heads * arch.head_dim

    @staticmethod
    def _take(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name not in state:
            raise ValueError(f"checkpoint lacks tensor {name!r}")
        return state[name].contiguous()

    def _load_layer(self, state: dict[str, torch.Tensor], i: int) -> _Layer:
        p = f"model.layers.{i}."
        layer = _Layer()
        layer.input_norm = self._take(state, p + "input_layernorm.weight")
        layer.post_norm = self._take(state, p + "post_attention_layernorm.weight")
        proj = [self._take(state, p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        bias = None
        if self.arch.attention_bias:
            bias = torch.cat([self._take(state, p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        layer.qkv = Linear(torch.cat(proj), bias)
        layer.q_norm = layer.k_norm = None
        if self.arch.qk_norm:
            layer.q_norm = self._take(state, p + "self_attn.q_norm.weight")
            layer.k_norm = self._take(state, p + "self_attn.k_norm.weight")
        layer.o_proj = Linear(self._take(state, p + "self_attn.o_proj.weight"))
        gate_up = [self._take(state, p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
        layer.gate_up = Linear(torch.cat(gate_up))
        layer.down = Linear(self._take(state, p + "mlp.down_proj.weight"))
        return layer

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin_signed [T, 1, D] in the model dtype for int64 positions [T]; sin_signed is
        sin with its first half negated (see `_rotate`)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        sin = freqs.sin()
        cos = freqs.cos()
        return (torch.cat((cos, cos), dim=-1).to(self.dtype)[:, None],
                torch.cat((-sin, sin), dim=-1).to(self.dtype)[:, None])

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn,
                sample_rows: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] int64; sample_rows [S] int64 -> logits [S, vocab] fp32."""
        arch = self.arch
        t = input_ids.shape[0]
        cos, sin = self.rope(positions)
        x = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, arch.rms_norm_eps)
            qkv = layer.qkv(h)
            q, k, v = qkv.split([self._q_size, self._kv_size, self._kv_size], dim=-1)
            q = q.view(t, arch.num_heads, arch.head_dim)
            k = k.view(t, arch.num_kv_heads, arch.head_dim)
            v = v.view(t, arch.num_kv_heads, arch.head_dim)
            if layer.q_norm is not None:
                q = _rms_norm(q, layer.q_norm, arch.rms_norm_eps)
                k = _rms_norm(k, layer.k_norm, arch.rms_norm_eps)
            q = _rotate(q, cos, sin)
            k = _rotate(k, cos, sin)
            out = attn(i, q, k, v)
            x = layer.o_proj(out.reshape(t, self._q_size), residual=x)
            h = _rms_norm(x, layer.post_norm, arch.rms_norm_eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = layer.down(F.silu(gate) * up, residual=x)
        x = _rms_norm(x.index_select(0, sample_rows), self.norm, arch.rms_norm_eps)
        return self.lm_head(x).float()
