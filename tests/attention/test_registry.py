"""The backend registry, "auto", and the choice of backend per worker (no process-wide one)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from infinillm import LLM, SamplingParams
from infinillm.attention import backend_names, get_backend, resolve_backend_name
from infinillm.attention.cpu_flash import CpuFlashBackend
from infinillm.attention.torch_backend import TorchBackend


def test_names_and_classes():
    assert backend_names() == ("auto", "torch", "cpu_flash", "triton")
    assert type(get_backend("torch")) is TorchBackend
    assert type(get_backend("cpu_flash")) is CpuFlashBackend
    assert get_backend("torch") is not get_backend("torch")  # one object per worker


def test_config_accepts_exactly_the_registered_names():
    # config.py imports nothing of ours (DESIGN.md), so it keeps its own copy of the names
    from infinillm.config import _ATTENTION_BACKENDS

    assert _ATTENTION_BACKENDS == backend_names()


def test_auto_resolves_by_device():
    assert resolve_backend_name("auto", "cpu") == "cpu_flash"
    assert type(get_backend("auto")) is CpuFlashBackend
    assert resolve_backend_name("auto", "cuda:0") == "triton"
    assert resolve_backend_name("torch", "cuda:1") == "torch"
    with pytest.raises(ValueError, match="'auto' has no backend for device 'mps'"):
        get_backend("auto", "mps")


def test_unknown_name_and_wrong_device():
    with pytest.raises(ValueError, match=r"one of \('auto', 'torch', 'cpu_flash', 'triton'\), "
                       r"got 'magic'"):
        get_backend("magic")
    with pytest.raises(ValueError, match="'cpu_flash' runs on \\('cpu',\\), not on device 'cuda'"):
        get_backend("cpu_flash", "cuda")


def test_listing_names_imports_no_torch():
    code = ("import sys; from infinillm.attention import backend_names; backend_names(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_worker_and_holder_uses_the_configured_backend(tiny_llama):
    """Two instances lending blocks, on the torch reference: the workers and the fabric that
    serves their holders carry it, and tokens equal those of the default backend."""
    settings = dict(block_size=4, kv_blocks_per_instance=14, num_instances=2,
                    max_num_batched_tokens=16)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(3)
    batch = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (70, 30, 9)]
    results = {}
    for name in ("torch", "auto"):
        llm = LLM(tiny_llama, attention_backend=name, **settings)
        results[name] = [o.outputs[0].token_ids
                         for o in llm.generate(batch, greedy, use_tqdm=False)]
        executor = llm.engine.executor
        expected = TorchBackend if name == "torch" else CpuFlashBackend
        assert {type(w.attention) for w in executor.workers.values()} == {expected}
        assert {type(b) for b in executor.fabric.backends.values()} == {expected}
        assert llm.cluster_stats()["remote_attention_calls"] > 0
    assert results["torch"] == results["auto"]
