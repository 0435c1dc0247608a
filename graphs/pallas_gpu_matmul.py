"""A product with int8 or 4-bit weights that dequantizes in registers: the GPU (Triton) path.

On an H200, XLA:GPU decodes a Llama-3.2-1B shape slower in int8 than in bf16 (576 against 602
tok/s at batch 1) and slower still in q4_k (354), though they read 0.61x and 0.46x the bytes:
the conversion is not fused into a product that streams the small weights
(benchmarks/results/h200_decode_2026-11-29.json). This kernel reads the stored bytes once and
converts them next to the dot:

    grouped_matmul(x [M, K], values, scale, offset) -> [M, N] in x's dtype

    int8 [K, N] with scale [N]           one scale per output (the "int8" encoding)
    int8 [K, N] with scale [K / 32, N]   a scale per 32 inputs (q8_0)
    uint8 [K / 2, N], scale (and offset) [K / 32, N]
                                         4 bits a value in groups of 32 (q4_0; q4_k with offsets):
                                         in a group's 16 bytes, value j is the low nibble of byte j
                                         and value j + 16 its high nibble, stored plus 8

as `graphs.layers.dequantize_grouped` (the XLA reference the tests compare with) reads them.

Grid: (N / 64 outputs, splits of K). A program walks its run of K one group (or, per channel,
64 inputs) at a time: a [rows, 32] x [32, 64] dot (4 bits: two of 16, the nibbles), times the
group's scales, plus the group's offsets times its inputs' sum, summed in float32. Decode has
few rows and few output blocks, so K is split until the programs fill the GPU, and the splits'
float32 partial products are summed by XLA afterwards. Rows are padded to 16 (tl.dot's least);
`supported` takes up to `MAX_ROWS` rows (decode): prefill's products are bound by arithmetic,
where XLA's own matmul is the better tool.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_ROWS = 64  # decode buckets; more rows go through XLA
_BN = 64  # outputs a program
_GROUP = 32  # inputs a scale (q8_0, q4_0, q4_k)
_PER_CHANNEL_STEP = 64  # inputs a loop step with one scale per output
_MIN_DOT = 16  # Triton's tl.dot wants every dimension >= 16
_TARGET_PROGRAMS = 512  # split K until the grid has about this many programs (an H200 has 132 SMs)
_MIN_STEPS = 4  # ... but give each split at least this many loop steps
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def form(values_shape: tuple, values_dtype, scale_shape: tuple) -> tuple[int, int] | None:
    """(bits, inputs per scale) of a [K(/2), N] weight and its scales, or None if not one of the
    module doc's forms. Per channel: the group is all of K."""
    if len(values_shape) != 2:
        return None
    k, n = values_shape
    if jnp.dtype(values_dtype) == jnp.int8:
        if tuple(scale_shape) == (n,):
            return 8, k
        if len(scale_shape) == 2 and scale_shape[1] == n and scale_shape[0] * _GROUP == k:
            return 8, _GROUP
    if jnp.dtype(values_dtype) == jnp.uint8 and len(scale_shape) == 2 and scale_shape[1] == n \
            and scale_shape[0] * _GROUP == 2 * k:
        return 4, _GROUP
    return None


def supported(values_shape: tuple, values_dtype, scale_shape: tuple, rows: int, dtype) -> bool:
    """Whether `grouped_matmul` takes this weight for `rows` rows of `dtype` inputs: a module-doc
    form, N a multiple of 64, K of 64 per channel, and at most MAX_ROWS rows."""
    f = form(values_shape, values_dtype, scale_shape)
    if f is None or rows > MAX_ROWS or jnp.dtype(dtype) not in _DTYPES:
        return False
    bits, group = f
    k = values_shape[0] * 8 // bits
    return values_shape[1] % _BN == 0 and (group != k or k % _PER_CHANNEL_STEP == 0)


def _splits(steps: int, blocks: int, target: int = _TARGET_PROGRAMS) -> int:
    """Splits of K's `steps` loop steps (a power of two dividing them) for `blocks` output blocks."""
    splits = 1
    while (blocks * splits * 2 <= target and steps % (splits * 2) == 0
           and steps // (splits * 2) >= _MIN_STEPS):
        splits *= 2
    return splits


def _kernel(x_ref, v_ref, s_ref, *rest, bits: int, group: int, steps: int, per_channel: bool):
    *o_ref, y_ref = rest
    o_ref = o_ref[0] if o_ref else None
    bm = x_ref.shape[0]
    exact = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None  # no TF32 for float32
    first = pl.program_id(1) * steps
    k_step = _PER_CHANNEL_STEP if per_channel else group

    def dot(a, b):
        return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=exact, preferred_element_type=jnp.float32)

    def step(i, acc):
        at = first + i
        if bits == 4:  # a group's 16 bytes: low nibbles are inputs 0-15, high nibbles 16-31
            packed = v_ref[pl.ds(at * (group // 2), group // 2), :]
            xs = [x_ref[:, pl.ds(at * group + half, group // 2)] for half in (0, group // 2)]
            part = dot(xs[0], (packed & 15).astype(x_ref.dtype)) + dot(xs[1], (packed >> 4).astype(x_ref.dtype))
        else:
            xs = [x_ref[:, pl.ds(at * k_step, k_step)]]
            part = dot(xs[0], v_ref[pl.ds(at * k_step, k_step), :].astype(x_ref.dtype))
        if per_channel:
            return acc + part
        scale = s_ref[pl.ds(at, 1), :].astype(jnp.float32)  # [1, BN]
        acc = acc + part * scale
        if bits == 4 or o_ref is not None:  # each input's weight also has -8 x scale (stored + 8), + offset
            shift = -8.0 * scale if bits == 4 else 0.0
            if o_ref is not None:
                shift = shift + o_ref[pl.ds(at, 1), :].astype(jnp.float32)
            x_sum = sum(jnp.sum(x.astype(jnp.float32), axis=1) for x in xs)
            acc = acc + x_sum[:, None] * shift
        return acc

    acc = lax.fori_loop(0, steps, step, jnp.zeros((bm, y_ref.shape[-1]), jnp.float32))
    if per_channel:
        acc = acc * s_ref[...].astype(jnp.float32)[None, :]
    y_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("interpret", "tuning"))
def grouped_matmul(x, values, scale, offset=None, *, interpret: bool = False, tuning: tuple | None = None):
    """x [M, K] @ the weight `values` / `scale` / `offset` hold (module doc) -> [M, N] in x's dtype.
    `interpret`: Pallas interpret mode (CPU tests). `tuning`: (outputs a program, target programs,
    Triton warps, pipeline stages), for benchmarks/probe_gpu_quant_matmul.py --sweep; None: the
    module's defaults (64, 512, 4, 3)."""
    bn, target, warps, stages = tuning or (_BN, _TARGET_PROGRAMS, 4, 3)
    bits, group = form(values.shape, values.dtype, scale.shape)
    m, k = x.shape
    n = values.shape[1]
    per_channel = group == k
    if not supported(values.shape, values.dtype, scale.shape, m, x.dtype) or n % bn:
        raise ValueError(f"grouped_matmul does not take {m} rows x {values.dtype}{list(values.shape)} with scales "
                         f"{list(scale.shape)} (see pallas_gpu_matmul.supported)")
    bm = max(_MIN_DOT, 1 << (m - 1).bit_length())
    rows = jnp.pad(x, ((0, bm - m), (0, 0))) if bm != m else x
    steps = k // (_PER_CHANNEL_STEP if per_channel else group)
    blocks = n // bn
    splits = _splits(steps, blocks, target)
    parts = [values, scale] + ([offset] if offset is not None else [])
    if per_channel:
        in_specs = [pl.BlockSpec((values.shape[0], bn), lambda j, s: (0, j)), pl.BlockSpec((bn,), lambda j, s: (j,))]
    else:
        in_specs = [pl.BlockSpec((values.shape[0], bn), lambda j, s: (0, j))] + \
            [pl.BlockSpec((scale.shape[0], bn), lambda j, s: (0, j))] * (len(parts) - 1)
    kernel = functools.partial(_kernel, bits=bits, group=group, steps=steps // splits, per_channel=per_channel)
    partial = pl.pallas_call(
        kernel,
        grid=(blocks, splits),
        in_specs=[pl.BlockSpec((bm, k), lambda j, s: (0, 0))] + in_specs,
        out_specs=pl.BlockSpec((None, bm, bn), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, bm, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="dequantizing_matmul",
    )(rows, *parts)
    return partial.sum(axis=0)[:m].astype(x.dtype)

