"""Llama-family models: architecture from config.json, weights from safetensors, forward pass."""

from infinillm.model.arch import SUPPORTED_ARCHITECTURES, ModelArch, load_arch
from infinillm.model.llama import AttentionFn, LlamaModel
from infinillm.model.weights import load_state_dict

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "AttentionFn",
    "LlamaModel",
    "ModelArch",
    "load_arch",
    "load_state_dict",
]
