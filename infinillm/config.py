"""Frozen configuration, one small dataclass per subsystem, composed into `Config`.

Values are validated where they are declared; measured facts (how many blocks fit in a memory
budget) are computed at start-up by the runtime, not stored here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTION_BACKENDS = ("auto", "torch", "cpu_flash")
_EXECUTORS = ("inproc", "ray")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which model to run. `model=None` selects the embedded default (SmolLM2-135M-Instruct)."""

    model: str | None = None
    dtype: str = "float32"
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The KV cache of one instance: rBlocks of `block_size` tokens.

    The pool holds `kv_blocks_per_instance` blocks when given, else as many as fit in
    `kv_cache_memory_bytes`.
    """

    block_size: int = 16
    kv_blocks_per_instance: int | None = None
    kv_cache_memory_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"block_size must be an int, got {self.block_size!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.kv_blocks_per_instance is not None and self.kv_blocks_per_instance < 1:
            raise ValueError(f"kv_blocks_per_instance must be positive, "
                             f"got {self.kv_blocks_per_instance}")
        if self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be positive, "
                             f"got {self.kv_cache_memory_bytes}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Batching limits of one instance's scheduler.

    `max_num_batched_tokens` is the token budget of one step; prompts longer than it are
    prefilled in chunks of at most that many tokens.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """How workers run: attention backend, CPU threads, device, and where.

    `executor="inproc"` runs every instance in this process; `"ray"` runs each as a Ray actor
    (its own process; `ray_address` None joins a cluster started with `ray start` on this
    machine, or starts a local one). Tensors between actors travel over torch.distributed
    (gloo on CPU); `dist_timeout_s` bounds a wait on a peer, which is how a dead peer is found
    in the middle of a step.
    """

    attention_backend: str = "auto"
    num_threads: int | None = None
    device: str = "cpu"
    executor: str = "inproc"
    ray_address: str | None = None
    cpus_per_instance: float = 1.0
    dist_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.executor not in _EXECUTORS:
            raise ValueError(f"executor must be one of {_EXECUTORS}, got {self.executor!r}")
        if self.cpus_per_instance <= 0:
            raise ValueError(f"cpus_per_instance must be positive, got {self.cpus_per_instance}")
        if self.dist_timeout_s <= 0:
            raise ValueError(f"dist_timeout_s must be positive, got {self.dist_timeout_s}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {_ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be positive, got {self.num_threads}")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The instances and how they share KV memory.

    With `lending`, an instance that runs out of blocks borrows from others; each instance
    lends at most `max_lent_fraction` of its pool. Between steps, recall moves at most
    `recall_blocks_per_step` blocks home, and an owner brings blocks home only while it keeps
    `recall_headroom_fraction` of its pool free for its own requests.
    """

    num_instances: int = 1
    lending: bool = True
    max_lent_fraction: float = 0.9
    recall_blocks_per_step: int = 16
    recall_headroom_fraction: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.num_instances, bool) or not isinstance(self.num_instances, int) \
                or self.num_instances < 1:
            raise ValueError(f"num_instances must be a positive int, got {self.num_instances!r}")
        if not 0.0 <= self.max_lent_fraction <= 1.0:
            raise ValueError(f"max_lent_fraction must be in [0, 1], got {self.max_lent_fraction}")
        if self.recall_blocks_per_step < 0:
            raise ValueError(
                f"recall_blocks_per_step must be >= 0, got {self.recall_blocks_per_step}"
            )
        if not 0.0 <= self.recall_headroom_fraction <= 1.0:
            raise ValueError(f"recall_headroom_fraction must be in [0, 1], "
                             f"got {self.recall_headroom_fraction}")


@dataclass(frozen=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
