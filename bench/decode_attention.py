"""Decode attention over rBlocks vs contiguous scaled_dot_product_attention on the same data.

    .venv/bin/python bench/decode_attention.py [--context 32768] [--block-size 16]

One query token (SmolLM2-135M shapes: 9 query heads over 3 KV heads, head_dim 64, fp32) over
`--context` tokens of K/V. The contiguous baseline is `F.scaled_dot_product_attention` on
[1, Hkv, L, D] tensors. The blocked cases run infinillm's `paged_attention` on a cache of
[Hkv, num_blocks, block_size, D] with three block tables: adjacent ids (a request that grew in
an idle pool: read in place), runs of 64 blocks (a pool shared by a few requests), and a random
permutation (worst case: one gather). Bytes/s counts K and V read once, against the machine's
copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import emit_json, machine_info, print_table  # noqa: E402

from infinillm.attention import paged_attention  # noqa: E402


def timeit(fn, repeats: int) -> float:
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
    tables = {
        "adjacent": list(range(num_blocks)),
        "runs of 64": [b for start in torch.randperm(pool_blocks // 64)[: -(-num_blocks // 64)]
                       .tolist() for b in range(start * 64, start * 64 + 64)][:num_blocks],
        "random": torch.randperm(pool_blocks)[:num_blocks].tolist(),
    }
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
            return paged_attention(q, kc, vc, ids, start_pos=n - 1, scale=scale)

        ref = contiguous().view(hq, d)
        out, _ = blocked()
        err = (out[0] - ref).abs().max().item()
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
    emit_json({"bench": "decode_attention", "machine": machine_info(), "context": n,
               "block_size": bs, "copy_gb_per_s": bandwidth / 1e9, "rows": rows})


if __name__ == "__main__":
    main()
