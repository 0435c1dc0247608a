"""Shared layers: RMSNorm, the projection every matmul with a weight goes through (LoRA, quantized
weights), embedding rows and the LM head (paged attention: graphs.attention; RoPE: graphs.rope).

Plain-XLA reference implementations; every op is a pure function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from graphs.base import LAYERS, LayerOf, several_devices


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    # Normalize in fp32, scale in the input dtype (as HF's Llama does).
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def adapter_mask(w: dict, adapters) -> jax.Array | None:
    """The LoRA mask of a forward pass (None without adapters): `lora_mask` sized by the slots'
    weights in `w` ("{projection}_lora_a" per layer)."""
    if adapters is None:
        return None
    a = w[next(n for n in w if n.endswith("_lora_a"))]
    return lora_mask(adapters, *a.shape[-2:], a.dtype)


@dataclass(frozen=True)
class MatmulRun:
    """How products with grouped weights (4, 5, 6 or 8 bits) run: `kernel` "xla" or "pallas"
    (`target` "tpu": graphs.pallas_tpu_matmul; "gpu": graphs.pallas_gpu_matmul, which also takes
    int8 with a scale per output, for decode's few rows, one device), and under a mesh of several
    devices the mesh and, per weight kind the kernel takes, the mesh axes splitting its inputs and
    its outputs (None: whole on each device)."""

    kernel: str = "xla"
    mesh: Any = None
    splits: tuple = ()  # ((kind, input axis, output axis), ...)
    target: str = "tpu"

    def split(self, kind: str) -> tuple[str | None, str | None]:
        return next(((i, o) for k, i, o in self.splits if k == kind), (None, None))

    def local(self, shape: tuple, kind: str, stacked: bool) -> tuple:
        """A weight's (or its scales') shape [*lead, in, *out] on one device (the first output axis
        split: N, or the heads)."""
        if several_devices(self.mesh) is None:
            return tuple(shape)
        lead, (i, o) = int(stacked), self.split(kind)
        ways = [self.mesh.shape[a] if a else 1 for a in (i, o)]
        return (*shape[:lead], shape[lead] // ways[0], shape[lead + 1] // ways[1], *shape[lead + 2:])


def projection(mask, matmul: str | MatmulRun = "xla", backend: str = "cpu"):
    """proj(eq, x, layer_weights, name, n_in=1): the einsum of x with weight `name`, plus each
    token's LoRA update where the layer holds one for it (mask from `adapter_mask`). A quantized
    weight (maxlike.weights.quantize: it has a "{name}_scale") is dequantized in the product: with
    a scale per output channel, x @ values, times the scale; with grouped scales (and offsets),
    x @ (values * scale + offset), the weight rebuilt in x's dtype for the matmul (XLA:TPU builds
    it in a buffer rather than in the matmul: benchmarks/probe_tpu_dequant_fusion.py).
    matmul "pallas" (or a MatmulRun): the grouped weights `grouped_kernel_takes` go through
    the Pallas kernel that dequantizes in VMEM (graphs.pallas_tpu_matmul; interpret mode off the
    TPU; per device under a mesh). A weight may come as a graphs.base.LayerOf (its layer of a
    stack: `kernel_weights`). The one place a graph multiplies by a projection weight."""
    run = matmul if isinstance(matmul, MatmulRun) else MatmulRun(matmul)

    def proj(eq: str, x, lw: dict, name: str, n_in: int = 1):
        w, scale, offset = lw[name], lw.get(name + "_scale"), lw.get(name + "_offset")
        y = None
        if run.kernel == "pallas" and run.target == "gpu" and scale is not None:
            y = _gpu_kernel(x, w, scale, offset, n_in, backend)
        elif run.kernel == "pallas" and scale is not None and grouped_kernel_takes(w, scale, run, name):
            y = _grouped_kernel(x, w, scale, offset, n_in, backend, run, name)
        if y is None:
            w, scale, offset = (a.get() if isinstance(a, LayerOf) else a for a in (w, scale, offset))
            if scale is None or scale.ndim == w.ndim - n_in:  # float, or a scale per output channel
                y = _product(eq, x, w, scale, n_in, backend)
            else:
                y = jnp.einsum(eq, x, dequantize_grouped(w, scale, offset, x.shape[x.ndim - n_in:], x.dtype))
        if mask is not None and name + "_lora_a" in lw:
            y = y + lora_delta(x, lw[name + "_lora_a"], lw[name + "_lora_b"], mask, n_in)
        return y

    return proj


def _product(eq: str, x, w, scale, n_in: int, backend: str):
    """einsum(eq, x, w), times `scale` (per output channel) when given. On TPU a weight with several
    output axes (q [D, heads, head dim]) is multiplied as one [*in, out] matrix, its product kept
    whole behind an optimization barrier before it is split: otherwise XLA:TPU lays the weight out
    head by head for a decode loop's product of 2 rows or more, a copy of the whole stack made
    before the loop (780 MiB for a Llama-3.1-8B in int8; benchmarks/probe_tpu_weight_layout.py)."""
    out_shape = w.shape[n_in:]
    flat = backend == "tpu" and len(out_shape) > 1
    if flat:
        lead = x.shape[: x.ndim - n_in]
        eq, x, w = "...i,io->...o", x.reshape(*lead, -1), w.reshape(-1, math.prod(out_shape))
        scale = None if scale is None else scale.reshape(-1)
    y = jnp.einsum(eq, x, w) if scale is None else jnp.einsum(eq, x, w.astype(x.dtype)) * scale.astype(x.dtype)
    if not flat:
        return y
    return jax.lax.optimization_barrier(y).reshape(*lead, *out_shape)


def embed_rows(w: dict, tokens: jax.Array, dtype) -> jax.Array:
    """The embedding rows of `tokens` [B, T] -> [B, T, D] in `dtype`, from the table "embed" [V, D];
    or, held in q8_0 by rows beside a quantized head (maxlike.weights.quantize.ROWS: int8 values
    four to an int32 word [V, D / 4], "embed_scale" [V, D / 32]), the gathered rows unpacked and
    dequantized."""
    rows = w["embed"][tokens]
    if "embed_scale" not in w:
        return rows.astype(dtype)
    values = jax.lax.bitcast_convert_type(rows, jnp.int8)  # [B, T, D / 4, 4]: byte i of word j is value 4j + i
    scale = w["embed_scale"][tokens]  # [B, T, D / 32]
    grouped = values.reshape(*tokens.shape, scale.shape[-1], -1).astype(dtype) * scale.astype(dtype)[..., None]
    return grouped.reshape(*tokens.shape, -1)


def head_logits(w: dict, hidden: jax.Array, tied: bool, matmul: str | MatmulRun = "xla",
                backend: str = "cpu") -> jax.Array:
    """hidden [..., D] -> logits [..., V]: times the table ("embed" when `tied`, else "lm_head",
    [V, D]), or the quantized "head" [D, V] (maxlike.weights.quantize.with_head) through
    `projection` (the Pallas matmul `matmul` names, where it takes the head)."""
    if "head" in w:
        return projection(None, matmul, backend)("...d,dv->...v", hidden, w, "head")
    return jnp.einsum("...d,vd->...v", hidden, w["embed"] if tied else w["lm_head"])


def grouped_kernel_takes(values, scale, run: MatmulRun | None = None, kind: str = "") -> bool:
    """Whether graphs.pallas_tpu_matmul takes this quantized weight (arrays, shapes or LayerOf) as
    each device holds it under `run`'s mesh."""
    from graphs import pallas_tpu_matmul  # (Pallas is imported only where a model uses it)

    run = run or MatmulRun()
    stacked = isinstance(values, LayerOf)
    if stacked:
        values, scale = values.stack, scale.stack
    shape = _matrix_shape(values.shape, scale.shape, int(stacked))
    return pallas_tpu_matmul.supported(run.local(shape, kind, stacked), values.dtype,
                                       run.local(scale.shape, kind, stacked), stacked)


def _matrix_shape(shape: tuple, scale_shape: tuple, lead: int) -> tuple:
    """A grouped weight's shape with its input axes as one: [*lead, *in, *out] -> [*lead, in, *out]
    (the scales [*lead, groups, *out] tell the output axes). Packed values have theirs as one
    already; int8's (q8_0) keep o's [heads, head dim]."""
    n_in = len(shape) - len(scale_shape) + 1
    return (*shape[:lead], math.prod(shape[lead:lead + n_in]), *shape[lead + n_in:])


def kernel_weights(w: dict, matmul: str | MatmulRun):
    """run_layers' `whole` for matmul "pallas": the stacked kinds (values, scales, offsets) of the
    weights the kernel takes, which it reads from their stack by layer index. None otherwise."""
    run = matmul if isinstance(matmul, MatmulRun) else MatmulRun(matmul)
    if run.kernel != "pallas" or run.target != "tpu":  # (the GPU kernel takes unstacked weights only)
        return None
    scales = [name for name in w if name.startswith(LAYERS) and name.endswith("_scale")]
    kinds = {name[len(LAYERS):-len("_scale")] for name in scales}
    taken = {k for k in kinds if grouped_kernel_takes(LayerOf(w[LAYERS + k], 0), LayerOf(w[LAYERS + k + "_scale"], 0),
                                                      run, k)}
    return {k + part for k in taken for part in ("", "_scale", "_offset")}.__contains__


def _grouped_kernel(x, values, scale, offset, n_in: int, backend: str, run: MatmulRun, kind: str):
    """x [*batch, *in] @ a grouped weight [*in, N] through graphs.pallas_tpu_matmul. Under a mesh,
    per device (`shard_map`): rows over `data`, the weight's inputs and outputs as `run`
    splits them, and the partial products of split inputs summed over their axis."""
    from graphs import pallas_tpu_matmul

    stacked = isinstance(values, LayerOf)
    layer = values.index if stacked else jnp.int32(0)
    parts = [a.stack if stacked else a for a in (values, scale, offset) if a is not None]
    parts[0] = parts[0].reshape(_matrix_shape(parts[0].shape, parts[1].shape, int(stacked)))  # (q8_0's o)
    batch = x.shape[:x.ndim - n_in]
    rows = x.reshape(math.prod(batch), -1)
    inputs, outputs = run.split(kind)

    def local(rows, layer, values, scale, offset=None):
        if not stacked:
            layer = None
        y = pallas_tpu_matmul.grouped_matmul(rows, values, scale, offset, layer, interpret=backend != "tpu")
        return y if inputs is None else jax.lax.psum(y, inputs)

    mesh = several_devices(run.mesh)
    if mesh is None:
        y = local(rows, layer, *parts)
    else:
        more = (None,) * (parts[1].ndim - int(stacked) - 2)  # a head dim after the heads
        weight = P(*(None,) * int(stacked), inputs, outputs, *more)
        y = jax.shard_map(local, mesh=mesh, in_specs=(P("data", inputs), P(), *(weight,) * len(parts)),
                          out_specs=P("data", outputs, *more), check_vma=False)(rows, layer, *parts)
    return y.reshape(*batch, *y.shape[1:])


def _gpu_kernel(x, values, scale, offset, n_in: int, backend: str):
    """x [*batch, *in] @ a quantized weight through graphs.pallas_gpu_matmul, its axes flattened to
    [K, N] (free reshapes of whole trailing axes), or None where the kernel does not take it (a
    layer of a stack, 5- or 6-bit values, too many rows: XLA's product runs instead)."""
    from graphs import pallas_gpu_matmul

    if isinstance(values, LayerOf):
        return None
    per_channel = scale.ndim == values.ndim - n_in
    out = scale.shape if per_channel else scale.shape[1:]
    n = math.prod(out)
    batch = x.shape[:x.ndim - n_in]
    rows = x.reshape(math.prod(batch), -1)
    matrix = values.reshape(-1, n)
    scales = [a if a is None else a.reshape(-1, n) for a in (scale, offset)]
    if per_channel:
        scales[0] = scales[0].reshape(n)
    if not pallas_gpu_matmul.supported(matrix.shape, matrix.dtype, scales[0].shape, rows.shape[0], x.dtype):
        return None
    y = pallas_gpu_matmul.grouped_matmul(rows, matrix, *scales, interpret=backend != "gpu")
    return y.reshape(*batch, *out)


def dequantize_grouped(values, scale, offset, in_shape: tuple, dtype) -> jax.Array:
    """values [*in, *out] (or 4-, 5- or 6-bit packed: uint8 [prod(in) * bits / 8, *out],
    maxlike.weights.quantize); scale (and offset) [groups, *out], one per run of consecutive inputs
    over the flattened input axes (float, or float16 as uint16 bit patterns) -> the weight [*in, *out],
    values * scale (+ offset), in `dtype`."""
    out = values.shape[1:] if values.dtype == jnp.uint8 else values.shape[len(in_shape):]
    grouped = values.reshape(scale.shape[0], -1, *out)
    if values.dtype == jnp.uint8:  # packed: per group, value j's nibble in byte j (low) or j - group / 2 (high)
        group = math.prod(in_shape) // scale.shape[0]
        bits, half = grouped.shape[1] * 8 // group, group // 2
        w = jnp.concatenate([grouped[:, :half] & 15, grouped[:, :half] >> 4], axis=1)
        if bits > 4:  # 5 / 6 bits: the rest of value j at bit (bits - 4) * (j // 4) of byte half + j % 4
            top, extra = grouped[:, half:], bits - 4
            w = w | (jnp.concatenate([(top >> (extra * i)) & ((1 << extra) - 1) for i in range(8 // extra)],
                                     axis=1) << 4)
        w = w.astype(dtype) - (1 << (bits - 1))
    else:
        w = grouped.astype(dtype)
    scale, offset = (a if a is None or a.dtype != jnp.uint16 else jax.lax.bitcast_convert_type(a, jnp.float16)
                     for a in (scale, offset))  # float16 held as bit patterns (graphs.pallas_tpu_matmul)
    w = w * scale.astype(dtype)[:, None]
    if offset is not None:
        w = w + offset.astype(dtype)[:, None]
    return w.reshape(*in_shape, *out)


def lora_mask(adapters: jax.Array, slots: int, rank: int, dtype) -> jax.Array:
    """adapters [B, T] (each token's slot, 0: none) -> [B, T, slots * rank]: 1 over the rank
    entries of the token's own slot, 0 elsewhere (all 0 for slot 0)."""
    return jnp.repeat(jax.nn.one_hot(adapters - 1, slots, dtype=dtype), rank, axis=-1)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, mask: jax.Array, n_in: int) -> jax.Array:
    """Each token's LoRA update of one projection, for a batch that mixes adapters.

    x [B, T, *in] (n_in input axes); a [*in, S, R], b [S, R, *out] (S adapter slots,
    rank R, the adapter's scale folded into b); mask [B, T, S*R] from lora_mask. Every
    slot's x @ a is computed and masked, then one contraction over (slot, rank) applies b:
    two plain matmuls, [tokens, in] x [in, S*R] and [tokens, S*R] x [S*R, out], with no
    gather of weights per token. (slot, rank) stay one flat axis: contracting them as two
    axes let XLA:CPU transpose and copy every b once per step.) Returns [B, T, *out].
    """
    bt, sr = x.shape[:2], mask.shape[-1]
    xa = jnp.einsum("bti,ij->btj", x.reshape(*bt, -1), a.reshape(-1, sr)) * mask.astype(x.dtype)
    out = jnp.einsum("btj,jo->bto", xa, b.reshape(sr, -1))
    return out.reshape(*bt, *b.shape[2:])

