"""Benchmark: the attention loop's block size (:func:`circuits.blockwise.attend`), against SDPA.

Why: the fused path computes a layer's statistics and its output from the same softmax rows,
one block of queries at a time; how many queries a block holds decides whether its scores stay
in cache through the three passes over them (scores, softmax, ``@ V``). This times the loop,
with the column sums of :class:`circuits.blockwise.ColumnSums`, for several block sizes, each
as a ratio to one causal ``scaled_dot_product_attention`` call on the same random queries, keys
and values, in the same process (best of ``--repeats``). Defaults: SmolLM2-135M's shapes.

    python bench/attention_blocks.py [--tokens 8192] [--heads 9] [--kv-heads 3] [--blocks 16 32 64 128 256 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuits.blockwise import AttentionSpec, ColumnSums, LazyMask, attend, stats_block  # noqa: E402


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t, h, hk, d = args.tokens, args.heads, args.kv_heads, args.head_dim
    q, k, v = torch.randn(1, h, t, d), torch.randn(1, hk, t, d), torch.randn(1, hk, t, d)
    spec, mask, lengths = AttentionSpec(d**-0.5, groups=h // hk), LazyMask(1, t, t), torch.tensor([t])
    sdpa = best_of(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d**-0.5, enable_gqa=hk != h), args.repeats)
    print(f"{t} tokens, {h} heads, {hk} KV heads: one causal SDPA call {sdpa:.3f} s; default block {stats_block(h, t)}")
    for block in args.blocks:
        loop = best_of(lambda b=block: attend(q, k, v, spec, mask, [(None, ColumnSums(lengths))], block=b), args.repeats)
        print(f"  {block:4d} queries per block: {loop:.3f} s = {loop / sdpa:.2f} x")


if __name__ == "__main__":
    main()
