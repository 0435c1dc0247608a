"""Prefill attention over a wide page table: one whole-table product (graphs.attention._attend) against
key blocks (_attend_blocks), per table width: ms per call and XLA's temporaries. On GPU this decides
graphs.attention.GPU_WHOLE_TABLE_SCORE_BYTES (the whole table's scores up to which prefill keeps one
product: the block loop's count is read on the host each iteration there), issue 16. Llama-3.1-8B's
attention shape by default (32 query / 8 KV heads of 128, bfloat16; float32 on CPU), one layer, one row
(and --padding-rows).

    python benchmarks/probe_prefill_blocks.py [--tokens 512 2048] [--keys 2048 8192 32768 131072] [--window W]
        [--padding-rows N] [--decode-rows N] [--json F]

Each prompt is a step's `tokens` queries at positions [at, at + tokens): `at` 0 (a prompt's first
chunk: one block or a few reached) and `keys - tokens` (a last chunk: every block). With --window and
--decode-rows, decode steps at each table's last position: a static window (each row reads the pages
its window touches), the same as an array with `max_window` (as under scan: a branch chosen on device),
and as an array alone (the table's prefix). Where a whole
table's float32 scores would pass --max-score-gib the whole-table case is skipped, saying so.
Part of benchmarks/gpu_checks.sh (PARTS=prefill).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from graphs import attention  # noqa: E402
from maxlike.engine.session import memory_analysis  # noqa: E402
from maxlike.entrypoints.roofline import best_seconds  # noqa: E402


ON_DEVICE = dict(attention.WIDTH_ON_DEVICE)


def run(backend: str, blocks: bool, q, k, v, table, pos, repeats: int, window=None, **kw) -> dict:
    """ms per call and temporaries (MiB) of one prefill attention, whole-table or by key blocks (a
    decode step: as the backend runs it)."""
    attention.GPU_WHOLE_TABLE_SCORE_BYTES = 0 if blocks else 1 << 60
    attention.WIDTH_ON_DEVICE[backend] = blocks if q.shape[1] > 1 else ON_DEVICE[backend]  # CPU and TPU: blocks
    fn = jax.jit(partial(attention.paged_attention, backend=backend, window=window, **kw))
    compiled = fn.lower(q, k, v, table, pos).compile()
    assert q.shape[1] == 1 or (" while" in compiled.as_text()) == blocks, "not the attention it asked for"
    memory = memory_analysis(compiled) or {}
    seconds = best_seconds(compiled, q, k, v, table, pos, repeats=repeats)
    return {"ms": round(seconds * 1e3, 3), "temp_mib": round(memory.get("temp_size_in_bytes", 0) / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--keys", type=int, nargs="+", default=[2048, 8192, 32768, 131072], help="table widths")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--window", type=int, help="sliding-window attention of this many keys (Gemma's, Mistral's)")
    ap.add_argument("--decode-rows", type=int, default=0,
                    help="also time decode steps of this many rows at each table's last position in --window: "
                         "static, an array with max_window (each row reads its window's pages), an array alone "
                         "(the table's prefix)")
    ap.add_argument("--padding-rows", type=int, default=0,
                    help="prefill steps with this many padding rows (every position 0, the null page) after the "
                         "prompt's, as a batch's prefill bucket pads them")
    ap.add_argument("--max-score-gib", type=float, default=24.0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    backend = jax.default_backend()
    dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
    rng = np.random.default_rng(0)
    rows = []
    print(f"{jax.devices()[0].device_kind}: key block {attention.KEY_BLOCK}, {args.heads}/{args.kv_heads} heads "
          f"of {args.head_dim}, {jnp.dtype(dtype).name}")
    for keys in args.keys:
        s = args.page_size
        pages = -(-keys // s)
        shape = (1, 1, pages + 1, s, args.kv_heads, args.head_dim)
        k = jnp.asarray(rng.standard_normal(shape), dtype)
        v = jnp.asarray(rng.standard_normal(shape), dtype)
        b = 1 + args.padding_rows
        table = jnp.zeros((b, pages), jnp.int32).at[0].set(jnp.arange(1, pages + 1, dtype=jnp.int32))
        for t in args.tokens:
            if t > keys:
                continue
            q = jnp.asarray(rng.standard_normal((b, t, args.heads, args.head_dim)), dtype)
            for at in sorted({0, keys - t}):
                pos = jnp.zeros((b, t), jnp.int32).at[0].set(jnp.arange(at, at + t, dtype=jnp.int32))
                row = {"keys": keys, "tokens": t, "first_position": at, "window": args.window,
                       "padding_rows": args.padding_rows}
                row["blocks"] = run(backend, True, q, k, v, table, pos, args.repeats, args.window)
                score_gib = b * args.heads * t * pages * s * 4 / 2**30
                if score_gib > args.max_score_gib:
                    row["whole"] = f"skipped: its scores alone would hold {score_gib:.1f} GiB"
                else:
                    row["whole"] = run(backend, False, q, k, v, table, pos, args.repeats, args.window)
                print(json.dumps(row), flush=True)
                rows.append(row)
        if args.decode_rows and args.window:
            b = args.decode_rows
            shape = (1, 1, b * pages + 1, s, args.kv_heads, args.head_dim)
            k = jnp.asarray(rng.standard_normal(shape), dtype)
            v = jnp.asarray(rng.standard_normal(shape), dtype)
            table = jnp.arange(1, b * pages + 1, dtype=jnp.int32).reshape(b, pages)
            q = jnp.asarray(rng.standard_normal((b, 1, args.heads, args.head_dim)), dtype)
            pos = jnp.full((b, 1), keys - 1, jnp.int32)
            row = {"keys": keys, "decode_rows": b, "window": args.window,
                   "window_pages": run(backend, True, q, k, v, table, pos, args.repeats, args.window),
                   "array_window_pages": run(backend, True, q, k, v, table, pos, args.repeats,
                                             jnp.int32(args.window), max_window=args.window),
                   "prefix": run(backend, True, q, k, v, table, pos, args.repeats, jnp.int32(args.window))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "key_block": attention.KEY_BLOCK,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
