"""Paged grouped-query attention (causal, optionally windowed) over the KV pool: writing a step's
keys and values into their pages, and reading them back (whole, by key blocks, or a sliding
window's pages), with the Pallas decode kernels chosen by backend (graphs.pallas_attention,
graphs.pallas_tpu_attention).

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

from graphs.base import several_devices


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
    kernel="xla", max_window: int | None = None,
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
    c * tanh(scores / c) before the mask (Gemma 2). `max_window`: the widest window of any
    layer (static), for a traced `window` (layers as one loop).

    Decode steps (T = 1; backends in WIDTH_ON_DEVICE) read as much of the table as the
    step needs, chosen on device by `lax.switch`: the first W pages, W the smallest
    power of two (or P) covering the furthest query. One decode executable serves every
    context length, and a short context reads only its own pages; in a sliding window (a
    static int, or traced with `max_window`) past the pages a window touches, each row reads
    its window's pages instead (on GPU: a static window only). Prefill steps there
    (T > 1, a table of more than KEY_BLOCK keys) read KEY_BLOCK keys at a time, each row
    as many blocks as its furthest query reaches, from the first its window lets it see
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
                                 scale=scale, softcap=softcap, kernel=kernel, max_window=max_window)
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
    on_device = WIDTH_ON_DEVICE.get(backend, True)
    widths = [w for w in (2**i for i in range(p.bit_length())) if w < p] + [p]
    attends = [partial(_attend_prefix, w, scale=scale, softcap=softcap, backend=backend) for w in widths]
    need = jnp.max(q_pos) // s + 1  # pages the furthest query reaches
    branch = jnp.sum(need > jnp.asarray(widths[:-1], need.dtype))  # the first prefix that covers it
    widest = window if window is None or isinstance(window, int) else max_window  # traced: any layer's widest
    span = (widest - 1) // s + 2 if widest is not None and widest > 0 else None  # pages a window touches
    if span is not None and span < p and (isinstance(window, int) or on_device):
        short = sum(w < span for w in widths)  # prefixes narrower than a window's pages; past them, its pages
        if isinstance(window, int):
            attends, branch = attends[:short], jnp.minimum(branch, short)
        else:  # sliding layers (window > 0) read their window past them, full ones keep every prefix
            branch = jnp.where((window > 0) & (branch >= short), len(attends), branch)
        attends.append(partial(_attend_window, span, scale=scale, softcap=softcap, backend=backend))
    if len(attends) == 1 or not on_device:
        return attends[-1](q, k_pages, v_pages, page_table, q_pos, layer, window)
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

    # Row r reads its blocks first[r] .. last[r]: up to the block its furthest query reaches, from the first
    # its first query's window reaches (a row's queries ascend; padding after them is 0). Each row counts
    # its own, so a row far along a window does not make a short one (or a padding row) read from block 0.
    keys_a_block = per * s
    last = jnp.max(q_pos, axis=1) // keys_a_block  # [B]
    first = jnp.zeros_like(last)
    if _windowed(window):
        first = jnp.maximum(q_pos[:, 0] - _reach(window) + 1, 0) // keys_a_block  # <= last[r]

    def block(i, carry):
        top, total, acc = carry  # [B, KV, T*G, 1] twice, [B, KV, T*G, D]
        at = first + i  # each row's block; past its last, its last again with every key hidden
        cols = jnp.minimum(at, last)[:, None] * per + jnp.arange(per)
        # The barrier as in `_attend`, here at 2+ rows only: in this loop it made the copy at one row
        # (Llama-3.1-8B on 4 v5e chips: 770 MiB).
        k, v = _gathered(k_pages, v_pages, jnp.take_along_axis(table, cols, axis=1), layer,
                         barrier=backend == "tpu" and b > 1)  # [B, per*S, KV, D]
        scores = _scores(q, k, scale, softcap)
        mask = _visible((at[:, None] * keys_a_block + jnp.arange(keys_a_block))[:, None, None, :], pos, window)
        new_top = jnp.maximum(top, jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True))
        probs = jnp.where(mask, jnp.exp(scores - new_top), 0.0)
        fade = jnp.exp(top - new_top)  # 0 once a first key is seen (top starts at -inf: then 1, over zeros)
        fade = jnp.where(jnp.isneginf(new_top), 1.0, fade)
        acc = acc * fade + jnp.einsum("bkql,blkd->bkqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return new_top, total * fade + probs.sum(axis=-1, keepdims=True), acc

    rows = (b, kv, t * h // kv, 1)
    start = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
             jnp.zeros((*rows[:3], d), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, jnp.minimum(jnp.max(last - first) + 1, blocks), block, start)
    out = acc / jnp.where(total > 0, total, 1.0)  # a query that sees no key: zeros
    return _ungrouped(out.astype(v_pages.dtype), t)


def _attend_prefix(width: int, q, k_pages, v_pages, page_table, q_pos, layer, window, *, scale, softcap, backend):
    return _attend(q, k_pages, v_pages, page_table[:, :width], q_pos, layer, window, scale, softcap, backend)


def _attend_window(span: int, q, k_pages, v_pages, page_table, q_pos, layer, window, *, scale, softcap, backend):
    """Decode in a sliding window (at most `span` pages): each row reads the `span` pages from the
    first its window reaches, not the table's prefix up to its query."""
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
    """Which keys (positions [L], or [B, 1, 1, L]) each query (positions [B, 1, T*G, 1]) sees:
    its own and earlier ones, and with a window (a static int or a traced scalar; 0 or None:
    full) only the last `window` of those."""
    mask = keys <= pos
    if _windowed(window):
        mask &= keys > pos - _reach(window)
    return mask


def _windowed(window) -> bool:
    return window is not None and not (isinstance(window, int) and window <= 0)


def _reach(window) -> jax.Array:
    """How many positions back a query sees (itself included): the window, or (a traced 0) all."""
    return jnp.where(window > 0, window, jnp.iinfo(jnp.int32).max // 2)
