"""Does XLA:TPU dequantize a quantized weight inside the matmul, or into a buffer first? Compiled
here for a TPU v5e chip (compile-only; needs libtpu, which `make test` installs in .venv/tpu-site):

    PYTHONPATH=.venv/tpu-site:. .venv/bin/python benchmarks/probe_tpu_dequant_fusion.py [--json out.json]

One projection of a Llama-3.1-8B MLP (x [B, 4096] bf16 times a [4096, 14336] weight), through
maxlike's own projection (`graphs.layers.projection`), per encoding, at batch 1 and 8. Prints the
executable's temporaries: a buffer of the whole dequantized bf16 weight is 112 MiB of them, and
means the step writes and reads that weight again besides reading the stored one.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from graphs.base import WeightSpec  # noqa: E402
from graphs.layers import projection  # noqa: E402
from maxlike.engine.mesh import target_devices  # noqa: E402
from maxlike.weights import quantize  # noqa: E402
from probe_tpu_weight_layout import report  # noqa: E402  (benchmarks/: this script's folder)

D, F = 4096, 14336


def compile_one(encoding: str, batch: int, device) -> dict:
    """Temporaries and fusions of x @ w with w stored in `encoding` ("bfloat16": unquantized)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    specs = {"layers.0.up": WeightSpec((D, F), ("embed", "mlp"))}
    encs = {} if encoding == "bfloat16" else {"up": quantize.ENCODINGS[encoding]}
    if encs:
        specs = quantize.quantized_specs(specs, {"layers.0.up": 1}, encs)
    weights = {name.split(".")[-1]: jax.ShapeDtypeStruct(spec.shape, quantize.dtype_of(name, encs, jnp.bfloat16),
                                                         sharding=sharding) for name, spec in specs.items()}
    x = jax.ShapeDtypeStruct((batch, 1, D), jnp.bfloat16, sharding=sharding)
    compiled = jax.jit(lambda x, lw: projection(None)("btd,df->btf", x, lw, "up")).trace(x, weights).lower().compile()
    memory, hlo = compiled.memory_analysis(), compiled.as_text()
    stored = sum(np.prod(w.shape) * np.dtype(w.dtype).itemsize for w in weights.values())
    return {"encoding": encoding, "batch": batch, "weight_mib": round(stored / 2**20, 1),
            "temp_mib": round(memory.temp_size_in_bytes / 2**20, 1), "fusions": hlo.count(" fusion(")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encodings", nargs="+", default=["bfloat16", "int8", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k"])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    device = target_devices("tpu:v5e:2x2")[0]
    report((compile_one(encoding, batch, device) for encoding in args.encodings for batch in (1, 8)), args.json)


if __name__ == "__main__":
    main()
