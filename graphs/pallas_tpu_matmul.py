"""The product of an input with a 4-bit grouped weight (q4_k, q4_0: maxlike.weights.quantize) as a
Pallas TPU (Mosaic) kernel that dequantizes each tile in VMEM.

XLA:TPU builds a grouped weight's dequantized copy in HBM before its matmul (63-112 MiB for an 8B
MLP projection: benchmarks/probe_tpu_dequant_fusion.py), so a decode step would read the packed
weight, write the float one and read it again. This kernel reads the packed weight once.

The weight is stored [K / 2, N] uint8 (per group of 32 inputs, value j in the low nibble of
byte j and value j + 16 in the high nibble), scale and offset [K / 32, N] float16.
The input x [M, K] is split outside the kernel into the inputs of the low and of the high
nibbles, so each packed row meets its input without a reshape of the weight; in VMEM each group's
scale is repeated over its 16 rows. Mosaic for a v5e loads no float16 ("Invalid vector type for
load"): scales travel as their uint16 bit patterns and are decoded by hand. A model stores them
so (maxlike.pipelines.layout.quantized_matmul): XLA:TPU converted a float16 stack to uint16 in a
buffer, the whole stack in every layer of the loop, rather than as a bitcast.

The weight can be a stack of layers ([L, K / 2, N]), read at layer `layer` (scalar prefetch):
under the layer loop (graphs.base.run_layers) the kernel takes the whole stack, since a custom
call handed one layer's slice would get a copy of it.

Weights with one output axis only (o, gate, up, down). Those with several (q [K, H, D], the fused
qkv and gate_up of graphs.fused) stay with XLA: Mosaic refuses a block that squeezes the
second-minor axis, and taking them as [K / 2, H * D] would cost a relayout copy, since XLA:TPU
tiles their two minor axes (and moves a small one, gate_up's 2, out of them) in HBM.

`graphs.layers.dequantize_grouped` followed by XLA's matmul is the reference the tests compare
this with (Pallas's TPU interpret mode on CPU); the tests that compile for a TPU slice compile it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

GROUP = 32  # inputs a scale (and offset) serves
_TILE_K, _TILE_N = 512, 512  # inputs and outputs a grid step covers (K / 32 = 16 scale rows: uint16's sublane tile)
_TILE_M = 512  # rows (tokens) a grid step covers: a 2,048-token prefill in one block overflowed a v5e's 16 MiB of VMEM
_MAX_WHOLE = 4096  # an axis not divisible by its tile is taken whole up to this size


def _tile(size: int, tile: int, step: int) -> int | None:
    """The tile of an axis of `size`: `tile` or a smaller multiple of `step` dividing it, else the
    whole axis when it is small enough; None when neither fits."""
    for t in range(tile, step - 1, -step):
        if size % t == 0:
            return t
    return size if size <= _MAX_WHOLE else None


def supported(values_shape: tuple, values_dtype, scale_shape: tuple, stacked: bool = False) -> bool:
    """Whether `grouped_matmul` takes this weight: 4-bit values in groups of 32 (16 bytes a scale),
    one output axis, and an input and an output axis the tiles can cover. `stacked`: a leading
    layer axis."""
    lead = 1 if stacked else 0
    if jnp.dtype(values_dtype) != jnp.uint8 or len(values_shape) != lead + 2 or len(scale_shape) != lead + 2:
        return False
    packed, groups = values_shape[lead], scale_shape[lead]
    if packed != groups * GROUP // 2:
        return False
    return _tile(packed * 2, _TILE_K, 512) is not None and _tile(values_shape[-1], _TILE_N, 128) is not None


def _float16(bits):
    """float16 bit patterns (uint16) -> float32 (normal and subnormal values; no inf or NaN)."""
    b = bits.astype(jnp.int32)
    sign = jnp.where(b >= 1 << 15, -1.0, 1.0).astype(jnp.float32)
    exponent, mantissa = (b >> 10) & 31, (b & 1023).astype(jnp.float32)
    normal = (1.0 + mantissa / 1024) * jnp.exp2((exponent - 15).astype(jnp.float32))
    return sign * jnp.where(exponent == 0, mantissa * 2.0**-24, normal)


def _kernel(layer_ref, x_low, x_high, values, scale, *rest, steps: int, has_offset: bool):
    # layer_ref (SMEM) is read by the index maps. Blocks: x_low, x_high [tm, tk / 2]; values
    # [tk / 2, tn] uint8; scale (offset) [tk / 32, tn] uint16; the output [tm, tn]; the float32
    # accumulator [tm, tn] (scratch).
    del layer_ref
    offset = rest[0] if has_offset else None
    y, acc = rest[-2:]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc[...] = jnp.zeros_like(acc)

    v = values[...].astype(jnp.int32)
    rows, tn = v.shape

    def per_row(a):  # [tk / 32, tn] -> [tk / 2, tn], each group's value on its 16 rows
        return jnp.broadcast_to(_float16(a)[:, None, :], (rows // 16, 16, tn)).reshape(rows, tn)

    s = per_row(scale[...])
    o = per_row(offset[...]) if offset is not None else 0.0
    low = (((v & 15) - 8).astype(jnp.float32) * s + o).astype(x_low.dtype)
    high = (((v >> 4) - 8).astype(jnp.float32) * s + o).astype(x_low.dtype)
    acc[...] += (jnp.dot(x_low[...], low, preferred_element_type=jnp.float32)
                 + jnp.dot(x_high[...], high, preferred_element_type=jnp.float32))

    @pl.when(k == steps - 1)
    def _():
        y[...] = acc[...].astype(y.dtype)


def grouped_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, offset: jax.Array | None = None,
                   layer=None, *, interpret: bool = False) -> jax.Array:
    """x [M, K] @ the 4-bit grouped weight -> [M, N] in x's dtype.

    values [K / 2, N] uint8, scale (offset) [K / 32, N] float16 or its bit patterns as uint16 (what
    a model stores for the weights this kernel takes: XLA:TPU converts a float16 stack to uint16
    in a buffer, not as a bitcast); or, with `layer` (an int32 scalar), stacks [L, K / 2, N] and
    [L, K / 32, N] of which layer `layer` is read. Shapes must pass `supported`; `interpret` runs
    Pallas's TPU interpret mode (off the TPU)."""
    if layer is None:
        values, scale = values[None], scale[None]
        offset = None if offset is None else offset[None]
        layer = 0
    m, k = x.shape
    n = values.shape[-1]
    tk, tn = _tile(k, _TILE_K, 512), _tile(n, _TILE_N, 128)
    tm = min(_TILE_M, max(8, -(-m // 8) * 8))  # rows a grid step covers (sublanes: a multiple of 8)
    rows = -(-m // tm) * tm
    halves = jnp.pad(x, ((0, rows - m), (0, 0))).reshape(rows, k // GROUP, 2, GROUP // 2)
    x_low, x_high = (halves[:, :, i].reshape(rows, k // 2) for i in (0, 1))
    bits = [a if a.dtype == jnp.uint16 else jax.lax.bitcast_convert_type(a, jnp.uint16)
            for a in (scale, offset) if a is not None]
    # Grid (m / tm, n / tn, k / tk); index maps get (r, j, i, the prefetched layer).
    inputs = pl.BlockSpec((tm, tk // 2), lambda r, j, i, layer: (r, i))
    weight = pl.BlockSpec((None, tk // 2, tn), lambda r, j, i, layer: (layer[0], i, j))
    per_group = pl.BlockSpec((None, tk // GROUP, tn), lambda r, j, i, layer: (layer[0], i, j))
    y = pl.pallas_call(
        functools.partial(_kernel, steps=k // tk, has_offset=offset is not None),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(rows // tm, n // tn, k // tk),
            in_specs=[inputs, inputs, weight] + [per_group] * len(bits),
            out_specs=pl.BlockSpec((tm, tn), lambda r, j, i, layer: (r, j)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="grouped_matmul_tpu",
    )(jnp.asarray(layer, jnp.int32).reshape(1), x_low, x_high, values, *bits)
    return y[:m]
