"""Where a batch-1 decode step's time goes on an accelerator (a probe, not a benchmark).

    python benchmarks/probe_gpu_step.py [--shape llama-1b]

Batch-1 decode tokens/s (10 steps per call) with a small and a large KV pool
(a step that copies the pool slows down with its size), layers unrolled and as
one loop over stacked weights (scan_layers: the GPU default is chosen by this
figure, still to be measured), the pool-shaped copies
XLA left in the compiled decode loop, and variants of the KV write and of the
attention gather, each in the same process on the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import graphs.base  # noqa: E402
import graphs.llama  # noqa: E402
from graphs.attention import write_kv  # noqa: E402
from bench_gpu_decode import build_model  # noqa: E402
from maxlike.entrypoints.bench import maxlike_generate, measure  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402


def write_kv_plain(pages, new, slots, layer=0, *, backend="gpu"):
    """The KV write without the extra null-slot write (that one only helps XLA:CPU); one replica."""
    _, l, n, s, kv, d = pages.shape
    flat = pages[0].reshape(l * n * s, kv, d).at[slots.reshape(-1) + layer * n * s].set(
        new.reshape(-1, kv, d).astype(pages.dtype), mode="promise_in_bounds")
    return flat.reshape(l, n, s, kv, d)[None]


def write_kv_bits(pages, new, slots, layer=0, *, backend="gpu"):
    """The KV write as a scatter of the values' bits (uint16 for bf16): integer scatters are never
    widened to f32, which XLA:CPU does to a bf16 scatter (converting the whole pool twice)."""
    if pages.dtype.itemsize != 2:
        return write_kv(pages, new, slots, layer, backend=backend)
    bits = jax.lax.bitcast_convert_type(pages, jnp.uint16)
    new_bits = jax.lax.bitcast_convert_type(new.astype(pages.dtype), jnp.uint16)
    return jax.lax.bitcast_convert_type(write_kv(bits, new_bits, slots, layer, backend=backend), pages.dtype)


def pool_copies(llm) -> int:
    kv = llm.pipeline.model.kv_manager
    shape = "[" + ",".join(str(n) for n in kv.pool[0][0].shape) + "]"
    n = 0
    for exe in llm.pipeline.model.session.executables("decode_loop"):
        n += sum(1 for line in exe.as_text().splitlines()
                 if shape in line and any(op in line for op in (" copy(", "copy-start(", " convert(")))
    return n


def weight_copies(llm) -> int:
    """Copies in the decode loop whose result has the shape of one layer's slice of a stacked
    weight (scan_layers): the slice copied out rather than read in place."""
    params = llm.pipeline.model.params
    shapes = {"[" + ",".join(str(n) for n in w.shape[1:]) + "]" for name, w in params.items()
              if getattr(w, "ndim", 0) >= 2 and "layers." in name and not any(ch.isdigit() for ch in name)}
    n = 0
    for exe in llm.pipeline.model.session.executables("decode_loop"):
        for line in exe.as_text().splitlines():
            lhs = line.split("=", 1)[-1].strip().split(" ", 1)[0] if "=" in line else ""
            if any(op in line for op in (" copy(", "copy-start(")) and any(lhs.endswith(sh) or sh + "{" in lhs
                                                                         for sh in shapes):
                n += 1
    return n


def run(path, label, new_tokens, dtype, batch=1, unroll=1, **config) -> dict:
    graphs.base.SCAN_UNROLL = unroll  # read at trace time; the executable cache is off for these runs
    cfg = PipelineConfig(model_path=path, max_length=1024, dtype=dtype, kv_cache_page_size=128,
                         max_num_steps=10, executable_cache=False, **config)
    llm, gen = maxlike_generate(cfg)
    m = measure(gen, batch, 64, new_tokens, llm.pipeline.model.config.vocab_size, repeats=2)
    kv = llm.pipeline.model.kv_manager
    row = dict(label=label, batch=batch, dtype=dtype, pool_pages=kv.num_pages, decode_tok_s=m["decode_tok_s"],
               pool_copies=pool_copies(llm), weight_copies=weight_copies(llm))
    print(f"{label:40s} batch {batch:2d}, pool {kv.num_pages:4d} pages ({dtype}): decode {m['decode_tok_s']:8.1f} tok/s "
          f"({1000 / m['decode_tok_s']:.2f} ms/step); pool-sized copies in the loop: {row['pool_copies']}, "
          f"layer-weight copies: {row['weight_copies']}", flush=True)
    del llm
    graphs.base.SCAN_UNROLL = 1
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    ap.add_argument("--groups", nargs="+", choices=["layers", "kv-write"], default=["layers", "kv-write"],
                    help="layers: unrolled vs scan (--unrolls) at --batches; kv-write: KV write variants")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--unrolls", type=int, nargs="+", default=[1, 2, 4], help="scan unroll factors to try")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as path:
        build_model(args.shape, path, "cpu" if jax.default_backend() == "cpu" else "cuda")
        for dtype in args.dtypes:
            graphs.llama.write_kv = write_kv
            if "layers" in args.groups:
                for batch in args.batches:
                    rows.append(run(path, "layers unrolled", args.new_tokens, dtype, batch, max_batch_size=batch,
                                    scan_layers=False))
                    for unroll in args.unrolls:
                        rows.append(run(path, f"layers as one scan, unroll {unroll}", args.new_tokens, dtype, batch,
                                        unroll, max_batch_size=batch, scan_layers=True))
            if "kv-write" in args.groups:
                rows.append(run(path, "as built, large pool", args.new_tokens, dtype, max_batch_size=64))
                graphs.llama.write_kv = write_kv_plain
                rows.append(run(path, "plain KV write, large pool", args.new_tokens, dtype, max_batch_size=64))
                rows.append(run(path, "plain KV write, small pool", args.new_tokens, dtype, max_batch_size=1))
                if dtype != "float32":
                    graphs.llama.write_kv = write_kv_bits
                    rows.append(run(path, "KV write as bits, large pool", args.new_tokens, dtype, max_batch_size=64))
                    rows.append(run(path, "KV write as bits, small pool", args.new_tokens, dtype, max_batch_size=1))
                graphs.llama.write_kv = write_kv
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "shape": args.shape,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
