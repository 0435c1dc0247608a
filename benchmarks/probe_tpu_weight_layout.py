"""Which q-projection weight layouts does XLA:TPU copy before a decode loop? Compiled here for a
TPU v5e chip (compile-only; needs libtpu, which `make test` installs in .venv/tpu-site):

    PYTHONPATH=.venv/tpu-site:. .venv/bin/python benchmarks/probe_tpu_weight_layout.py [--json out.json]

A 10-step loop over 4 layers of a Llama-3.1-8B-wide q projection (D 4096, 32 heads of 128), its
weights stored [layer, D, heads, head dim] (maxlike's layout), [layer, D, heads x head dim] or
[layer, heads, D, head dim], in bf16 and int8 (per-channel scales), at batch 1, 2 and 8, with the
output scaled per head before it is flattened or after. Prints the executable's temporaries: a
copy of the whole bf16 stack is 128 MiB of them. The question behind the README's "780 MiB of
the batch-2+ decode loops" (Quantized weights on one TPU chip).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from maxlike.engine.mesh import target_devices  # noqa: E402

LAYERS, D, HEADS, HEAD_DIM = 4, 4096, 32, 128
LAYOUTS = {  # name -> (stored shape of the stack, the projection of x [B, D] by one layer's weight)
    "D,H,K": ((LAYERS, D, HEADS, HEAD_DIM), lambda x, w: jnp.einsum("bd,dhk->bhk", x, w)),
    "D,HK": ((LAYERS, D, HEADS * HEAD_DIM), lambda x, w: x @ w),
    "H,D,K": ((LAYERS, HEADS, D, HEAD_DIM), lambda x, w: jnp.einsum("bd,hdk->bhk", x, w)),
}


def compile_loop(layout: str, consumer: str, dtype, batch: int, device) -> dict:
    """consumer "per_head": the output [B, H, K] is scaled per (head, dim), then flattened (as
    maxlike's projection and attention use it); "flat": flattened to [B, H*K] first, then scaled."""
    shape, project = LAYOUTS[layout]

    def loop(x, ws, scales):
        def step(_, x):
            def layer(x, i):
                y = project(x, ws[i].astype(x.dtype))
                if consumer == "per_head":
                    y = (y.reshape(x.shape[0], HEADS, HEAD_DIM) * scales[i].reshape(HEADS, HEAD_DIM).astype(x.dtype))
                y = y.reshape(x.shape[0], -1)
                if consumer == "flat":
                    y = y * scales[i].astype(x.dtype)
                return x + 1e-3 * y, None

            return jax.lax.scan(layer, x, jnp.arange(LAYERS))[0]

        return jax.lax.fori_loop(0, 10, step, x)

    on = jax.sharding.SingleDeviceSharding(device)
    args = (jax.ShapeDtypeStruct((batch, D), jnp.bfloat16, sharding=on),
            jax.ShapeDtypeStruct(shape, dtype, sharding=on),
            jax.ShapeDtypeStruct((LAYERS, HEADS * HEAD_DIM), jnp.float32, sharding=on))
    compiled = jax.jit(loop).lower(*args).compile()
    return {"layout": layout, "consumer": consumer, "dtype": jnp.dtype(dtype).name, "batch": batch,
            "temp_mib": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    device = target_devices("tpu:v5e:2x2")[0]
    report((compile_loop(layout, consumer, dtype, batch, device) for dtype in (jnp.bfloat16, jnp.int8)
            for consumer in ("per_head", "flat") for layout in LAYOUTS for batch in (1, 2, 8)), args.json)


def report(rows, path: str | None) -> list[dict]:
    """Print each row (a dict) as JSON as it comes, then write them all to `path` (if given)."""
    done = []
    for row in rows:
        done.append(row)
        print(json.dumps(row), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(done, f, indent=1)
    return done


if __name__ == "__main__":
    main()
