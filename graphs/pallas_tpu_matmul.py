"""The product of an input with a 4-, 5-, 6- or 8-bit grouped weight (q4_k, q4_0, q5_k, q6_k, q8_0:
maxlike.weights.quantize) as a Pallas TPU (Mosaic) kernel that dequantizes each tile in VMEM.

XLA:TPU builds a grouped weight's dequantized copy in HBM before its matmul (63-119 MiB for an 8B
MLP projection: benchmarks/probe_tpu_dequant_fusion.py), so a decode step would read the packed
weight, write the float one and read it again. This kernel reads the packed weight once.

A 4-bit weight is stored [K / 2, N] uint8 (per group of 32 inputs, value j in the low nibble of
byte j and value j + 16 in the high nibble), scale and offset [K / 32, N] float16. The input
x [M, K] is split outside the kernel into the inputs of the low and of the high nibbles, so each
packed row meets its input without a reshape of the weight; in VMEM each group's scale is
repeated over its rows. Mosaic for a v5e loads no float16 ("Invalid vector type for load"):
scales travel as their uint16 bit patterns and are decoded by hand. A model stores them so
(maxlike.pipelines.layout.quantized_matmul): XLA:TPU converted a float16 stack to uint16 in a
buffer, the whole stack in every layer of the loop, rather than as a bitcast.

5 and 6 bits (groups of 32 and 16) add the top bits of each value. maxlike.weights.quantize
keeps them in 4 bytes after each group's nibbles; a model that runs this kernel holds those
weights in `kernel_layout` instead (same size): all the nibble rows, then the top bits, laid so
that stacking shifted copies of a tile's top-bit rows lines them up with its nibble rows. The
products are then the 4-bit kernel's, with wider values. 8 bits (q8_0: int8 [K, N], a scale per
32 inputs) need no split of the input.

The weight can be a stack of layers ([L, ...]), read at layer `layer` (scalar prefetch):
under the layer loop (graphs.base.run_layers) the kernel takes the whole stack, since a custom
call handed one layer's slice would get a copy of it.

Weights with one output axis (o, gate, up, down), tiled over it, or two ([heads, head dim]: q,
k, v with heads of 128), whose heads a step takes whole: a block of some heads is misaligned for
8-bit tiles, and one squeezing the heads axis is refused. In VMEM the tile is read as [rows,
heads x head dim]; viewing the weight so in HBM instead would be a relayout copy, since XLA:TPU
tiles its two minor axes. Such steps cover fewer inputs (256) and rows (the float32 accumulator
stays within 2 MiB): a 512-row step of 4,096 outputs ran out of the v5e's VMEM. The fused qkv
and gate_up (graphs.fused: three or two-by-N outputs) stay with XLA.

`graphs.layers.dequantize_grouped` followed by XLA's matmul is the reference the tests compare
this with (Pallas's TPU interpret mode on CPU); the tests that compile for a TPU slice compile it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# (values' dtype, bytes a scale serves) -> (bits, inputs a scale serves): q4_k and q4_0, q5_k, q6_k, q8_0
FORMS = {("uint8", 16): (4, 32), ("uint8", 20): (5, 32), ("uint8", 12): (6, 16), ("int8", 32): (8, 32)}
_SPAN = 8  # top-bit rows a block of the kernel's 5/6-bit layout holds (kernel_layout)
_TILE_K, _TILE_N = 512, 512  # inputs and outputs a grid step covers (K / 32 = 16 scale rows: uint16's sublane tile)
_TILE_K_HEADS = 256  # inputs a grid step covers for [heads, head dim] outputs, taken whole (up to _MAX_WHOLE of them)
_TILE_M = 512  # rows (tokens) a grid step covers: a 2,048-token prefill in one block overflowed a v5e's 16 MiB of VMEM
_MAX_WHOLE = 4096  # an axis not divisible by its tile is taken whole up to this size
_TILE_ROWS_X_OUT = 1 << 19  # rows x outputs a grid step covers at most (the float32 accumulator: 2 MiB)


def _tile(size: int, tile: int, step: int) -> int | None:
    """The tile of an axis of `size`: `tile` or a smaller multiple of `step` dividing it, else the
    whole axis when it is small enough; None when neither fits."""
    for t in range(tile, step - 1, -step):
        if size % t == 0:
            return t
    return size if size <= _MAX_WHOLE else None


def form(values_shape: tuple, values_dtype, scale_shape: tuple, lead: int = 0) -> tuple[int, int] | None:
    """(bits, group) of a grouped weight [*lead, packed, *out] with scales [*lead, groups, *out],
    from its dtype and bytes per scale (FORMS); None when it is no form the kernel reads."""
    packed, groups = values_shape[lead], scale_shape[lead]
    if not groups or packed % groups:
        return None
    return FORMS.get((jnp.dtype(values_dtype).name, packed // groups))


def _spread(bits: int) -> int:
    """Nibble rows one top-bit row serves (5 bits: 4, 6 bits: 2)."""
    return 4 // (bits - 4)


def supported(values_shape: tuple, values_dtype, scale_shape: tuple, stacked: bool = False) -> bool:
    """Whether `grouped_matmul` takes this weight: 4-bit values in groups of 32 (q4_k, q4_0),
    5-bit in groups of 32 (q5_k), 6-bit in groups of 16 (q6_k) or 8-bit in groups of 32 (q8_0);
    one output axis, or two ([heads, head dim]: q, k, v) taken whole; and an input and an output
    axis the tiles can cover. `stacked`: a leading layer axis."""
    lead = 1 if stacked else 0
    out = values_shape[lead + 1:]
    if len(out) not in (1, 2) or len(scale_shape) != len(values_shape):
        return False
    bits_group = form(values_shape, values_dtype, scale_shape, lead)
    if bits_group is None:
        return False
    bits, group = bits_group
    tk = _tiles(scale_shape[lead] * group, out)[0]
    if tk is None or (4 < bits < 8 and (tk // 2) % (_spread(bits) * _SPAN)):
        return False
    if len(out) == 2:  # Mosaic takes the heads whole (a block of some of them is misaligned for 8-bit tiles)
        return out[-1] % 128 == 0 and out[0] * out[1] <= _MAX_WHOLE
    return _tile(out[0], _TILE_N, 128) is not None


def _tiles(k: int, out: tuple) -> tuple[int | None, int | None]:
    """(inputs, outputs) a grid step covers: for [heads, head dim] outputs all of them, with fewer
    inputs (the dequantized tile stays within VMEM)."""
    if len(out) == 2:
        return _tile(k, _TILE_K_HEADS, 256), out[0] * out[1]
    return _tile(k, _TILE_K, 512), _tile(out[0], _TILE_N, 128)


def kernel_layout(values: np.ndarray, bits: int, group: int, parts: int = 1, out_axes: int = 1) -> np.ndarray:
    """A 5- or 6-bit weight packed as maxlike.weights.quantize stores it ([*lead, K * bits / 8, N]:
    per group its nibble bytes, then 4 bytes of top bits) -> as `grouped_matmul` reads it, the
    same size: the nibble bytes of all groups (the 4-bit kernel's rows), then the top bits laid
    along them. Top-bit row b of block c holds, for h < spread (`_spread`), the top bits of
    nibble row (c * spread + h) * 8 + b: its low value's at bit 2 * (bits - 4) * h, its high
    value's just above. A tile rebuilds them by stacking shifted copies (no shuffle of rows).
    `parts`: the weight's inputs split into that many runs (a device's share each under a mesh),
    each laid out on its own. `out_axes`: the output axes after the packed one (2 for [heads, head
    dim]). 4- and 8-bit weights come back as they are."""
    if not 4 < bits < 8:
        return values
    shape = values.shape
    values = values.reshape(*shape[:-out_axes], -1)
    *lead, packed, n = values.shape
    extra, spread, half = bits - 4, _spread(bits), group // 2
    g = values.reshape(*lead, parts, -1, group * bits // 8, n)
    nibbles, top = g[..., :half, :], g[..., half:, :].astype(np.int32)
    j = np.arange(group)
    each = (top[..., j % 4, :] >> (extra * (j // 4))[:, None]) & ((1 << extra) - 1)  # [..., groups, group, n]
    rows = g.shape[-3] * half
    low, high = (each[..., s, :].reshape(*lead, parts, rows // (spread * _SPAN), spread, _SPAN, n)
                 for s in (slice(0, half), slice(half, group)))
    shifts = (2 * extra * np.arange(spread))[:, None, None]
    planes = ((low << shifts) | (high << (shifts + extra))).sum(axis=-3)  # [..., blocks, _SPAN, n]
    out = np.concatenate([nibbles.reshape(*lead, parts, rows, n), planes.reshape(*lead, parts, rows // spread, n)],
                         axis=-2)
    return out.reshape(shape).astype(np.uint8)


def _float16(bits):
    """float16 bit patterns (uint16) -> float32 (normal and subnormal values; no inf or NaN)."""
    b = bits.astype(jnp.int32)
    sign = jnp.where(b >= 1 << 15, -1.0, 1.0).astype(jnp.float32)
    exponent, mantissa = (b >> 10) & 31, (b & 1023).astype(jnp.float32)
    normal = (1.0 + mantissa / 1024) * jnp.exp2((exponent - 15).astype(jnp.float32))
    return sign * jnp.where(exponent == 0, mantissa * 2.0**-24, normal)


def _kernel(layer_ref, *refs, steps: int, bits: int, group: int, has_offset: bool):
    # layer_ref (SMEM) is read by the index maps. Blocks: for 8 bits x [tm, tk] and values [tk, tn]
    # int8; else x_low, x_high [tm, tk / 2], values [tk / 2, tn] uint8 (the nibbles) and, for 5/6
    # bits, the top bits [tk / 2 / spread, tn] uint8; then scale (offset) [tk / group, tn] uint16;
    # the output [tm, tn]; the float32 accumulator [tm, tn] (scratch).
    del layer_ref
    n_x = 1 if bits == 8 else 2
    xs, values, refs = refs[:n_x], refs[n_x], refs[n_x + 1:]
    top, refs = (refs[0], refs[1:]) if 4 < bits < 8 else (None, refs)
    scale, offset = refs[0], (refs[1] if has_offset else None)
    y, acc = refs[-2:]
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc[...] = jnp.zeros_like(acc)

    v = values[...].astype(jnp.int32)
    rows, tn = v.shape[0], math.prod(v.shape[1:])
    v = v.reshape(rows, tn)  # ([heads, head dim] blocks as one axis)
    if bits == 8:
        parts, mid = [v], 0
    else:
        parts, mid = [v & 15, v >> 4], 1 << (bits - 1)
    if top is not None:  # kernel_layout: stacked shifted copies of the top-bit rows line up with the nibble rows
        extra, spread = bits - 4, _spread(bits)
        t = top[...].astype(jnp.int32).reshape(rows // (spread * _SPAN), 1, _SPAN, tn)  # (any heads as one axis)
        t = jnp.concatenate([t >> (2 * extra * h) for h in range(spread)], axis=1).reshape(rows, tn)
        mask = (1 << extra) - 1
        parts = [parts[0] | ((t & mask) << 4), parts[1] | (((t >> extra) & mask) << 4)]

    def per_row(a):  # [tk / group, *out] -> [rows, tn], each group's value on its rows
        groups = a.shape[0]
        a = _float16(a).reshape(groups, 1, tn)
        return jnp.broadcast_to(a, (groups, rows // groups, tn)).reshape(rows, tn)

    s = per_row(scale[...])
    o = per_row(offset[...]) if offset is not None else 0.0
    acc[...] += sum(jnp.dot(x[...], ((w - mid).astype(jnp.float32) * s + o).astype(x.dtype),
                            preferred_element_type=jnp.float32) for x, w in zip(xs, parts))

    @pl.when(k == steps - 1)
    def _():
        y[...] = acc[...].reshape(y.shape).astype(y.dtype)


def grouped_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, offset: jax.Array | None = None,
                   layer=None, *, interpret: bool = False) -> jax.Array:
    """x [M, K] @ the grouped weight -> [M, *out] in x's dtype.

    values [K * bits / 8, *out] uint8 (out: [N], or [heads, head dim]; 4 bits as
    maxlike.weights.quantize packs them, 5 and 6 in `kernel_layout`) or [K, *out] int8 (8 bits,
    groups of 32: q8_0), scale (offset) [K / group, *out] float16 or its bit patterns as uint16
    (what a model stores for the weights this kernel takes: XLA:TPU converts a float16 stack to
    uint16 in a buffer, not as a bitcast); or, with `layer` (an int32 scalar), stacks [L, ...] of
    which layer `layer` is read. Shapes must pass `supported`; `interpret` runs Pallas's TPU
    interpret mode (off the TPU)."""
    if layer is None:
        values, scale = values[None], scale[None]
        offset = None if offset is None else offset[None]
        layer = 0
    m, k = x.shape
    out = values.shape[2:]  # [N] or [heads, head dim]
    n = math.prod(out)
    bits, group = form(values.shape, values.dtype, scale.shape, lead=1)
    tk, tn = _tiles(k, out)
    block, tail = ((tn,), lambda j: (j,)) if len(out) == 1 else (out, lambda j: (j, 0))  # (heads taken whole)
    most = max(8, _TILE_ROWS_X_OUT // tn // 8 * 8)  # (a 512 x 4096 step ran out of the v5e's VMEM)
    tm = min(_TILE_M, most, max(8, -(-m // 8) * 8))  # rows a grid step covers (sublanes: a multiple of 8)
    rows = -(-m // tm) * tm
    x = jnp.pad(x, ((0, rows - m), (0, 0)))
    if bits == 8:
        xs, packed = [x], tk
    else:  # the inputs of the low and of the high nibbles
        halves = x.reshape(rows, k // group, 2, group // 2)
        xs, packed = [halves[:, :, i].reshape(rows, k // 2) for i in (0, 1)], tk // 2
    bit_patterns = [a if a.dtype == jnp.uint16 else jax.lax.bitcast_convert_type(a, jnp.uint16)
                    for a in (scale, offset) if a is not None]
    # Grid (m / tm, n / tn, k / tk); index maps get (r, j, i, the prefetched layer).
    inputs = pl.BlockSpec((tm, packed), lambda r, j, i, layer: (r, i))
    weights = [pl.BlockSpec((None, packed, *block), lambda r, j, i, layer: (layer[0], i, *tail(j)))]
    if 4 < bits < 8:  # the top bits, after the K / 2 rows of nibbles: blocks of tk / 2 / spread rows
        spread = _spread(bits)
        weights.append(pl.BlockSpec((None, tk // 2 // spread, *block),
                                    lambda r, j, i, layer: (layer[0], spread * k // tk + i, *tail(j))))
    per_group = pl.BlockSpec((None, tk // group, *block), lambda r, j, i, layer: (layer[0], i, *tail(j)))
    y = pl.pallas_call(
        functools.partial(_kernel, steps=k // tk, bits=bits, group=group, has_offset=offset is not None),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(rows // tm, n // tn, k // tk),
            in_specs=[inputs] * len(xs) + weights + [per_group] * len(bit_patterns),
            out_specs=pl.BlockSpec((tm, *block), lambda r, j, i, layer: (r, *tail(j))),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((rows, *out), x.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="grouped_matmul_tpu",
    )(jnp.asarray(layer, jnp.int32).reshape(1), *xs, *[values] * len(weights), *bit_patterns)
    return y[:m]
