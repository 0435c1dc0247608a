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
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import graphs.llama  # noqa: E402
from graphs.layers import write_kv  # noqa: E402
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


def run(path, label, new_tokens, dtype, **config) -> None:
    cfg = PipelineConfig(model_path=path, max_length=1024, dtype=dtype, kv_cache_page_size=128,
                         max_num_steps=10, **config)
    llm, gen = maxlike_generate(cfg)
    m = measure(gen, 1, 64, new_tokens, llm.pipeline.model.config.vocab_size, repeats=2)
    kv = llm.pipeline.model.kv_manager
    print(f"{label:40s} pool {kv.num_pages:4d} pages ({dtype}): batch-1 decode {m['decode_tok_s']:7.1f} tok/s "
          f"({1000 / m['decode_tok_s']:.2f} ms/token); pool-sized copies/converts in the loop: {pool_copies(llm)}", flush=True)
    del llm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    with tempfile.TemporaryDirectory() as path:
        build_model(args.shape, path, "cpu" if jax.default_backend() == "cpu" else "cuda")
        for dtype in args.dtypes:
            graphs.llama.write_kv = write_kv
            run(path, "as built, small pool", args.new_tokens, dtype, max_batch_size=1)
            run(path, "layers as one loop (scan), small pool", args.new_tokens, dtype, max_batch_size=1,
                scan_layers=True)
            run(path, "as built, large pool", args.new_tokens, dtype, max_batch_size=64)
            graphs.llama.write_kv = write_kv_plain
            run(path, "plain KV write, large pool", args.new_tokens, dtype, max_batch_size=64)
            run(path, "plain KV write, small pool", args.new_tokens, dtype, max_batch_size=1)
            if dtype != "float32":
                graphs.llama.write_kv = write_kv_bits
                run(path, "KV write as bits, large pool", args.new_tokens, dtype, max_batch_size=64)
                run(path, "KV write as bits, small pool", args.new_tokens, dtype, max_batch_size=1)


if __name__ == "__main__":
    main()
