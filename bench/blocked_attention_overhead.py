"""What attention over rBlocks costs against contiguous KV: one decode query over the same data,
read through a block table vs `scaled_dot_product_attention` on contiguous tensors.

    python -m bench.blocked_attention_overhead [--context 32768] [--block-size 16] [--repeats 20]

One query token (SmolLM2-135M shapes: 9 query heads over 3 KV heads, head_dim 64, fp32) over
`--context` tokens of K/V. The contiguous baseline is `F.scaled_dot_product_attention` on
[1, Hkv, L, D] tensors. The blocked cases run what infinillm's worker runs for a decode token
(`chunk_attention` of the default CPU backend, in `blocked_decode` below) on a cache of
[Hkv, num_blocks, block_size, D] with three block tables: adjacent ids (a request that grew
in an idle pool: read in place), runs of 64 blocks (a pool shared by a few requests), and a
random permutation (worst case: one gather). Each time is the best of 5 rounds of `--repeats`
calls after 3 untimed ones. Bytes/s counts K and V read once, against the machine's copy
bandwidth measured in the same run. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from bench.lib.report import emit_json, machine_info, print_table


def blocked_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   block_ids: list[int], start_pos: int, scale: float) -> torch.Tensor:
    """infinillm's attention of `query` [1, Hq, D] at position `start_pos` over the blocks
    `block_ids` of caches [Hkv, num_blocks, block_size, D]; out [1, Hq, D]. As in the worker,
    the query's own K/V [Hkv, 1, D] come fresh (here: read from its slot) and the prefix
    [0, start_pos) is read through the block table."""
    from infinillm.attention import get_backend

    block, offset = divmod(start_pos, key_cache.shape[2])
    slot = slice(offset, offset + 1)
    key, value = key_cache[:, block_ids[block], slot], value_cache[:, block_ids[block], slot]
    out, _lse = get_backend("auto").chunk_attention(query, key, value, key_cache, value_cache,
                                                    block_ids, start_pos, scale=scale)
    return out


def timeit(fn, repeats: int) -> float:
    """Best seconds per call over 5 rounds of `repeats` calls, after 3 untimed calls."""
    for _ in range(3):
        fn()
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy, counting read and write (as numpy's copy figure)."""
    src = torch.randn(64 << 20 >> 2)
    dst = torch.empty_like(src)
    seconds = timeit(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 4 / seconds


def block_tables(num_blocks: int, pool_blocks: int) -> dict[str, list[int]]:
    """The three layouts, drawn from torch's global generator (seeded by the caller)."""
    runs = torch.randperm(pool_blocks // 64)[: -(-num_blocks // 64)].tolist()
    return {
        "adjacent": list(range(num_blocks)),
        "runs of 64": [b for start in runs for b in range(start * 64, start * 64 + 64)]
        [:num_blocks],
        "random": torch.randperm(pool_blocks)[:num_blocks].tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    hq, hkv, d, bs, n = 9, 3, 64, args.block_size, args.context
    num_blocks = -(-n // bs)
    pool_blocks = num_blocks * 2
    kc = torch.randn(hkv, pool_blocks, bs, d)
    vc = torch.randn(hkv, pool_blocks, bs, d)
    q = torch.randn(1, hq, d)
    scale = 1 / math.sqrt(d)
    tables = block_tables(num_blocks, pool_blocks)
    kv_bytes = 2 * hkv * n * d * 4
    bandwidth = copy_bandwidth()
    rows = []
    for name, ids in tables.items():
        k = torch.cat([kc[:, b] for b in ids], 1)[:, :n].unsqueeze(0).contiguous()
        v = torch.cat([vc[:, b] for b in ids], 1)[:, :n].unsqueeze(0).contiguous()

        def contiguous(k=k, v=v):
            return F.scaled_dot_product_attention(q.view(1, hq, 1, d), k, v, scale=scale,
                                                  enable_gqa=True)

        def blocked(ids=ids):
            return blocked_decode(q, kc, vc, ids, start_pos=n - 1, scale=scale)

        err = (blocked()[0] - contiguous().view(hq, d)).abs().max().item()
        t_contig = timeit(contiguous, args.repeats)
        t_block = timeit(blocked, args.repeats)
        rows.append({"table": name, "contiguous ms": round(t_contig * 1e3, 3),
                     "blocked ms": round(t_block * 1e3, 3),
                     "ratio": round(t_block / t_contig, 2),
                     "blocked GB/s": round(kv_bytes / t_block / 1e9, 1),
                     "max abs diff": f"{err:.1e}"})
    print(f"context {n} tokens, block size {bs}, K+V {kv_bytes / 1e6:.1f} MB; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    print_table(rows)
    emit_json({"bench": "blocked_attention_overhead", "machine": machine_info(), "context": n,
               "block_size": bs, "copy_gb_per_s": bandwidth / 1e9, "rows": rows})


if __name__ == "__main__":
    main()
