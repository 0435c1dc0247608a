"""Shared layers: RMSNorm, paged grouped-query attention (causal, optionally windowed), the
projection every matmul with a weight goes through (LoRA, quantized weights) (RoPE: graphs.rope).

Plain-XLA reference implementations; every op is a pure function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from graphs.base import LAYERS, LayerOf


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    # Normalize in fp32, scale in the input dtype (as HF's Llama does).
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def write_kv(pages: jax.Array, new: jax.Array, slots: jax.Array, layer=0, *, backend: str = "cpu") -> jax.Array:
    """Scatter new keys or values into layer `layer` of the (donated) page pool, in place.

    pages [R, L, N, S, KV, D] (R data-parallel replicas, each with its own pages; L
    layers, 1 when each layer has its own pool); new [B, T, KV, D] with rows grouped
    by replica (B = R x rows each); slots [B, T] flat slot ids within the row's
    replica (page * S + offset); `layer` a static or traced index into L. Padding
    tokens point at page 0, which no sequence owns.
    """
    r, l, n, s, kv, d = pages.shape
    slots = slots.reshape(r, -1) + layer * (n * s)
    new = new.reshape(r, -1, kv, d).astype(pages.dtype)
    if backend == "cpu":
        # One extra write to the null slot keeps this a scatter even for a single token:
        # XLA:CPU turns a one-index scatter into a dynamic-update-slice and then copies
        # the whole pool (measured: 240 pool copies, 140 ms per step). On an H100 the
        # same extra write made a batch-1 Llama-1B decode step 3.7 ms instead of 2.1 ms.
        slots = jnp.concatenate([slots, jnp.zeros((r, 1), slots.dtype)], axis=1)
        new = jnp.concatenate([new, jnp.zeros((r, 1, kv, d), pages.dtype)], axis=1)

    def one_replica(pool, new, slots):  # vmapped: a gather/scatter batched over the data-sharded axis stays local
        flat = pool.reshape(l * n * s, kv, d).at[slots].set(new, mode="promise_in_bounds")
        return flat.reshape(l, n, s, kv, d)

    if r == 1:  # the common case without vmap's batched scatter (same program as before replicas existed)
        return one_replica(pages[0], new[0], slots[0])[None]
    return jax.vmap(one_replica)(pages, new, slots)


def gather_pages(pages: jax.Array, page_table: jax.Array, layer=0) -> jax.Array:
    """pages [R, L, N, S, KV, D]; page_table [B, P] (rows grouped by replica) -> layer
    `layer`'s [B, P * S, KV, D], gathered straight from the pool (no layer slice)."""
    r, l, n, s, kv, d = pages.shape
    b, p = page_table.shape
    table = page_table + layer * n
    if r == 1:
        return pages[0].reshape(l * n, s, kv, d)[table].reshape(b, p * s, kv, d)
    out = jax.vmap(lambda pool, t: pool.reshape(l * n, s, kv, d)[t])(pages, table.reshape(r, b // r, p))
    return out.reshape(b, p * s, kv, d)  # from [R, B/R, P, S, KV, D]


# Backends where decode attention picks the pages it reads on device (a `lax.switch` per layer) and
# the page table is always full width. Not on GPU: XLA:GPU runs a conditional by reading its branch
# index on the host (a stream sync per layer and step), so there decode steps keep one executable
# per power-of-two table width, as `DecoderPipelineModel.step_buckets` lays them out.
WIDTH_ON_DEVICE = {"cpu": True, "tpu": True, "gpu": False}


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class GroupedPageTable:
    """The page tables of a step whose tokens lie flat, replica by replica ([R, N]), in
    groups that each attend as a [rows, tokens] batch: group g holds rows_g / R rows of
    `tokens[g]` tokens per replica, after the groups before it. A mixed step is two
    groups: its decode rows (1 token each), then one prompt chunk per replica. The
    matmuls see every token of the step at once; only attention splits them.

    tables: per group [rows_g (all replicas), P]; tokens: per group, static.
    """

    tables: tuple
    tokens: tuple

    def tree_flatten(self):
        return self.tables, self.tokens

    @classmethod
    def tree_unflatten(cls, tokens, tables):
        return cls(tuple(tables), tokens)

    def split(self, x: jax.Array) -> list[jax.Array]:
        """x [R, N, ...] -> per group [rows_g, tokens_g, ...]."""
        r, at, parts = x.shape[0], 0, []
        for table, t in zip(self.tables, self.tokens):
            n = table.shape[0] // r * t
            parts.append(x[:, at : at + n].reshape(table.shape[0], t, *x.shape[2:]))
            at += n
        return parts

    @staticmethod
    def join(parts: list[jax.Array], replicas: int) -> jax.Array:
        """The inverse of `split`."""
        return jnp.concatenate([p.reshape(replicas, -1, *p.shape[2:]) for p in parts], axis=1)


@dataclass(frozen=True)
class AttentionRun:
    """How decode attention runs: `kernel` ("xla" or "pallas") and the mesh a Pallas kernel
    runs under, one shard of rows and heads per device (None: one device)."""

    kernel: str = "xla"
    mesh: Any = None


def decode_kernel(backend: str):
    """(module, interpret) of the backend's Pallas decode-attention kernel: the Mosaic one on
    TPU (graphs.pallas_tpu_attention), else the Triton one (graphs.pallas_attention), run in
    interpret mode off the GPU."""
    if backend == "tpu":
        from graphs import pallas_tpu_attention as module
    else:
        from graphs import pallas_attention as module
    return module, backend not in ("gpu", "tpu")


def several_devices(mesh):
    """`mesh` when it has more than one device (the kernel then runs per shard), else None."""
    return mesh if mesh is not None and mesh.size > 1 else None


def pallas_decode_takes(backend: str, mesh, q, k_pages) -> bool:
    """Whether the backend's Pallas kernel takes a decode step of q [B, 1, H, D] over the pool
    [R, L, N, S, KV, D] (arrays or shapes), as each device holds them under `mesh`."""
    mesh = several_devices(mesh)
    data, tensor = (mesh.shape["data"], mesh.shape["tensor"]) if mesh is not None else (1, 1)
    b, t, h, d = q.shape
    r, l, n, s, kv, _ = k_pages.shape
    return decode_kernel(backend)[0].supported(jax.ShapeDtypeStruct((b // data, t, h // tensor, d), q.dtype),
                                               jax.ShapeDtypeStruct((r // data, l, n, s, kv // tensor, d),
                                                                    k_pages.dtype))


def _pallas_decode(mesh, backend, q, k_pages, v_pages, page_table, q_pos, layer, window, scale, softcap):
    """The decode step's attention through the backend's Pallas kernel, or None where that kernel
    does not take these shapes. Under a mesh of several devices the kernel runs per shard
    (`shard_map`: rows and the pool's replicas over `data`, heads over `tensor`), each device
    over its own part of the pool: a custom call left to the partitioner would gather it whole."""
    if not pallas_decode_takes(backend, mesh, q, k_pages):
        return None
    module, interpret = decode_kernel(backend)
    mesh = several_devices(mesh)
    window = jnp.asarray(0 if window is None else window, jnp.int32)

    def attend(q, k_pages, v_pages, page_table, q_pos, layer, window):
        return module.paged_decode_attention(q, k_pages, v_pages, page_table, q_pos, layer, window=window,
                                             scale=scale, softcap=softcap, interpret=interpret)

    args = (q, k_pages, v_pages, page_table, q_pos, jnp.asarray(layer, jnp.int32), window)
    if mesh is None:
        return attend(*args)
    rows, pool = P("data", None, "tensor"), P("data", None, None, None, "tensor")
    return jax.shard_map(attend, mesh=mesh, in_specs=(rows, pool, pool, P("data"), P("data"), P(), P()),
                         out_specs=rows, check_vma=False)(*args)


def paged_attention(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table, q_pos: jax.Array, layer=0,
    *, backend: str = "cpu", window=None, scale: float | None = None, softcap: float | None = None,
    kernel="xla",
) -> jax.Array:
    """Causal grouped-query attention over layer `layer` of a paged KV pool.

    q [B, T, H, D]; k_pages/v_pages [R, L, N, S, KV, D]; page_table [B, P];
    q_pos [B, T] absolute positions, ascending along a row from its first (padding after
    its queries may be 0). Key l of a row sits at position l, so the causal mask
    `l <= q_pos` also hides everything not written yet. With a GroupedPageTable,
    q [R, N, H, D] and q_pos [R, N] hold its groups, each attended as its own batch.
    `window` (sliding-window attention; a static int or a traced scalar, 0 or None:
    full attention) also hides keys `window` or more positions back: a query sees
    itself and the window - 1 keys before it (HF's sliding-window mask). `scale`
    multiplies the scores (default head_dim^-1/2); `softcap` c bounds them to
    c * tanh(scores / c) before the mask (Gemma 2).

    Decode steps (T = 1; backends in WIDTH_ON_DEVICE) read as much of the table as the
    step needs, chosen on device by `lax.switch`: the first W pages, W the smallest
    power of two (or P) covering the furthest query. One decode executable serves every
    context length, and a short context reads only its own pages. Prefill steps there
    (T > 1, a table of more than KEY_BLOCK keys) read KEY_BLOCK keys at a time, as many
    blocks as the furthest query reaches, from the first block a window lets any query see
    (`_attend_blocks`: a loop, not branches, which cost more compile time than they saved:
    a Llama-3.1-8B-shaped 256-token step for TPU took 17.9 s and 12 MiB with them, 6.6 s
    and 5 MiB without). On GPU prefill steps read the whole table unless its scores would
    pass GPU_WHOLE_TABLE_SCORE_BYTES (`prefill_reads_blocks`).

    kernel: "xla", "pallas", or an AttentionRun (the kernel and the mesh it runs under).
    "pallas": decode steps whose shapes the backend's kernel supports run it instead
    (`decode_kernel`); the rest, and every prefill step, stay here.
    """
    if isinstance(page_table, GroupedPageTable):
        parts = [paged_attention(qg, k_pages, v_pages, table, pos, layer, backend=backend, window=window,
                                 scale=scale, softcap=softcap, kernel=kernel)
                 for qg, table, pos in zip(page_table.split(q), page_table.tables, page_table.split(q_pos))]
        return GroupedPageTable.join(parts, q.shape[0])
    run = kernel if isinstance(kernel, AttentionRun) else AttentionRun(kernel)
    if run.kernel == "pallas" and q.shape[1] == 1:
        out = _pallas_decode(run.mesh, backend, q, k_pages, v_pages, page_table, q_pos, layer, window, scale, softcap)
        if out is not None:
            return out
    s, p = k_pages.shape[-3], page_table.shape[1]
    if q.shape[1] > 1 and prefill_reads_blocks(backend, p * s, math.prod(q.shape[:3])):
        return _attend_blocks(q, k_pages, v_pages, page_table, q_pos, layer, window, scale, softcap, backend)
    if q.shape[1] > 1:
        return _attend(q, k_pages, v_pages, page_table, q_pos, layer, window, scale, softcap, backend)
    widths = [w for w in (2**i for i in range(p.bit_length())) if w < p] + [p]
    attends = [partial(_attend_prefix, w, scale=scale, softcap=softcap, backend=backend) for w in widths]
    span = (window - 1) // s + 2 if isinstance(window, int) and window > 0 else None  # pages a window touches
    if span is not None and span < p:  # past `span` pages, each row reads its window's pages, wherever they lie
        attends = attends[:sum(w < span for w in widths)] + [
            partial(_attend_window, span, scale=scale, softcap=softcap, backend=backend)]
        widths = [w for w in widths if w < span] + [p]
    if len(attends) == 1 or not WIDTH_ON_DEVICE.get(backend, True):
        return attends[-1](q, k_pages, v_pages, page_table, q_pos, layer, window)
    need = jnp.max(q_pos) // s + 1  # pages the furthest query reaches
    branch = jnp.sum(need > jnp.asarray(widths[:-1], need.dtype))
    return jax.lax.switch(branch, attends, q, k_pages, v_pages, page_table, q_pos, layer, window)


# Prefill steps (T > 1) attend KEY_BLOCK keys at a time, as many blocks as the furthest query reaches
# (a loop count on device), with an online softmax: their work follows the context, not max_length, and
# no [queries, max_length] score matrix is held. (One whole-table product made SmolLM2's 512-token
# prefill on CPU 4.6x slower at max_length 8192, its default, than at 1024.) On GPU only where the whole
# table's float32 scores would pass GPU_WHOLE_TABLE_SCORE_BYTES: XLA:GPU reads a loop's count on the host
# each iteration (a stream sync per block and layer), which costs a small step more than its whole-table
# product; a large step's scores would not fit (Llama-3.1-8B, an 8192-token chunk at its default
# max_length of 131,072: 128 GiB a layer; at max_length 8192, 8 GiB).
KEY_BLOCK = 512
GPU_WHOLE_TABLE_SCORE_BYTES = 1 << 30


def prefill_reads_blocks(backend: str, table_keys: int, queries: int) -> bool:
    """Whether a step of several tokens a row, `queries` = rows x tokens x query heads, over a
    table of `table_keys` keys attends KEY_BLOCK keys at a time (`_attend_blocks`) rather than
    all at once (`_attend`)."""
    if table_keys <= KEY_BLOCK:
        return False
    return WIDTH_ON_DEVICE.get(backend, True) or queries * table_keys * 4 > GPU_WHOLE_TABLE_SCORE_BYTES


def _attend_blocks(q, k_pages, v_pages, page_table, q_pos, layer, window, scale, softcap, backend):
    """`_attend`, block by block of keys: the same causal (and windowed) softmax, accumulated
    online (running maximum, sum and weighted values per query, in float32)."""
    b, t, h, d = q.shape
    kv, s = k_pages.shape[-2], k_pages.shape[-3]
    per = max(1, KEY_BLOCK // s)  # pages a block
    blocks = -(-page_table.shape[1] // per)
    table = jnp.pad(page_table, ((0, 0), (0, blocks * per - page_table.shape[1])))  # the null page, masked
    q, pos = _grouped(q, kv), _grouped_positions(q_pos, h // kv)

    def block(i, carry):
        top, total, acc = carry  # [B, KV, T*G, 1] twice, [B, KV, T*G, D]
        cols = jax.lax.dynamic_slice_in_dim(table, i * per, per, axis=1)
        # The barrier as in `_attend`, here at 2+ rows only: in this loop it made the copy at one row
        # (Llama-3.1-8B on 4 v5e chips: 770 MiB).
        k, v = _gathered(k_pages, v_pages, cols, layer, barrier=backend == "tpu" and b > 1)  # [B, per*S, KV, D]
        scores = _scores(q, k, scale, softcap)
        mask = _visible(i * per * s + jnp.arange(per * s), pos, window)
        new_top = jnp.maximum(top, jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True))
        probs = jnp.where(mask, jnp.exp(scores - new_top), 0.0)
        fade = jnp.exp(top - new_top)  # 0 once a first key is seen (top starts at -inf: then 1, over zeros)
        fade = jnp.where(jnp.isneginf(new_top), 1.0, fade)
        acc = acc * fade + jnp.einsum("bkql,blkd->bkqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return new_top, total * fade + probs.sum(axis=-1, keepdims=True), acc

    rows = (b, kv, t * h // kv, 1)
    start = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
             jnp.zeros((*rows[:3], d), jnp.float32))
    count = jnp.minimum(jnp.max(q_pos) // (per * s) + 1, blocks)
    first = 0
    if _windowed(window):  # blocks wholly before every query's window are skipped: the earliest key a query
        # sees is its row's first position less the window (a row's queries ascend; padding after them is 0)
        first = jnp.maximum(jnp.min(q_pos[:, 0]) - _reach(window) + 1, 0) // (per * s)
    _, total, acc = jax.lax.fori_loop(first, count, block, start)
    out = acc / jnp.where(total > 0, total, 1.0)  # a query that sees no key: zeros
    return _ungrouped(out.astype(v_pages.dtype), t)


def _attend_prefix(width: int, q, k_pages, v_pages, page_table, q_pos, layer, window, *, scale, softcap, backend):
    return _attend(q, k_pages, v_pages, page_table[:, :width], q_pos, layer, window, scale, softcap, backend)


def _attend_window(span: int, q, k_pages, v_pages, page_table, q_pos, layer, window, *, scale, softcap, backend):
    """Decode in a sliding window (a static int): each row reads the `span` pages from the first
    its window reaches, not the table's prefix up to its query."""
    s = k_pages.shape[-3]
    cols = jnp.maximum(q_pos[:, :1] - window + 1, 0) // s + jnp.arange(span)  # [B, span] pages of the table
    table = jnp.take_along_axis(page_table, jnp.minimum(cols, page_table.shape[1] - 1), axis=1)  # (past it: masked)
    keys = (cols[:, :, None] * s + jnp.arange(s)).reshape(cols.shape[0], 1, 1, span * s)  # their keys' positions
    return _attend(q, k_pages, v_pages, table, q_pos, layer, window, scale, softcap, backend, keys=keys)


def _attend(q, k_pages, v_pages, page_table, q_pos, layer, window=None, scale=None, softcap=None, backend="cpu",
            keys=None):
    """Attention over the table's pages at once. `keys`: the positions of their keys ([B, 1, 1, L]);
    None: key l at position l."""
    b, t, h, d = q.shape
    kv = k_pages.shape[-2]
    # The barrier (see `_gathered`) not for one row's decode: there it made the copy (tests/test_tpu_target.py).
    k, v = _gathered(k_pages, v_pages, page_table, layer, barrier=backend == "tpu" and b * t > 1)  # [B, P*S, KV, D]
    scores = _scores(_grouped(q, kv), k, scale, softcap)
    mask = _visible(jnp.arange(k.shape[1]) if keys is None else keys, _grouped_positions(q_pos, h // kv), window)
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(v.dtype)
    return _ungrouped(jnp.einsum("bkql,blkd->bkqd", probs, v), t)


# The pieces both attentions share. Each KV head's T x G queries form one axis: one [T*G, D] x [D, L]
# product per (row, head) instead of G x T separate ones (measured 3.5 vs 6.4 ms a layer at 32 rows on CPU).
def _grouped(q: jax.Array, kv: int) -> jax.Array:
    """q [B, T, H, D] -> [B, KV, T*G, D]."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * h // kv, d)


def _ungrouped(out: jax.Array, t: int) -> jax.Array:
    """The inverse of `_grouped`: [B, KV, T*G, D] -> [B, T, H, D]."""
    b, kv, _, d = out.shape
    return out.reshape(b, kv, t, -1, d).transpose(0, 2, 1, 3, 4).reshape(b, t, -1, d)


def _grouped_positions(q_pos: jax.Array, g: int) -> jax.Array:
    """q_pos [B, T] -> the grouped queries' positions [B, 1, T*G, 1]."""
    return jnp.repeat(q_pos, g, axis=1)[:, None, :, None]


def _gathered(k_pages, v_pages, page_table, layer, *, barrier: bool):
    """The table's keys and values [B, L, KV, D]. With `barrier` (TPU, steps of several tokens) they
    are kept [B, L, KV x D] behind an optimization barrier, as `_product` keeps q: else, with 2 KV heads
    a device (tensor parallelism), XLA:TPU copies the layer's whole pool in each layer of each decode
    step of 2+ rows, and of prefill, to gather its pages head by head (Llama-3.1-8B on 4 v5e chips:
    257 MiB)."""
    k, v = gather_pages(k_pages, page_table, layer), gather_pages(v_pages, page_table, layer)
    if barrier:
        b, _, kv, d = k.shape
        flat = jax.lax.optimization_barrier((k.reshape(b, -1, kv * d), v.reshape(b, -1, kv * d)))
        k, v = (x.reshape(b, -1, kv, d) for x in flat)
    return k, v


def _scores(q: jax.Array, k: jax.Array, scale, softcap) -> jax.Array:
    """Scaled (default head_dim^-1/2), soft-capped float32 scores [B, KV, T*G, L] of grouped queries."""
    scores = jnp.einsum("bkqd,blkd->bkql", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1]) if scale is None else scores * scale
    return jnp.tanh(scores / softcap) * softcap if softcap else scores


def _visible(keys: jax.Array, pos: jax.Array, window) -> jax.Array:
    """Which keys (positions [L], or [B, 1, 1, L]) each query (positions [B, 1, T*G, 1]) sees: its own and earlier
    ones, and with a window (a static int or a traced scalar; 0 or None: full) only the last
    `window` of those."""
    mask = keys <= pos
    if _windowed(window):
        mask &= keys > pos - _reach(window)
    return mask


def _windowed(window) -> bool:
    return window is not None and not (isinstance(window, int) and window <= 0)


def _reach(window) -> jax.Array:
    """How many positions back a query sees (itself included): the window, or (a traced 0) all."""
    return jnp.where(window > 0, window, jnp.iinfo(jnp.int32).max // 2)


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

