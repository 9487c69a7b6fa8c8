"""Shared fixtures: tiny random Llama and Qwen2 models saved as Hugging Face folders.

They are built with transformers (the independent reference) and reloaded by both
transformers and infinillm. head_dim 64 and GQA (4 query heads over 2 KV heads).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, the "triton" attention backend's kernels run on CPU tensors under Triton's
# interpreter, which must be switched on before anything imports triton (transformers does, when
# the tiny models are built). Nothing else in the suite runs Triton code.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


SERVER_TESTS = Path(__file__).parent / "server"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    """Tiers by place and need: every test under tests/server carries `server` (so a new file
    there joins the tier without remembering a marker); `gpu` tests skip without CUDA."""
    no_cuda = pytest.mark.skip(reason="needs CUDA; torch sees no CUDA device")
    cuda = None
    for item in items:
        if SERVER_TESTS in item.path.parents:
            item.add_marker(pytest.mark.server)
        if item.get_closest_marker("gpu"):
            cuda = torch.cuda.is_available() if cuda is None else cuda
            if not cuda:
                item.add_marker(no_cuda)


def _save_tiny(kind: str, folder) -> None:
    import transformers

    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2}[kind])
    if kind == "llama":
        cfg = transformers.LlamaConfig(**TINY, rope_theta=10000.0)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**TINY, rope_theta=1000000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**TINY, rope_theta=1000000.0)
        model = transformers.Qwen3ForCausalLM(cfg)
    # Random init is small; scale weights up so logits are far from uniform and greedy
    # choices are not near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    model.save_pretrained(folder)


# Llama runs in every tier; the sweep over the other architectures (Qwen2's biases, Qwen3's
# q/k norms) repeats each engine test per model, so it is the slow tier's.
ARCHITECTURES = ["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                 pytest.param("qwen3", marks=pytest.mark.slow)]


@pytest.fixture(scope="session", params=ARCHITECTURES)
def tiny_model(request, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    _save_tiny(request.param, folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-llama-only")
    _save_tiny("llama", folder)
    return str(folder)
