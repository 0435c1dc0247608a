"""GPU check of decode's products with quantized weights: the Pallas kernel
(graphs.pallas_gpu_matmul) against XLA's products (the float weight rebuilt for the matmul, as
graphs.layers.projection does; and, for int8, a multiply-and-sum XLA may fuse as a reduction) and
against bf16, per projection shape of a Llama-3.2-1B and a Llama-3.1-8B layer, for 1, 8 and 64 rows.

    python benchmarks/probe_gpu_quant_matmul.py [--shapes 1b 8b] [--rows 1 8 64] [--json out.json] [--sweep]

Each variant multiplies by `--layers` different weights of the shape in one jitted call (more
bytes than the GPU's L2, so every weight comes from HBM), and the time per product is the best
call over `--layers`. Printed per row: microseconds a product, the weight bytes it read over that
time (GB/s), and its speed against bf16's. Off a GPU the kernel runs in Pallas interpret mode on
small shapes (agreement only; times mean nothing there). Part of benchmarks/gpu_checks.sh
(PARTS=qmatmul), issue 16.

`--sweep`: instead, the kernel's tuning (`grouped_matmul(tuning=...)`: outputs a program, target
programs, Triton warps, pipeline stages) over SWEEP, for the 1B's gate/up and down products at
the first of `--rows`, int8 and q4_k; the five fastest of each are printed.
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

from graphs import pallas_gpu_matmul as gm  # noqa: E402
from graphs.layers import dequantize_grouped  # noqa: E402
from maxlike.entrypoints.roofline import best_seconds  # noqa: E402
from maxlike.weights import quantize  # noqa: E402

SHAPES = {  # (name, K, N)
    "1b": [("q/o", 2048, 2048), ("k/v", 2048, 512), ("gate/up", 2048, 8192), ("down", 8192, 2048)],
    "8b": [("q/o", 4096, 4096), ("k/v", 4096, 1024), ("gate/up", 4096, 14336), ("down", 14336, 4096)],
    "tiny": [("tiny", 256, 128)],
}


def weights(rng, k: int, n: int, layers: int, encoding: str):
    """`layers` weights [K, N] in `encoding` (quantize-on-load's own storage), as device arrays."""
    out = []
    for _ in range(layers):
        w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
        if encoding == "bf16":
            out.append((jnp.asarray(w, jnp.bfloat16), None, None))
            continue
        parts = quantize.quantize_host({"w": w}, {"w": 1}, {"w": quantize.ENCODINGS[encoding]})
        out.append(tuple(jnp.asarray(parts[key]) if key in parts else None for key in ("w", "w_scale", "w_offset")))
    return out


def xla_product(x, v, s, o):
    """graphs.layers.projection's XLA product."""
    if s is None:
        return x @ v
    if s.ndim == 1:
        return (x @ v.astype(x.dtype)) * s.astype(x.dtype)
    return x @ dequantize_grouped(v, s, o, (x.shape[1],), x.dtype)


def reference(x, w) -> np.ndarray:
    """XLA's product in float32 (a bf16 weight converted) of x with one weight (values, scale, offset)."""
    w = [a.astype(jnp.float32) if a is not None and a.dtype == jnp.bfloat16 else a for a in w]
    return np.asarray(jax.jit(xla_product)(x.astype(jnp.float32), *w))


def save(path: str | None, rows: list) -> None:
    """Rewritten after every row: a run stopped by its time limit keeps what it measured."""
    if path:
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=1)


def reduce_product(x, v, s, o):
    """int8 with a scale per output as a multiply and a sum over the inputs."""
    return jnp.sum(x[:, :, None] * v.astype(x.dtype)[None], axis=1) * s.astype(x.dtype)


SWEEP = [(bn, target, warps, stages) for bn in (32, 64, 128) for target in (256, 1024) for warps in (4, 8)
         for stages in (2, 4)] + [None]  # None: the defaults


def sweep(args, gpu: bool) -> None:
    rng = np.random.default_rng(0)
    rows_out = []
    cases = [c for c in SHAPES["1b"] if c[0] in ("gate/up", "down")] if gpu else SHAPES["tiny"]
    for name, k, n in cases:
        for enc in ("int8", "q4_k"):
            stack = weights(rng, k, n, args.layers, enc)
            x = jnp.asarray(rng.standard_normal((args.rows[0], k)), jnp.bfloat16)
            nbytes = sum(a.nbytes for a in stack[0] if a is not None)
            results = []
            for tuning in SWEEP if gpu else SWEEP[:2]:
                f = jax.jit(lambda x, ws, tuning=tuning: [gm.grouped_matmul(x, *w, interpret=not gpu, tuning=tuning)
                                                          for w in ws])
                try:
                    seconds = best_seconds(f, x, stack, repeats=20) / args.layers
                except Exception as e:  # a tiling Triton refuses: say so, go on
                    print(f"{name} {enc} {tuning}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                results.append({"weight": name, "k": k, "n": n, "rows": args.rows[0], "encoding": enc,
                                "tuning": tuning, "us": seconds * 1e6, "gb_s": nbytes / seconds / 1e9})
            results.sort(key=lambda r: r["us"])
            for r in results[:5]:
                print(f"{name:8s} [{k:5d}, {n:5d}] rows {r['rows']:3d} {enc:5s} tuning {str(r['tuning']):22s} "
                      f"{r['us']:8.1f} us {r['gb_s']:7.0f} GB/s", flush=True)
            rows_out += results
            save(args.json, rows_out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["1b", "8b"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--encodings", nargs="+", default=["int8", "q8_0", "q4_k"])
    ap.add_argument("--json")
    ap.add_argument("--sweep", action="store_true", help="time the kernel's tunings instead (module doc)")
    args = ap.parse_args()
    gpu = jax.devices()[0].platform == "gpu"
    if args.sweep:
        return sweep(args, gpu)
    if not gpu:
        args.shapes, args.layers = ["tiny"], 2
    rng = np.random.default_rng(0)
    rows_out = []
    for shape in args.shapes:
        for name, k, n in SHAPES[shape]:
            stacks = {enc: weights(rng, k, n, args.layers, enc) for enc in ["bf16", *args.encodings]}
            for m in args.rows:
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                variants = {"bf16": ("bf16", xla_product)}
                for enc in args.encodings:
                    variants[f"{enc} xla"] = (enc, xla_product)
                    if enc == "int8" and m <= 8:
                        variants[f"{enc} xla-reduce"] = (enc, reduce_product)
                    if gm.supported(stacks[enc][0][0].shape, stacks[enc][0][0].dtype, stacks[enc][0][1].shape, m,
                                    x.dtype):
                        variants[f"{enc} pallas"] = (enc, lambda x, v, s, o: gm.grouped_matmul(
                            x, v, s, o, interpret=not gpu))
                times = {}
                refs = {enc: reference(x, stacks[enc][0]) for enc in ["bf16", *args.encodings]}
                for label, (enc, product) in variants.items():
                    f = jax.jit(lambda x, ws, product=product: [product(x, *w) for w in ws])
                    out = f(x, stacks[enc])
                    ref = refs[enc]
                    err = float(np.abs(np.asarray(out[0], np.float32) - ref).max() / np.abs(ref).max())
                    seconds = best_seconds(f, x, stacks[enc], repeats=20) / args.layers
                    nbytes = sum(a.nbytes for a in stacks[enc][0] if a is not None)
                    times[label] = seconds
                    row = {"shape": shape, "weight": name, "k": k, "n": n, "rows": m, "variant": label,
                           "us": seconds * 1e6, "gb_s": nbytes / seconds / 1e9, "weight_bytes": nbytes,
                           "vs_bf16": times["bf16"] / seconds, "rel_err": err}
                    rows_out.append(row)
                    print(f"{shape:4s} {name:8s} [{k:5d}, {n:5d}] rows {m:3d}  {label:16s} {row['us']:8.1f} us "
                          f"{row['gb_s']:7.0f} GB/s  {row['vs_bf16']:5.2f}x bf16  rel err {err:.1e}", flush=True)
                    save(args.json, rows_out)


if __name__ == "__main__":
    main()
