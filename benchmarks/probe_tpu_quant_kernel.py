"""Can a Pallas (Mosaic) kernel dequantize 4-bit grouped weights in VMEM, where XLA:TPU builds them
in HBM (benchmarks/probe_tpu_dequant_fusion.py)? A feasibility probe, not maxlike's code path:

    .venv/bin/python benchmarks/probe_tpu_quant_kernel.py --check       # interpret mode, against numpy
    PYTHONPATH=.venv/tpu-site:. .venv/bin/python benchmarks/probe_tpu_quant_kernel.py   # compiled for a v5e

y = x @ w for w stored as maxlike's q4_k ([K / 2, N] uint8, two 4-bit values a byte; a float16
scale and offset per 32 inputs, maxlike.weights.quantize). The input is split outside the kernel
into the values of the low and the high nibbles (x is small), so each packed row meets its inputs
without a reshape of the weights; each tile's scales are repeated over their 16 rows in VMEM.
Mosaic on a v5e loads no float16 ("Invalid vector type for load"), so the scales travel as their
uint16 bit patterns (a free bitcast) and are decoded to float32 by hand (finite values only).
Prints, per batch, the compiled product's temporaries: XLA's own dequantization of this weight
(Llama-3.1-8B's MLP, 4096 x 14336) left 63-112 MiB of them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402

from graphs.layers import dequantize_grouped  # noqa: E402

GROUP = 32


def _float16(bits):
    """float16 bit patterns (uint16) -> float32 (normal and subnormal values; no inf or NaN)."""
    b = bits.astype(jnp.int32)
    sign = jnp.where(b >= 1 << 15, -1.0, 1.0).astype(jnp.float32)
    exponent, mantissa = (b >> 10) & 31, (b & 1023).astype(jnp.float32)
    normal = (1.0 + mantissa / 1024) * jnp.exp2((exponent - 15).astype(jnp.float32))
    return sign * jnp.where(exponent == 0, mantissa * 2.0**-24, normal)


def _kernel(x_low, x_high, values, scale, offset, y, acc, *, steps):
    k = pl.program_id(1)

    @pl.when(k == 0)
    def _():
        acc[...] = jnp.zeros_like(acc)

    v = values[...].astype(jnp.int32)  # [tk / 2, tn]: each group's 16 bytes
    rows, tn = v.shape

    def per_row(a):  # [tk / 32, tn] -> [tk / 2, tn], each group's value on its 16 rows
        return jnp.broadcast_to(_float16(a)[:, None, :], (rows // 16, 16, tn)).reshape(rows, tn)

    s, o = per_row(scale[...]), per_row(offset[...])
    low = (((v & 15) - 8).astype(jnp.float32) * s + o).astype(x_low.dtype)
    high = (((v >> 4) - 8).astype(jnp.float32) * s + o).astype(x_low.dtype)
    acc[...] += (jnp.dot(x_low[...], low, preferred_element_type=jnp.float32)
                 + jnp.dot(x_high[...], high, preferred_element_type=jnp.float32))

    @pl.when(k == steps - 1)
    def _():
        y[...] = acc[...].astype(y.dtype)


def q4_matmul(x, values, scale, offset, *, tk: int = 512, tn: int = 512, interpret: bool = False):
    """x [M, K] @ the q4_k weight (values [K / 2, N] uint8, scale and offset [K / 32, N] float16)."""
    m, k = x.shape
    n = values.shape[1]
    rows = max(8, -(-m // 8) * 8)  # sublanes
    halves = jnp.pad(x, ((0, rows - m), (0, 0))).reshape(rows, k // GROUP, 2, GROUP // 2)
    x_low, x_high = (halves[:, :, i].reshape(rows, k // 2) for i in (0, 1))
    bits = [jax.lax.bitcast_convert_type(a, jnp.uint16) for a in (scale, offset)]
    inputs = pl.BlockSpec((rows, tk // 2), lambda j, i: (0, i))
    per_group = pl.BlockSpec((tk // GROUP, tn), lambda j, i: (i, j))
    y = pl.pallas_call(
        functools.partial(_kernel, steps=k // tk), grid=(n // tn, k // tk),
        in_specs=[inputs, inputs, pl.BlockSpec((tk // 2, tn), lambda j, i: (i, j)), per_group, per_group],
        out_specs=pl.BlockSpec((rows, tn), lambda j, i: (0, j)),
        out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
        scratch_shapes=[pltpu.VMEM((rows, tn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(x_low, x_high, values, *bits)
    return y[:m]


def check() -> dict:
    """Interpret mode against graphs.layers.dequantize_grouped's weight, float32."""
    rng = np.random.default_rng(0)
    k, n, m = 1024, 1024, 3
    q = rng.integers(-8, 8, size=(k, n))
    g = (q + 8).reshape(k // GROUP, GROUP, n).astype(np.uint8)
    values = (g[:, :16] | (g[:, 16:] << 4)).reshape(k // 2, n)
    scale = (rng.random((k // GROUP, n)) * 0.1).astype(np.float16)
    offset = (rng.normal(size=(k // GROUP, n)) * 0.01).astype(np.float16)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = np.asarray(dequantize_grouped(jnp.asarray(values), jnp.asarray(scale), jnp.asarray(offset), (k,), jnp.float32))
    y = np.asarray(q4_matmul(jnp.asarray(x), jnp.asarray(values), jnp.asarray(scale), jnp.asarray(offset),
                             interpret=True))
    return {"max_abs_error": float(np.abs(y - x @ w).max()), "max_abs_output": float(np.abs(x @ w).max())}


def compiled_for_v5e() -> list[dict]:
    from maxlike.engine.mesh import target_devices

    sharding = jax.sharding.SingleDeviceSharding(target_devices("tpu:v5e:2x2")[0])
    k, n = 4096, 14336
    rows = []
    for batch in (1, 8):
        args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in (
            ((batch, k), jnp.bfloat16), ((k // 2, n), jnp.uint8), ((k // GROUP, n), jnp.float16),
            ((k // GROUP, n), jnp.float16))]
        compiled = jax.jit(q4_matmul).trace(*args).lower().compile()
        rows.append({"batch": batch, "temp_mib": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 2),
                     "mosaic_kernel": "tpu_custom_call" in compiled.as_text()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="interpret mode on this CPU, against numpy")
    print(json.dumps(check()) if ap.parse_args().check else compiled_for_v5e())
