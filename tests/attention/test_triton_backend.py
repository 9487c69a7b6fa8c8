"""The "triton" backend's kernels against float64, and the engine on it against transformers.

Without a GPU the kernels run on CPU tensors under Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton (the interpreter cannot be switched on later).
It runs every program in numpy, one after another, so shapes stay tiny. With a GPU the same
tests run on CUDA tensors, compiled. Every kernel is checked against plain torch math in float64
on the same (rounded) inputs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from infinillm import LLM, SamplingParams

# The interpreter computes in numpy, which warns where the kernels mean it: log(0) = -inf for a
# row that saw nothing, NaN * 0 in a partial the merge then leaves out.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = 64
TOLERANCES = {torch.float32: 3e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def kernels():
    from infinillm.attention import triton_kernels

    expected = "interpreted" if DEVICE == "cpu" else "compiled"
    assert triton_kernels.MODE == expected, "TRITON_INTERPRET must be set as tests/conftest.py does"
    return triton_kernels


@pytest.fixture
def triton_backend(kernels):
    from infinillm.attention import get_backend

    return get_backend("triton", DEVICE)


def reference(q, keys, values, visible):
    """float64 attention. q [Lq, Hq, D]; keys, values [Hkv, Lk, D]; visible [Lq, Lk] bool.
    Returns (out [Lq, Hq, D], lse [Hq, Lq]); rows that see nothing: out 0, lse -inf."""
    group = q.shape[1] // keys.shape[0]
    k = keys.cpu().double().repeat_interleave(group, 0)
    v = values.cpu().double().repeat_interleave(group, 0)
    scores = torch.einsum("qhd,hkd->hqk", q.cpu().double(), k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    return torch.einsum("hqk,hkd->qhd", probs, v), lse


def assert_close(out, lse, ref_out, ref_lse, dtype=torch.float32):
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.device.type == lse.device.type == DEVICE
    out, lse, tol = out.cpu(), lse.cpu(), TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse.double(), ref_lse, atol=3e-6, rtol=3e-6)


def block_cache(num_blocks, block_size, hkv, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (hkv, num_blocks, block_size, D)
    keys, values = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(2))
    return gen, keys, values


def positions_kv(cache, block_ids, n):
    """Positions [0, n) of a block table: [Hkv, n, D]."""
    return torch.cat([cache[:, :0, 0], *(cache[:, b] for b in block_ids)], 1)[:, :n]


# ---- decode: many sequences in one launch -----------------------------------------------------

@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("dtype, hkv, group", [(torch.float32, 2, 2), (torch.float16, 1, 4),
                                               (torch.bfloat16, 2, 3)])
def test_padded_decode_over_ragged_sequences(triton_backend, block_size, dtype, hkv, group):
    """Ragged lengths, shuffled block tables, a row with every key masked, and a row whose mask
    has holes (the contract is an additive mask, not a length)."""
    lens = [37, 1, 20, 0, 9]
    need = [math.ceil(n / block_size) for n in lens]
    gen, kc, vc = block_cache(sum(need) + 3, block_size, hkv, dtype, seed=block_size)
    ids = torch.randperm(kc.shape[1], generator=gen).tolist()
    tables = [ids[sum(need[:i]) : sum(need[: i + 1])] for i in range(len(lens))]
    width = max(lens)
    slot_table = torch.zeros(len(lens), width, dtype=torch.int64)  # padding: slot 0, valid
    mask = torch.full((len(lens), 1, 1, width), -math.inf)
    for i, (n, table) in enumerate(zip(lens, tables)):
        pos = torch.arange(n)
        slot_table[i, :n] = torch.tensor(table, dtype=torch.int64)[pos // block_size] \
            * block_size + pos % block_size
        mask[i, ..., :n] = 0.0
    mask[4, ..., 2:5] = -math.inf  # holes
    q = torch.randn(len(lens), hkv * group, D, generator=gen).to(DEVICE, dtype)
    out, lse = triton_backend.padded_decode_attention(q, kc, vc, slot_table.to(DEVICE),
                                                      mask.to(DEVICE), scale=D**-0.5)
    assert out.shape == q.shape and lse.shape == (len(lens), hkv * group)
    for i, (n, table) in enumerate(zip(lens, tables)):
        visible = (mask[i, 0, 0, :n] == 0)[None]
        ref_out, ref_lse = reference(q[i : i + 1], positions_kv(kc, table, n),
                                     positions_kv(vc, table, n), visible)
        assert_close(out[i : i + 1], lse[i][:, None], ref_out, ref_lse, dtype)
    assert (out[3] == 0).all() and torch.isneginf(lse[3]).all()  # saw nothing


def test_split_keys_decode_matches(triton_backend, kernels, monkeypatch):
    """Split-K (the GPU path for few long sequences), forced with splits of 64 keys: a holder's
    blocks, and padded decode where the shorter sequence has no key in its last split."""
    monkeypatch.setattr(kernels, "SPLIT_MIN_KEYS", 64)
    monkeypatch.setattr(kernels, "target_programs", lambda device: 64)
    gen, kc, vc = block_cache(40, 5, 2, torch.float32, seed=7)
    q = torch.randn(3, 4, D, generator=gen).to(DEVICE)
    table = torch.randperm(40, generator=gen).tolist()
    out, lse = triton_backend.blocks_attention(q, kc, vc, table, 197, scale=D**-0.5)
    ref = reference(q, positions_kv(kc, table, 197), positions_kv(vc, table, 197),
                    torch.ones(3, 197, dtype=torch.bool))
    assert_close(out, lse, *ref)
    assert kernels.num_splits(2, 197, q.device) == 3
    slots = torch.randperm(200, generator=gen)[:130]
    slot_table = torch.stack([slots, slots.roll(7)]).to(DEVICE)
    mask = torch.zeros(2, 1, 1, 130)
    mask[1, ..., 40:] = -math.inf
    out, lse = triton_backend.padded_decode_attention(q[:2], kc, vc, slot_table, mask.to(DEVICE),
                                                      scale=D**-0.5)
    for i, n in enumerate([130, 40]):
        keys, values = (c.view(2, -1, D)[:, slot_table[i, :n]] for c in (kc, vc))
        ref = reference(q[i : i + 1], keys, values, torch.ones(1, n, dtype=torch.bool))
        assert_close(out[i : i + 1], lse[i][:, None], *ref)
    assert kernels.num_splits(4, 130, q.device) == 2


# ---- a holder's blocks, a chunk over its prefix -----------------------------------------------

@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_blocks_attention_over_fragmented_table(triton_backend, block_size):
    gen, kc, vc = block_cache(40, block_size, 2, torch.float32, seed=3)
    n = min(38, 40 * block_size)
    table = torch.randperm(40, generator=gen).tolist()
    q = torch.randn(3, 6, D, generator=gen).to(DEVICE)
    out, lse = triton_backend.blocks_attention(q, kc, vc, table, n, scale=D**-0.5)
    ref = reference(q, positions_kv(kc, table, n), positions_kv(vc, table, n),
                    torch.ones(3, n, dtype=torch.bool))
    assert_close(out, lse, *ref)
    empty_out, empty_lse = triton_backend.blocks_attention(q, kc, vc, [], 0, scale=D**-0.5)
    assert (empty_out == 0).all() and torch.isneginf(empty_lse).all()
    with pytest.raises(ValueError, match="2 blocks of"):
        triton_backend.blocks_attention(q, kc, vc, [1, 2], 2 * block_size + 1, scale=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size, prefix", [(5, 23), (16, 0), (1, 6)])
def test_chunk_over_prefix_and_remote_partials(triton_backend, dtype, block_size, prefix):
    """A chunk of 7 at positions [P, P + 7): causal over itself, all of its local prefix, and
    a remote holder's partial; plus one partial that saw nothing and holds NaN."""
    lq, hkv, group, remote = 7, 2, 2, 11
    gen, kc, vc = block_cache(30, block_size, hkv, dtype, seed=block_size + prefix)
    table = torch.randperm(30, generator=gen).tolist()
    q, k_rows, v_rows, far_k, far_v = (
        torch.randn(shape, generator=gen).to(DEVICE, dtype)
        for shape in [(lq, hkv * group, D), (lq, hkv, D), (lq, hkv, D), (hkv, remote, D),
                      (hkv, remote, D)])
    # k_rows, v_rows are the model's rows [T, Hkv, D], passed transposed as the worker does
    far = triton_backend.micro_attention(q, far_k, far_v)
    nothing = (torch.full_like(q, math.nan),
               torch.full((hkv * group, lq), -math.inf, device=DEVICE))
    out, lse = triton_backend.chunk_attention(
        q, k_rows.transpose(0, 1), v_rows.transpose(0, 1), kc, vc, table, prefix,
        scale=D**-0.5, partials=[far, nothing])
    keys = torch.cat([far_k, positions_kv(kc, table, prefix), k_rows.transpose(0, 1)], 1)
    values = torch.cat([far_v, positions_kv(vc, table, prefix), v_rows.transpose(0, 1)], 1)
    visible = torch.ones(lq, remote + prefix + lq, dtype=torch.bool)
    visible[:, remote + prefix:] = torch.ones(lq, lq, dtype=torch.bool).tril()
    assert_close(out, lse, *reference(q, keys, values, visible), dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_micro_attention_and_empty_keys(triton_backend, causal):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE)
               for shape in [(9, 3, D), (1, 9, D), (1, 9, D)])
    out, lse = triton_backend.micro_attention(q, k, v, causal=causal)
    visible = torch.ones(9, 9, dtype=torch.bool)
    assert_close(out, lse, *reference(q, k, v, visible.tril() if causal else visible))
    empty_out, empty_lse = triton_backend.micro_attention(q, k[:, :0], v[:, :0])
    assert (empty_out == 0).all() and torch.isneginf(empty_lse).all()


# ---- merge and KV writes ----------------------------------------------------------------------

@pytest.mark.parametrize("num_parts", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_leaves_out_partials_that_saw_nothing(triton_backend, num_parts, dtype):
    """Partials [batch 2, Lq 3, Hq 4, D] with lse -inf at some (query, head): their outs hold
    NaN and inf, which must not reach the result; a row no partial saw gets 0 and -inf."""
    gen = torch.Generator().manual_seed(num_parts)
    outs = [torch.randn(2, 3, 4, D, generator=gen).to(dtype) for _ in range(num_parts)]
    lses = [torch.randn(2, 4, 3, generator=gen) * 3 for _ in range(num_parts)]
    # (built on CPU, the reference below reads them there)
    blind = torch.rand(num_parts, 2, 4, 3, generator=gen) < 0.4
    blind[:, 1, 2, 0] = True  # seen by nobody
    for j in range(num_parts):
        lses[j][blind[j]] = -math.inf
        outs[j][blind[j].transpose(-1, -2)] = math.nan if j % 2 else math.inf
    out, lse = triton_backend.merge([o.to(DEVICE) for o in outs], [x.to(DEVICE) for x in lses])
    stacked_lse = torch.stack(lses).double()
    ref_lse = torch.logsumexp(stacked_lse, 0)
    weights = torch.exp(stacked_lse - torch.where(torch.isfinite(ref_lse), ref_lse, 0))
    parts = torch.stack(outs).double().nan_to_num(0.0, 0.0, 0.0)  # blind parts have weight 0
    ref_out = (weights.transpose(-1, -2)[..., None] * parts).sum(0)
    assert_close(out, lse, ref_out, ref_lse, dtype)
    assert (out[1, 0, 2] == 0).all() and torch.isneginf(lse[1, 2, 0])  # seen by nobody
    single = triton_backend.merge(outs[:1], lses[:1])
    assert single[0] is outs[0] and single[1] is lses[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_storage_semantics(triton_backend, dtype):
    from infinillm.kvcache import KVStorage

    gen = torch.Generator().manual_seed(8)
    ours = KVStorage(2, 2, D, 6, 5, dtype, DEVICE, writer=triton_backend.write_kv)
    plain = KVStorage(2, 2, D, 6, 5, dtype, DEVICE)
    slots = torch.randperm(30, generator=gen)[:17].to(DEVICE)
    k = torch.randn(17, 2, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(17, 2, D, generator=gen).to(DEVICE, dtype)
    for storage in (ours, plain):
        storage.write(1, slots, k, v)
        storage.write(0, slots[:3], k[[4, 0, 9]], v[[4, 0, 9]])  # gathered rows, as the worker
    assert torch.equal(ours.keys, plain.keys) and torch.equal(ours.values, plain.values)
    flat = ours.keys[1].view(2, -1, D)
    assert torch.equal(flat[:, slots], k.transpose(0, 1))


def test_cpu_tensors_without_the_interpreter_are_refused():
    """A fresh process without TRITON_INTERPRET: a clear error, before any model loads."""
    code = ("from infinillm.attention import get_backend\n"
            "try:\n    get_backend('triton', 'cpu')\n"
            "except ValueError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True)
    assert "TRITON_INTERPRET=1" in result.stdout and "before triton is imported" in result.stdout


_COMPILE_FOR_HOPPER = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from infinillm.attention import triton_kernels as K
assert K.MODE == "compiled", K.MODE

def build(fn, types, constexprs):
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32))

bf16 = {n: "*bf16" for n in ("q_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr", "k_ptr", "v_ptr",
                              "key_ptr", "value_ptr", "out_ptr")}
build(K._attention_kernel,  # padded decode, bf16: block and slot reads, mask, per-sequence keys
      {**bf16, "lse_ptr": "*fp32", "table_ptr": "*i64", "num_keys_ptr": "*i64",
       "mask_ptr": "*fp32", "scale_log2": "fp32"},
      dict(HAS_CACHE=True, KEYS_PER_SEQ=True, HAS_MASK=True, HAS_DIRECT=True, CAUSAL=True,
           TABLE_BLOCK=1, DOT_DTYPE=tl.bfloat16, BLOCK_M=16, BLOCK_N=64, BLOCK_D=128))
build(K._merge_kernel, {"outs_ptr": "*fp32", "lses_ptr": "*fp32", "out_ptr": "*bf16",
                        "lse_ptr": "*fp32"}, dict(BLOCK_R=16, BLOCK_D=128))
build(K._write_kv_kernel, {**bf16, "slots_ptr": "*i64", "k_cache_ptr": "*bf16",
                           "v_cache_ptr": "*bf16"}, dict(BLOCK_T=16, BLOCK_D=128))
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_a_hopper_gpu(tmp_path):
    """Without a GPU, Triton still compiles for one (down to a cubin, with the ptxas it ships):
    what the interpreter does not check (tl.dot's minimum shapes, types across branches).
    A fresh cache folder, so that nothing compiled earlier is reused."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# ---- the engine against transformers ----------------------------------------------------------

GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def hf_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.skipif(DEVICE == "cuda", reason="the engine runs on CPU here, which needs the "
                    "interpreter; with CUDA, TRITON_INTERPRET stays off")
# Qwen2 (biases) in the slow tier, as for the other engine tests (tests/conftest.py)
@pytest.mark.parametrize("tiny_model", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)],
                         indirect=True)
@pytest.mark.parametrize("block_size, num_instances, num_blocks, long_len",
                         [(1, 2, 20, 24), (5, 3, 3, 17), (16, 2, 2, 34)])
def test_engine_tokens_equal_transformers_with_borrowing(tiny_model, block_size, num_instances,
                                                         num_blocks, long_len):
    """The long prompt outgrows one pool, so its owner borrows: its holders write K/V and
    compute partials with their Triton kernels, the owner merges them with its own."""
    import transformers

    from infinillm.attention.triton_backend import TritonBackend

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    gen = torch.Generator().manual_seed(block_size)
    batch = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (long_len, 6)]
    assert long_len + GREEDY.max_tokens > num_blocks * block_size  # more than one pool
    llm = LLM(tiny_model, attention_backend="triton", block_size=block_size,
              kv_blocks_per_instance=num_blocks, num_instances=num_instances,
              max_num_batched_tokens=64)
    engine = llm.engine
    assert {type(w.attention) for w in engine.executor.workers.values()} == {TritonBackend}
    ids = [engine.add_request(p, GREEDY) for p in batch]
    done, borrowed = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        engine.check_integrity()
        borrowed = max(borrowed, sum(i.rmanager.num_lent_blocks for i in engine.instances))
    for rid, prompt in zip(ids, batch):
        assert done[rid] == hf_greedy(hf.eval(), prompt, GREEDY.max_tokens)
    assert borrowed > 0 and llm.cluster_stats()["remote_attention_calls"] > 0
    assert engine.num_free_blocks() == [num_blocks] * num_instances
