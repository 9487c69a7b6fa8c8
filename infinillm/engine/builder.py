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
from infinillm.engine.scheduler import Scheduler
from infinillm.kvcache import block_bytes
from infinillm.model import ModelArch, load_arch
from infinillm.model.arch import config_eos_token_ids
from infinillm.model.resolve import resolve_model_path
from infinillm.model.tokenizer import Tokenizer
from infinillm.runtime.executor import Executor, InstanceSpec, make_executor
from infinillm.types import InstanceId

logger = logging.getLogger("infinillm")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    dtype = TORCH_DTYPES[config.model.dtype]
    if config.runtime.num_threads:
        torch.set_num_threads(config.runtime.num_threads)
    tokenizer = Tokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None
    eos = config_eos_token_ids(path) | (set(tokenizer.eos_token_ids) if tokenizer else set())
    max_model_len = min(arch.max_model_len, config.model.max_model_len or arch.max_model_len)
    num_blocks = num_blocks_per_instance(config, arch, dtype)
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
                        config.runtime.device, config.runtime.attention_backend, frozenset(eos))
    executor = (executor_factory or make_executor)(config, spec, ids)
    seconds = time.perf_counter() - started
    logger.info("loaded %s (%s, %d layers) in %.1f s; %d instance(s) x %d blocks of %d tokens",
                path, arch.architecture, arch.num_layers, seconds, cluster.num_instances,
                num_blocks, config.cache.block_size)
    return EngineParts(path, arch, tokenizer, eos, max_model_len, num_blocks, lending, max_lent,
                       instances, gmanager, rebalancer, executor, seconds, perf_models)


def num_blocks_per_instance(config: Config, arch: ModelArch, dtype: torch.dtype) -> int:
    """`kv_blocks_per_instance` when given, else as many blocks as the memory budget holds
    (with the sim executor: what the simulated device's memory holds after the weights)."""
    cache = config.cache
    if config.runtime.executor == "sim" and not cache.kv_blocks_per_instance:
        from infinillm.sim.cost import CostModel
        from infinillm.sim.devices import load_profile

        return CostModel(arch, dtype.itemsize, cache.block_size,
                         load_profile(config.runtime.sim_device)).kv_blocks()
    per_block = block_bytes(arch.num_layers, arch.num_kv_heads, arch.head_dim, cache.block_size,
                            dtype)
    num_blocks = cache.kv_blocks_per_instance or cache.kv_cache_memory_bytes // per_block
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory_bytes={cache.kv_cache_memory_bytes} holds no "
                         f"block of {per_block} bytes")
    return num_blocks


def _instance(config: Config, iid: InstanceId, num_blocks: int, max_lent: int,
              gmanager: GManager | None, local_first: bool) -> Instance:
    rmanager = RManager(iid, num_blocks, config.cache.block_size, max_lent, gmanager)
    if gmanager is not None:
        gmanager.register(rmanager)
    scheduler = Scheduler(iid, config.scheduler, rmanager, can_wait=gmanager is not None,
                          local_first=local_first,
                          prefix_caching=config.cache.enable_prefix_caching)
    return Instance(iid, rmanager, scheduler)
