"""The simulator's cost model against published model sizes and first-principles bounds."""

from __future__ import annotations

import dataclasses
import json

import pytest

from infinillm.model.arch import arch_from_dict
from infinillm.runtime.traffic import tokens_by_holder
from infinillm.sim.cost import CostModel, new_tokens_by_holder
from infinillm.sim.devices import PRESETS as DEVICES
from infinillm.sim.devices import DeviceProfile, load_profile
from infinillm.sim.models import PRESETS as MODELS
from infinillm.types import BlockMove, InstanceId, ScheduledChunk

A100 = DEVICES["a100-80gb"]


def cost_of(model: str, device: DeviceProfile = A100, tp: int = 1,
            block_size: int = 16) -> CostModel:
    return CostModel(arch_from_dict(MODELS[model]), 2, block_size, device, tp)


def chunk(start: int, num_tokens: int, holders: list[int], block_size: int = 16,
          sample: bool = True) -> ScheduledChunk:
    """A chunk whose table holds blocks on `holders` (one entry per block, in order)."""
    blocks = [(InstanceId(h), i) for i, h in enumerate(holders)]
    assert len(blocks) == -(-(start + num_tokens) // block_size)
    counts = {h: holders.count(h) for h in set(holders)}
    return ScheduledChunk("r", [1] * num_tokens, start, blocks, sample, holders=counts)


@pytest.mark.parametrize("model, billions", [
    # parameter counts published with the models (Llama 2 paper; Meta's model cards)
    ("llama2-7b", 6.74), ("llama2-13b", 13.02), ("llama2-70b", 68.98),
    ("llama3-8b", 8.03), ("llama3-70b", 70.55)])
def test_weights_match_the_published_parameter_counts(model, billions):
    cost = cost_of(model)
    params = cost.weight_bytes / 2  # bf16; norms (a few hundred thousand) left out
    assert params / 1e9 == pytest.approx(billions, rel=0.005)


def test_kv_bytes_per_token_and_pool_size():
    # K and V, 40 layers x 5120 wide in bf16: 800 KiB a token for LLaMA2-13B; GQA (8 KV heads
    # of 128) makes LLaMA2-70B's 80 layers 320 KiB
    assert cost_of("llama2-13b").kv_token_bytes * 40 == 800 * 1024
    assert cost_of("llama2-70b").kv_token_bytes * 80 == 320 * 1024
    cost = cost_of("llama2-13b")
    usable = 80 * 2**30 * 0.9 - cost.weight_bytes - 2 * 2**30
    assert cost.kv_blocks() == int(usable // (800 * 1024 * 16))
    with pytest.raises(ValueError, match="leave no KV memory"):
        cost_of("llama2-70b").kv_blocks()  # 138 GB of weights on one 80 GB device
    assert cost_of("llama2-70b", tp=4).kv_blocks() > 0


def test_decode_is_bound_by_reading_the_weights_and_prefill_by_flops():
    cost = cost_of("llama2-13b")
    p = A100
    decode = cost.step(InstanceId(0), [chunk(99, 1, [0] * 7)])
    # every weight is read once, but the embedding table (a row per token)
    read = cost.weight_bytes - 2 * cost.arch.hidden_size * cost.arch.vocab_size
    weights_read = read / (p.memory_bandwidth * p.memory_efficiency)
    assert weights_read <= decode.linear <= 1.05 * weights_read
    assert decode.seconds == pytest.approx(decode.linear + decode.attention + decode.overhead)
    # 2048 prompt tokens: 2 x 13B x 2048 FLOPs at the curve's share of peak
    prefill = cost.step(InstanceId(0), [chunk(0, 2048, [0] * 128)])
    flops = 2 * cost.layer_params * cost.arch.num_layers * 2048
    compute_bound = flops / (p.peak_flops * p.gemm_share(2048))
    assert compute_bound <= prefill.linear <= 1.1 * compute_bound
    # a batch of 64 decodes costs far less than 64 single decodes (the point of batching)
    batch = cost.step(InstanceId(0), [chunk(99, 1, [0] * 7) for _ in range(64)])
    assert batch.seconds < 4 * decode.seconds


def test_attention_grows_with_the_keys_read():
    cost = cost_of("llama2-13b")
    short = cost.step(InstanceId(0), [chunk(1023, 1, [0] * 64)])
    long = cost.step(InstanceId(0), [chunk(32767, 1, [0] * 2048)])
    per_token = cost.kv_token_bytes * cost.arch.num_layers / A100.attention_bandwidth
    assert long.attention - short.attention == pytest.approx((32768 - 1024) * per_token)


def test_remote_blocks_move_attention_to_the_holder_and_add_an_exchange():
    cost = cost_of("llama2-13b")
    local = cost.step(InstanceId(0), [chunk(16383, 1, [0] * 1024)])
    split = cost.step(InstanceId(0), [chunk(16383, 1, [0] * 512 + [1] * 512)])
    far = cost.step(InstanceId(0), [chunk(16383, 1, [0] * 512 + [9] * 512)])
    assert split.attention < local.attention
    holder = cost.attention_seconds(split.remote[InstanceId(1)])
    assert holder == pytest.approx(local.attention / 2, rel=0.01)
    # the owner waits for the holder each layer: its compute plus two latencies and the bytes
    assert split.exchange > holder + 2 * 40 * A100.intra_node_latency_s
    assert far.exchange > split.exchange  # instance 9 is in the next node of 8: the network
    # kilobytes a layer, as the paper says: query out, (out, lse) back
    assert split.traffic[InstanceId(1)] < 64 * 1024


def test_tensor_parallel_splits_the_work_and_pays_all_reduces():
    one = cost_of("llama2-13b").step(InstanceId(0), [chunk(99, 1, [0] * 7)] * 32)
    eight = cost_of("llama2-13b", tp=8).step(InstanceId(0), [chunk(99, 1, [0] * 7)] * 32)
    assert eight.allreduce > 0 and one.allreduce == 0
    # GEMMs split 8 ways; norms and residuals are replicated on every device
    assert one.linear / 8 < eight.linear < 1.1 * one.linear / 8
    assert one.seconds / 8 < eight.seconds < one.seconds
    # beyond one node the all-reduce crosses the network
    sixteen = cost_of("llama2-13b", tp=16).step(InstanceId(0), [chunk(99, 1, [0] * 7)] * 32)
    assert sixteen.allreduce > eight.allreduce


def test_block_moves_cost_bytes_over_the_link():
    cost = cost_of("llama2-13b")
    moves = [BlockMove("r", InstanceId(0), i, (InstanceId(1), i), (InstanceId(0), 10 + i))
             for i in range(10)]
    seconds = cost.move_seconds(moves, concurrent=True)
    assert seconds == pytest.approx(A100.intra_node_latency_s
                                    + 10 * 800 * 1024 * 16 / A100.intra_node_bandwidth)
    both = moves + [BlockMove("s", InstanceId(2), 0, (InstanceId(3), 0), (InstanceId(2), 0))]
    assert cost.move_seconds(both, concurrent=True) == pytest.approx(seconds)
    assert cost.move_seconds(both, concurrent=False) > seconds


@pytest.mark.parametrize("seed", range(20))
def test_tokens_by_holder_matches_a_position_by_position_count(seed):
    import random

    rng = random.Random(seed)
    bs = rng.choice([1, 4, 16])
    start, n = rng.randrange(0, 200), rng.randrange(1, 40)
    holders = [rng.randrange(3) for _ in range(-(-(start + n) // bs))]
    c = chunk(start, n, holders, bs)
    expected: dict[int, int] = {}
    for pos in range(start + n):
        expected[holders[pos // bs]] = expected.get(holders[pos // bs], 0) + 1
    assert tokens_by_holder(c, bs) == expected
    written: dict[int, int] = {}
    for pos in range(start, start + n):
        written[holders[pos // bs]] = written.get(holders[pos // bs], 0) + 1
    assert new_tokens_by_holder(c, bs) == written


def test_profiles_round_trip_and_bad_files_are_clear(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(A100.to_json())
    assert load_profile(str(path)) == A100
    data = json.loads(A100.to_json())
    del data["peak_flops"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing \\['peak_flops'\\]"):
        load_profile(str(path))
    path.write_text(json.dumps({**json.loads(A100.to_json()), "peak_flops": -1}))
    with pytest.raises(ValueError, match="peak_flops must be a number >= 0"):
        load_profile(str(path))
    with pytest.raises(ValueError, match="valid: a100-80gb, h100-80gb, h200-141gb, cpu"):
        load_profile("b200")
    assert dataclasses.replace(A100, name="x").gemm_share(1) == A100.gemm_efficiency[0][1]
    assert A100.gemm_share(10**6) == A100.gemm_efficiency[-1][1]
