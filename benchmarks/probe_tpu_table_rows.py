"""Does XLA:TPU copy an embedding table to gather a step's rows from it? Compiled here for a TPU v5e
chip (compile-only; needs libtpu, which `make test` installs in .venv/tpu-site):

    PYTHONPATH=.venv/tpu-site:. .venv/bin/python benchmarks/probe_tpu_table_rows.py [--json out.json]

The rows of 1 and 8 tokens gathered from a Llama-3.1-8B-sized table (128,256 x 4,096) held as bf16,
as int8 [V, D] (a q8_0 table's values), and as those int8 values packed four to an int32 word
[V, D / 4], unpacked after the gather. Prints each executable's temporaries: a copy of the int8
table is 501 MiB of them. The question behind the 506 MiB of decode temporaries that a q8_0
embedding table gave the 8B (README, Library: quantized weights).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from probe_tpu_weight_layout import report  # noqa: E402  (this folder, on the path as the script's own)
from maxlike.engine.mesh import target_devices  # noqa: E402

V, D = 128256, 4096
TABLES = {  # name -> (stored shape and dtype, the rows of `tokens` [B, 1] as bf16 [B, 1, D])
    "bf16 [V, D]": (((V, D), jnp.bfloat16), lambda table, tokens: table[tokens]),
    "int8 [V, D]": (((V, D), jnp.int8), lambda table, tokens: table[tokens].astype(jnp.bfloat16)),
    "int32 [V, D/4]": (((V, D // 4), jnp.int32), lambda table, tokens: jax.lax.bitcast_convert_type(
        table[tokens], jnp.int8).reshape(*tokens.shape, D).astype(jnp.bfloat16)),
}


def compile_rows(name: str, rows: int, device) -> dict:
    (shape, dtype), rows_of = TABLES[name]
    on = jax.sharding.SingleDeviceSharding(device)
    args = (jax.ShapeDtypeStruct(shape, dtype, sharding=on), jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=on))
    compiled = jax.jit(rows_of).lower(*args).compile()
    return {"table": name, "tokens": rows, "temp_mib": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    device = target_devices("tpu:v5e:2x2")[0]
    report((compile_rows(name, rows, device) for name in TABLES for rows in (1, 8)), args.json)


if __name__ == "__main__":
    main()
