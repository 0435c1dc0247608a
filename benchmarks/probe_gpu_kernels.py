"""GPU/TPU check of the backend's Pallas decode-attention kernel (graphs.attention.decode_kernel:
graphs.pallas_attention on GPU, graphs.pallas_tpu_attention on TPU) against the plain-XLA attention
it replaces (graphs.attention._attend): agreement and time per call, on decode shapes of a
Llama-3.2-1B (32 query / 8 KV heads of 64) and a Llama-3.1-8B (32 / 8 of 128) layer.

    python benchmarks/probe_gpu_kernels.py [--json out.json]

Runs anywhere; off a GPU or TPU the Triton kernel runs in Pallas interpret mode (agreement only;
times mean nothing there). Shapes the backend's kernel does not take are skipped, saying so.
Part of benchmarks/gpu_checks.sh (PARTS=kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from graphs.attention import _attend, decode_kernel  # noqa: E402
from maxlike.entrypoints.roofline import best_seconds  # noqa: E402


def case(rng, b: int, h: int, kv: int, d: int, s: int, context: int, dtype):
    """A pool with `b` rows of `context` keys each on distinct random pages."""
    p = -(-context // s)
    n = b * p + 1
    k = jnp.asarray(rng.standard_normal((1, 1, n, s, kv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((1, 1, n, s, kv, d)), dtype)
    table = jnp.asarray(1 + rng.permutation(b * p).reshape(b, p), jnp.int32)
    q = jnp.asarray(rng.standard_normal((b, 1, h, d)), dtype)
    pos = jnp.full((b, 1), context - 1, jnp.int32)
    return q, k, v, table, pos


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    platform = jax.devices()[0].platform
    timed = platform in ("gpu", "tpu")
    kernel, interpret = decode_kernel(platform)
    rng = np.random.default_rng(0)
    xla = jax.jit(lambda q, k, v, t, pos: _attend(q, k, v, t, pos, 0))
    pallas = jax.jit(lambda q, k, v, t, pos: kernel.paged_decode_attention(q, k, v, t, pos, 0, interpret=interpret))
    rows = []
    shapes = [(b, 32, 8, d, 16, ctx) for d in (64, 128) for b, ctx in ((1, 1024), (8, 1024), (64, 1024), (1, 8192))]
    if not timed:
        shapes = [(2, 8, 2, 64, 16, 100)]
    for dtype in (jnp.bfloat16, jnp.float32):
        for b, h, kv, d, s, ctx in shapes:
            inputs = case(rng, b, h, kv, d, s, ctx, dtype)
            if not kernel.supported(inputs[0], inputs[1]):
                print(f"skipped: {kernel.__name__} does not take {b} rows of {h} heads / {kv} KV heads of {d}",
                      flush=True)
                continue
            ref = np.asarray(xla(*inputs), np.float32)
            got = np.asarray(pallas(*inputs), np.float32)
            row = {"dtype": jnp.dtype(dtype).name, "batch": b, "heads": h, "kv_heads": kv, "head_dim": d,
                   "page": s, "context": ctx, "max_abs_err": float(np.abs(got - ref).max())}
            if timed:
                row.update(xla_ms=1e3 * best_seconds(xla, *inputs, repeats=20),
                           pallas_ms=1e3 * best_seconds(pallas, *inputs, repeats=20))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after every row: a run stopped by its time limit keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
