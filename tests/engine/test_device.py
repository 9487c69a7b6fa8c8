"""The device setting: resolution of "auto", dtype by device, and the KV pool sized from GPU
memory.

No GPU is faked for running: the sizing arithmetic is checked with torch.cuda's memory query
replaced by numbers, and the weights' size against transformers' own parameter count. Engine
runs on CPU (explicit and "auto") must give transformers' greedy tokens; the `gpu` test does
the same on CUDA where there is one.
"""

from __future__ import annotations

import pytest
import torch

from infinillm import LLM, SamplingParams
from infinillm.config import Config
from infinillm.engine.builder import num_blocks_per_instance
from infinillm.engine.device import (
    activation_bytes,
    cuda_kv_budget,
    resolve_device,
    resolve_dtype,
)
from infinillm.kvcache import block_bytes
from infinillm.model import load_arch

GIB = 1 << 30


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda says one 80 GiB GPU with 79 GiB free; nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79 * GIB, 80 * GIB))


def test_auto_is_cpu_without_cuda_and_cuda_with_it(no_cuda, monkeypatch):
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda:0"
    assert resolve_device("cuda") == "cuda:0"
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("auto", executor="sim") == "cpu"  # the simulator runs no model
    with pytest.raises(ValueError, match=r"device='cuda:2', but torch sees 2 CUDA device"):
        resolve_device("cuda:2")


def test_cuda_without_cuda_is_a_value_error(no_cuda, tiny_llama):
    with pytest.raises(ValueError, match=r"device='cuda', but torch sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"device='cuda:0', but torch sees no CUDA device"):
        LLM(tiny_llama, device="cuda:0")
    # Ray actors may have GPUs this driver lacks: the Ray cluster's resources decide there.
    assert resolve_device("cuda", executor="ray") == "cuda:0"


def test_dtype_auto_is_bfloat16_on_cuda_and_float32_on_cpu():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("float16", "cuda:0") is torch.float16
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16


def test_budget_arithmetic():
    # 0.9 of 80 GiB is 72; 1 GiB is in use already; 10 GiB weights, 2 GiB activations; two
    # instances share what is left: (72 - 1 - 10 - 2) / 2 = 29.5 GiB each.
    assert cuda_kv_budget(80 * GIB, 79 * GIB, 0.9, 10 * GIB, 2 * GIB, 2) == int(29.5 * GIB)
    with pytest.raises(ValueError) as info:
        cuda_kv_budget(80 * GIB, 79 * GIB, 0.5, 38 * GIB, 2 * GIB, 1)
    message = str(info.value)
    for part in ("does not fit", "gpu_memory_utilization=0.5", "80.00 GiB", "1.00 GiB already",
                 "39.00 GiB available", "weights need 38.00 GiB", "activations 2.00 GiB"):
        assert part in message


def test_pool_on_a_gpu_is_what_the_memory_setting_leaves(fake_gpu, tiny_llama):
    import transformers

    arch = load_arch(tiny_llama)
    numel = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).num_parameters()
    config = Config.from_kwargs(device="cuda", num_instances=2, gpu_memory_utilization=0.5)
    dtype = resolve_dtype(config.model.dtype, "cuda:0")
    acts = activation_bytes(arch, config.scheduler.max_num_batched_tokens,
                            config.scheduler.max_num_seqs, 4096, dtype)
    per_block = block_bytes(arch.num_layers, arch.num_kv_heads, arch.head_dim, 16, dtype)
    expected = ((40 * GIB - 1 * GIB - 2 * numel - acts) // 2) // per_block
    assert num_blocks_per_instance(config, arch, dtype, "cuda:0", tiny_llama) == expected
    # On CPU the memory setting's CPU default holds, whatever the GPU has.
    cpu = Config.from_kwargs(device="cpu")
    per_block_fp32 = block_bytes(arch.num_layers, arch.num_kv_heads, arch.head_dim, 16,
                                 torch.float32)
    assert num_blocks_per_instance(cpu, arch, torch.float32, "cpu") == 2 * GIB // per_block_fp32


def test_a_model_or_pool_too_big_for_the_gpu_names_the_sizes(fake_gpu, tiny_llama, monkeypatch):
    arch = load_arch(tiny_llama)
    # 0.9 of 1.2 GiB minus 1.15 GiB in use leaves nothing for the weights
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: (int(0.05 * GIB), int(1.2 * GIB)))
    config = Config.from_kwargs(device="cuda")
    with pytest.raises(ValueError, match=r"does not fit: gpu_memory_utilization=0.9 of 1.20 GiB"):
        num_blocks_per_instance(config, arch, torch.bfloat16, "cuda:0", tiny_llama)
    with pytest.raises(ValueError, match="does not fit"):
        LLM(tiny_llama, device="cuda")  # before any weight is loaded
    # An explicit pool larger than what is left is refused too.
    big = Config.from_kwargs(device="cuda", kv_cache_memory_bytes=100 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79 * GIB, 80 * GIB))
    with pytest.raises(ValueError, match=r"per instance need \d+ bytes, but "
                                         r"gpu_memory_utilization=0.9 leaves"):
        num_blocks_per_instance(big, arch, torch.bfloat16, "cuda:0", tiny_llama)


def _hf_greedy(folder: str, prompt: list[int], n: int, device: str = "cpu") -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = model.to(device).eval()
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device)).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 17, 200, 3, 99, 41, 7], list(range(30, 70))]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_device_gives_transformers_tokens(tiny_llama, no_cuda, device):
    llm = LLM(tiny_llama, device=device, block_size=5)
    worker = llm.engine.executor.workers[0]
    assert (worker.storage.device.type, worker.model.dtype) == ("cpu", torch.float32)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == _hf_greedy(tiny_llama, prompt, 8)
    llm.engine.check_integrity()


@pytest.mark.gpu
def test_cuda_fp32_gives_transformers_tokens(tiny_llama):
    llm = LLM(tiny_llama, device="cuda", dtype="float32", attention_backend="torch",
              num_instances=2, kv_blocks_per_instance=8, block_size=5)  # borrows
    assert llm.engine.executor.workers[0].storage.device.type == "cuda"
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == _hf_greedy(tiny_llama, prompt, 8, "cuda")
    llm.engine.check_integrity()
