"""Where the workers run and in which precision, and how much KV memory a GPU leaves.

    device = resolve_device(config.runtime.device, config.runtime.executor)  # "cpu", "cuda:0"
    dtype = resolve_dtype(config.model.dtype, device)                 # "auto": bf16 on CUDA
    kv_bytes = cuda_kv_budget(total, free, utilization, weight_bytes, activation_bytes, n)

On CPU the KV pool is `kv_cache_memory_bytes` (2 GiB unless set), as before. On CUDA, unless
set, it is what `gpu_memory_utilization` of the GPU's memory leaves after the memory other
processes already use, the weights and an estimate of the step's activations; a model that does
not fit is a ValueError naming those sizes. The arithmetic is a pure function of its inputs, so
tests check it without a GPU.
"""

from __future__ import annotations

import torch

from infinillm.model import ModelArch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_CACHE_MEMORY_BYTES = 2 << 30  # the KV pool per instance on CPU when none is set


def resolve_device(name: str, executor: str = "inproc") -> str:
    """The torch device the workers use: "cpu" or "cuda:N".

    "auto" is cuda:0 when this process's torch sees a GPU, else cpu. "cuda" means cuda:0. With
    the ray executor the actors' GPUs need not be this machine's: Ray checks they exist, and
    each actor uses its own GPU (ray_executor.py). The sim executor runs no model: "cpu" there,
    unless CUDA is asked for by name."""
    if name == "auto":
        return "cuda:0" if executor != "sim" and torch.cuda.is_available() else "cpu"
    if name == "cpu" or executor in ("ray", "sim"):
        return "cuda:0" if name == "cuda" else name
    if not torch.cuda.is_available():
        raise ValueError(f"device={name!r}, but torch sees no CUDA device here (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); use "
                         f"device='cpu' or 'auto'")
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device={name!r}, but torch sees {count} CUDA device(s)")
    return f"cuda:{index}"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype of weights, activations and KV: "auto" is bfloat16 on CUDA, float32 on
    CPU (bf16 matrix products are slow on CPUs without AVX-512 BF16)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return TORCH_DTYPES[name]


def activation_bytes(arch: ModelArch, max_num_batched_tokens: int, max_num_seqs: int,
                     max_padded_len: int, dtype: torch.dtype) -> int:
    """An upper estimate of one step's transient memory (not a profile): the hidden states,
    fused qkv and gate/up outputs of a full token batch in float32, logits of every sequence
    (float32, with a copy for sampling), and the K/V gathered by one padded decode call."""
    t = max_num_batched_tokens
    width = (4 * arch.hidden_size + 2 * arch.intermediate_size
             + (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim)
    logits = 2 * max_num_seqs * arch.vocab_size
    gathered = 2 * max_num_seqs * max_padded_len * arch.num_kv_heads * arch.head_dim
    return 4 * (t * width + logits) + gathered * dtype.itemsize


def cuda_kv_budget(total: int, free: int, utilization: float, weight_bytes: int,
                   activation_bytes: int, num_instances: int) -> int:
    """KV cache bytes per instance on one GPU: `utilization` of `total`, less what is already
    in use (`total - free`: other processes, this one's CUDA context), the weights (one copy,
    shared by the instances on this GPU) and the activations, split over `num_instances`.

    Raises ValueError, naming the sizes and the setting, when nothing is left."""
    allowed = int(total * utilization) - (total - free)
    left = allowed - weight_bytes - activation_bytes
    if left <= 0:
        gib = 1 << 30
        raise ValueError(
            f"the model does not fit: gpu_memory_utilization={utilization} of {total / gib:.2f} "
            f"GiB, with {(total - free) / gib:.2f} GiB already in use, leaves {allowed / gib:.2f} "
            f"GiB available; weights need {weight_bytes / gib:.2f} GiB and activations "
            f"{activation_bytes / gib:.2f} GiB, before any KV cache. Raise "
            f"gpu_memory_utilization, free the GPU, or choose a smaller model or dtype")
    return left // num_instances


def cuda_memory(device: str) -> tuple[int, int]:
    """(total, free) bytes of a CUDA device, as the driver reports them now."""
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return total, free
