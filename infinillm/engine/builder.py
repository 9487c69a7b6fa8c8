"""Builder: everything the engine runs on, made from a Config.

    parts = build_engine_parts(config)
    engine = ClusterEngine(config, parts)        # or ClusterEngine.from_config(config)

It resolves the model folder, reads its architecture, loads the tokenizer, sizes the KV pools
(blocks per instance from the memory budget), starts the executor (which loads the weights), and
wires the control plane: one RManager and Scheduler per instance, the GManager's ledger when
lending is on, and the rebalancer. Measured facts (how many blocks fit) live here and in the
engine, never in the config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from infinillm.cluster import GManager, Placement, Rebalancer, RManager, StepTimeModel
from infinillm.config import Config
from infinillm.engine.device import (
    CPU_KV_CACHE_MEMORY_BYTES,
    TORCH_DTYPES,  # noqa: F401 (the simulator's modules import it from here)
    activation_bytes,
    cuda_kv_budget,
    cuda_memory,
    resolve_device,
    resolve_dtype,
)
from infinillm.engine.scheduler import Scheduler
from infinillm.kvcache import block_bytes
from infinillm.model import ModelArch, load_arch
from infinillm.model.arch import config_eos_token_ids
from infinillm.model.resolve import resolve_model_path
from infinillm.model.tokenizer import Tokenizer
from infinillm.model.weights import checkpoint_numel
from infinillm.runtime.executor import Executor, InstanceSpec, make_executor
from infinillm.runtime.traffic import MAX_PADDED_DECODE_LEN
from infinillm.types import InstanceId

logger = logging.getLogger("infinillm")


@dataclass(slots=True)
class Instance:
    """One serving instance as the engine sees it: its pool and tables, and its batch."""

    instance_id: InstanceId
    rmanager: RManager
    scheduler: Scheduler


@dataclass(slots=True)
class EngineParts:
    model_path: Path
    arch: ModelArch
    tokenizer: Tokenizer | None  # None: the folder has no tokenizer.json (token-id prompts)
    eos_token_ids: set[int]
    max_model_len: int
    num_blocks_per_instance: int
    lending: bool  # on, and more than one instance
    max_lent_blocks: int  # per instance
    instances: list[Instance]
    gmanager: GManager | None  # None without lending
    rebalancer: Rebalancer
    executor: Executor
    load_seconds: float
    perf_models: dict[InstanceId, StepTimeModel]  # each instance's step time, fitted online


ExecutorFactory = Callable[[Config, InstanceSpec, list[InstanceId]], Executor]


def build_engine_parts(config: Config,
                       executor_factory: ExecutorFactory | None = None) -> EngineParts:
    """`executor_factory` makes the executor (default: the one `config.runtime.executor`
    names); an executor that runs no model (a simulator, a test's) drives the same engine."""
    started = time.perf_counter()
    if config.runtime.executor == "sim":  # shapes only: a preset or a folder with config.json
        from infinillm.sim.models import sim_model_folder

        path = sim_model_folder(config.model.model)
    else:
        path = resolve_model_path(config.model.model)
    arch = load_arch(path)
    device = resolve_device(config.runtime.device, config.runtime.executor)
    dtype = resolve_dtype(config.model.dtype, device)
    if config.runtime.num_threads:
        torch.set_num_threads(config.runtime.num_threads)
    tokenizer = Tokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None
    eos = config_eos_token_ids(path) | (set(tokenizer.eos_token_ids) if tokenizer else set())
    max_model_len = min(arch.max_model_len, config.model.max_model_len or arch.max_model_len)
    num_blocks = num_blocks_per_instance(config, arch, dtype, device, path)
    cluster = config.cluster
    lending = cluster.lending and cluster.num_instances > 1
    max_lent = int(num_blocks * cluster.max_lent_fraction) if lending else 0
    gmanager = GManager() if lending else None
    ids = [InstanceId(i) for i in range(cluster.num_instances)]
    proactive = lending and cluster.placement == "proactive"
    instances = [_instance(config, i, num_blocks, max_lent, gmanager, proactive) for i in ids]
    perf_models = {i: StepTimeModel() for i in ids}
    placement = (Placement(gmanager, perf_models, config.cache.block_size) if proactive
                 else None)
    rebalancer = Rebalancer(gmanager, cluster.recall_blocks_per_step,
                            int(num_blocks * cluster.recall_headroom_fraction), placement)
    spec = InstanceSpec(path, arch, dtype, num_blocks, config.cache.block_size,
                        device, config.runtime.attention_backend, frozenset(eos))
    executor = (executor_factory or make_executor)(config, spec, ids)
    seconds = time.perf_counter() - started
    logger.info("loaded %s (%s, %d layers, %s on %s) in %.1f s; %d instance(s) x %d blocks of "
                "%d tokens", path, arch.architecture, arch.num_layers, dtype, device, seconds,
                cluster.num_instances, num_blocks, config.cache.block_size)
    return EngineParts(path, arch, tokenizer, eos, max_model_len, num_blocks, lending, max_lent,
                       instances, gmanager, rebalancer, executor, seconds, perf_models)


def num_blocks_per_instance(config: Config, arch: ModelArch, dtype: torch.dtype,
                            device: str = "cpu", model_path: Path | None = None) -> int:
    """`kv_blocks_per_instance` when given, else as many blocks as the memory budget holds:
    `kv_cache_memory_bytes` (2 GiB on CPU when unset), on CUDA what `gpu_memory_utilization`
    leaves (device.py; needs `model_path` for the weights' size); with the sim executor, what
    the simulated device's memory holds after the weights."""
    cache = config.cache
    if config.runtime.executor == "sim" and not cache.kv_blocks_per_instance:
        from infinillm.sim.cost import CostModel
        from infinillm.sim.devices import load_profile

        return CostModel(arch, dtype.itemsize, cache.block_size,
                         load_profile(config.runtime.sim_device)).kv_blocks()
    per_block = block_bytes(arch.num_layers, arch.num_kv_heads, arch.head_dim, cache.block_size,
                            dtype)
    budget = None  # bytes per instance that the GPU leaves; None on CPU
    if device.startswith("cuda") and config.runtime.executor != "sim":
        budget = _gpu_kv_budget(config, arch, dtype, device, model_path)
    memory = cache.kv_cache_memory_bytes or budget or CPU_KV_CACHE_MEMORY_BYTES
    num_blocks = cache.kv_blocks_per_instance or memory // per_block
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory_bytes={memory} holds no block of {per_block} bytes")
    if budget is not None and num_blocks * per_block > budget:
        raise ValueError(f"{num_blocks} blocks of {per_block} bytes per instance need "
                         f"{num_blocks * per_block} bytes, but gpu_memory_utilization="
                         f"{cache.gpu_memory_utilization} leaves {budget} bytes per instance "
                         f"after the weights and activations")
    return num_blocks


def _gpu_kv_budget(config: Config, arch: ModelArch, dtype: torch.dtype, device: str,
                   model_path: Path | None) -> int:
    """KV bytes per instance on one GPU (this process's, or with ray a GPU of the same kind
    per actor)."""
    if not torch.cuda.is_available():  # ray, with GPUs elsewhere
        raise ValueError(f"device={device!r} with GPUs only in the Ray cluster: set "
                         f"kv_cache_memory_bytes or kv_blocks_per_instance")
    if model_path is None:
        raise ValueError("sizing the KV pool on CUDA needs the model folder (weights' size)")
    total, free = cuda_memory("cuda:0" if config.runtime.executor == "ray" else device)
    sched = config.scheduler
    weights = checkpoint_numel(model_path) * dtype.itemsize
    activations = activation_bytes(arch, sched.max_num_batched_tokens, sched.max_num_seqs,
                                   MAX_PADDED_DECODE_LEN, dtype)
    per_gpu = 1 if config.runtime.executor == "ray" else config.cluster.num_instances
    return cuda_kv_budget(total, free, config.cache.gpu_memory_utilization, weights,
                          activations, per_gpu)


def _instance(config: Config, iid: InstanceId, num_blocks: int, max_lent: int,
              gmanager: GManager | None, local_first: bool) -> Instance:
    rmanager = RManager(iid, num_blocks, config.cache.block_size, max_lent, gmanager)
    if gmanager is not None:
        gmanager.register(rmanager)
    scheduler = Scheduler(iid, config.scheduler, rmanager, can_wait=gmanager is not None,
                          local_first=local_first)
    return Instance(iid, rmanager, scheduler)
