"""Inspection: the cluster snapshot behind /v1/cluster, /metrics and the live page, and the
integrity check tests run after steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infinillm.engine.engine import ClusterEngine


def cluster_stats(engine: ClusterEngine) -> dict:
    """Per instance block counts and fitted step-time model, the debts, remote attention
    traffic, block moves (those of proactive placement among them), preemptions and the
    prefix cache (per instance: blocks in its index, and those of them no request uses, which
    `free_blocks` counts as free; cluster-wide: lookups and hits in tokens)."""
    instances = []
    for inst in engine.instances:
        rm = inst.rmanager
        instances.append({
            "instance": inst.instance_id,
            "total_blocks": rm.num_blocks,
            "free_blocks": rm.num_free_blocks,
            "used_blocks": rm.num_blocks - rm.num_free_blocks - rm.num_lent_blocks,
            "lent_blocks": rm.num_lent_blocks,
            "borrowed_blocks": rm.num_borrowed_blocks(),
            "cached_blocks": rm.num_cached_blocks,
            "evictable_blocks": rm.num_evictable_blocks,
            "running": len(inst.scheduler.running),
            "waiting": len(inst.scheduler.waiting),
            "preemptions": inst.scheduler.num_preemptions,
            "step_model": engine.perf_models[inst.instance_id].as_dict(),
        })
    fabric = engine.executor.fabric_stats()
    gm = engine.gmanager
    debts = sorted(gm.debt_matrix().items()) if gm is not None else []
    placement = engine.rebalancer.placement
    return {
        "lending": engine.lending,
        "placement": engine.config.cluster.placement if engine.lending else None,
        "placement_moves": placement.num_moves if placement is not None else 0,
        "block_size": engine.config.cache.block_size,
        "instances": instances,
        "debts": [{"debtor": d, "creditor": c, "blocks": n} for (d, c), n in debts],
        "remote_attention_calls": fabric.remote_attention_calls,
        "remote_attention_items": fabric.remote_attention_items,
        "remote_kv_writes": fabric.remote_kv_writes,
        "remote_bytes": fabric.bytes_sent,
        "migrations": engine.rebalancer.num_moves,
        "refused_loans": gm.num_refused_loans if gm is not None else 0,
        "standstills": engine.rebalancer.num_standstills,
        "preemptions": sum(i["preemptions"] for i in instances),
        "prefix_caching": engine.config.cache.enable_prefix_caching,
        "prefix_cache_queries": sum(i.scheduler.num_prefix_queries for i in engine.instances),
        "prefix_cache_hits": sum(i.scheduler.num_prefix_hits for i in engine.instances),
    }


def check_integrity(engine: ClusterEngine) -> None:
    """Every pool, table and the ledger agree (conservation), only running requests hold
    blocks, and the counts kept as things change (blocks per holder, borrowed blocks, queued
    blocks) equal a recount; RuntimeError with the numbers otherwise."""
    if engine.gmanager is not None:
        engine.gmanager.check_integrity()
    for inst in engine.instances:
        inst.rmanager.check_integrity()
        queued = inst.scheduler.recount_queued_blocks()
        if queued != inst.scheduler.queued_blocks():
            raise RuntimeError(f"instance {inst.instance_id}: its queue needs {queued} blocks, "
                               f"the running total says {inst.scheduler.queued_blocks()}")
        live = {r.request_id for r in inst.scheduler.running}
        stray = set(inst.rmanager.request_ids()) - live
        if stray:
            raise RuntimeError(f"instance {inst.instance_id} holds blocks of requests that "
                               f"are not running: {sorted(stray)}")
