"""Decode attention over the paged KV pool as a Pallas TPU (Mosaic) kernel: the TPU path.

Same contract and layout as `graphs.pallas_attention` (the GPU kernel; see its docstring),
with `graphs.attention._attend` as the reference the tests compare it with (Pallas's TPU
interpret mode on CPU), and compiled for TPU v5e by the tests that compile for a TPU slice.

The pool stays as it is, [R, L, N, S, KV, D]: no per-layer slice, no gather of pages into a
new array. The kernel runs one grid step per (row, block of `pages_per_block` table entries).
Each of a block's pages is its own input whose block index is read from the page table
(scalar prefetch): Pallas's pipeline copies page [S, KV, D] of layer `layer` straight from
the pool into VMEM while the previous block computes. Table entries outside the row's keys
(past its last key, or before its window) map to the nearest page it does read, so the
pipeline sees an unchanged block index and copies nothing, and the step computes nothing.
The page tables are prefetched into SMEM, `_MAX_TABLE_ENTRIES` a call: a step with more runs
as several calls, each over a run of rows.

Each page is folded into a float32 online softmax kept in VMEM scratch per query head of the
group (running max, running sum, unnormalised output), with the KV heads on sublanes and the
head dim on lanes: scores are a lane reduction of k * q, the output a sum over the page's
tokens of p * v. That is VPU work (not MXU), which a decode step (one query per row) can
afford: it reads each key once, as the pool's layout lays it out.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_MASKED = float(jnp.finfo(jnp.float32).min)  # the reference's mask value (finite: no inf - inf)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_BLOCK_TOKENS = 128  # keys a grid step (pages_per_block = 128 / S, between 1 and _MAX_PAGES)
_MAX_PAGES = 8  # each page of a block is its own pipelined input, with its own two VMEM buffers
# Page-table entries one call prefetches into SMEM (256 KiB): a larger step's rows are split over calls.
# (A v5e has 1 MiB of SMEM: 128 rows x 2,048 pages did not compile, 256 x 512 did.)
_MAX_TABLE_ENTRIES = 1 << 16


def supported(q, k_pages) -> bool:
    """Whether `paged_decode_attention` handles these shapes and dtypes (else use the reference):
    a decode step (T = 1), q and the pool both float32 or both bfloat16, H a multiple of KV,
    B a multiple of R, and a head dim D that is a multiple of 128 (the TPU's lanes). With
    D = 64, XLA:TPU may lay a pool out with its pages as the minor axis (measured: KV 3 and 32
    heads of 64), and the kernel, which reads it row-major, would get a copy of the whole pool
    every step."""
    if q.ndim != 4 or k_pages.ndim != 6:
        return False
    b, t, h, d = q.shape
    r, _, _, _, kv, dk = k_pages.shape
    return (t == 1 and d == dk and d % 128 == 0 and h % kv == 0 and b % r == 0 and jnp.dtype(q.dtype) in _DTYPES
            and jnp.dtype(k_pages.dtype) == jnp.dtype(q.dtype))


def _kernel(table_ref, pos_ref, meta_ref, q_ref, *refs, page_size: int, pages: int, table_pages: int,
            scale: float | None, softcap: float | None):
    # Scalars (SMEM): table_ref [B * P] the call's rows' page tables, row by row; pos_ref [B] the queries'
    # positions; meta_ref [2] (layer, window). q_ref [G, KV, D] this row's query heads, group-
    # major; refs: `pages` k pages [S, KV, D], as many v pages, the output [G, KV, D], then the
    # scratch: running max and sum [G, KV, 1], unnormalised output [G, KV, D] (float32).
    k_refs, v_refs = refs[:pages], refs[pages:2 * pages]
    o_ref, m_ref, l_ref, acc_ref = refs[2 * pages:]
    s, g = page_size, q_ref.shape[0]
    b, j = pl.program_id(0), pl.program_id(1)
    pos, window = pos_ref[b], meta_ref[1]
    n_keys = jnp.clip(pos + 1, 0, table_pages * s)  # keys [lo, n_keys) are attended
    lo = jnp.where(window > 0, jnp.maximum(pos - window + 1, 0), 0)
    start = j * pages * s

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, _MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when((start < n_keys) & (start + pages * s > lo))
    def _():
        q = q_ref[...].astype(jnp.float32)
        for i in range(pages):
            k = k_refs[i][...].astype(jnp.float32)  # [S, KV, D]
            v = v_refs[i][...].astype(jnp.float32)
            tok = start + i * s + lax.broadcasted_iota(jnp.int32, (s, k.shape[1], 1), 0)
            live = (tok >= lo) & (tok < n_keys)  # [S, KV, 1]
            v = jnp.where(live, v, 0.0)  # a stale NaN in a slot not attended stays out (p = 0 does not)
            for h in range(g):
                scores = jnp.sum(k * q[h][None], axis=-1, keepdims=True)  # [S, KV, 1]
                scores = scores / math.sqrt(k.shape[-1]) if scale is None else scores * scale
                if softcap:
                    scores = jnp.tanh(scores / softcap) * softcap
                scores = jnp.where(live, scores, _MASKED)
                m = m_ref[h]  # [KV, 1]
                m_new = jnp.maximum(m, jnp.max(scores, axis=0))
                alpha = jnp.exp(m - m_new)
                p = jnp.where(live, jnp.exp(scores - m_new[None]), 0.0)
                l_ref[h] = alpha * l_ref[h] + jnp.sum(p, axis=0)
                acc_ref[h] = alpha * acc_ref[h] + jnp.sum(p * v, axis=0)
                m_ref[h] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        l = l_ref[...]
        # l > 0 whenever pos >= 0 (the query sees itself); a negative pos gives zeros, not NaN.
        o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def _page_index(i: int, pages: int, page_size: int, table_pages: int, rows: int, first: int):
    """The index map of a block's i-th page: (replica, layer, page id, 0, 0, 0), the table
    entry clamped to the row's first and last pages (unchanged index: no copy). Grid row b is
    the step's row first + b (a call takes a run of rows); `rows` rows share a replica."""
    def index(b, j, table_ref, pos_ref, meta_ref):
        pos, window = pos_ref[b], meta_ref[1]
        lo = jnp.where(window > 0, jnp.maximum(pos - window + 1, 0), 0)
        # lax.div (truncating; every operand here is >= 0): `//` lowers through `sign`, which
        # Mosaic only lowers knowing the TPU it runs on, not when compiling for one elsewhere.
        last = lax.div(jnp.clip(pos, 0, table_pages * page_size - 1), page_size)
        entry = jnp.clip(j * pages + i, jnp.minimum(lax.div(lo, page_size), last), last)
        return lax.div(b + first, rows), meta_ref[0], table_ref[b * table_pages + entry], 0, 0, 0
    return index


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "pages_per_block", "interpret"))
def _paged_decode_attention(q, k_pages, v_pages, page_table, q_pos, layer, window, *, scale, softcap,
                            pages_per_block: int, interpret):
    b, _, h, d = q.shape
    r, _, _, s, kv, _ = k_pages.shape
    p = page_table.shape[1]
    g, c = h // kv, pages_per_block
    qg = q.reshape(b, kv, g, d).transpose(0, 2, 1, 3)  # [B, G, KV, D]: a head of the group is q_ref[h]
    table, pos = page_table.astype(jnp.int32), q_pos.reshape(b).astype(jnp.int32)
    meta = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(window, jnp.int32)])
    heads = pl.BlockSpec((None, g, kv, d), lambda i, j, *_: (i, 0, 0, 0))
    kernel = functools.partial(_kernel, page_size=s, pages=c, table_pages=p, scale=scale, softcap=softcap)
    per_call = max(1, _MAX_TABLE_ENTRIES // p)  # rows whose page tables fit SMEM at once
    outs = []
    for first in range(0, b, per_call):
        n = min(per_call, b - first)
        page_specs = [pl.BlockSpec((None, None, None, s, kv, d), _page_index(i, c, s, p, b // r, first))
                      for i in range(c)]
        outs.append(pl.pallas_call(
            kernel,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3, grid=(n, -(-p // c)), in_specs=[heads, *page_specs, *page_specs],
                out_specs=heads,
                scratch_shapes=[pltpu.VMEM((g, kv, 1), jnp.float32), pltpu.VMEM((g, kv, 1), jnp.float32),
                                pltpu.VMEM((g, kv, d), jnp.float32)]),
            out_shape=jax.ShapeDtypeStruct((n, g, kv, d), q.dtype),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
            interpret=interpret,
            name="paged_decode_attention_tpu",
        )(table[first:first + n].reshape(-1), pos[first:first + n], meta, qg[first:first + n],
          *([k_pages] * c), *([v_pages] * c)))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
    return out.transpose(0, 2, 1, 3).reshape(b, 1, h, d)


def paged_decode_attention(q, k_pages, v_pages, page_table, q_pos, layer=0, *, window=None, scale=None,
                           softcap=None, interpret=False) -> jax.Array:
    """Causal (optionally windowed, soft-capped) grouped-query decode attention over layer
    `layer` of the paged pool, as `graphs.attention.paged_attention` with T = 1 (layout: the
    module docstring of `graphs.pallas_attention`). `window`: None/0 or a static or traced int
    (0: full); `interpret`: run the kernel in Pallas interpret mode (CPU tests)."""
    if not supported(q, k_pages):
        raise ValueError(f"the TPU paged_decode_attention does not handle q {q.shape} {q.dtype} over a pool "
                         f"{k_pages.shape} {k_pages.dtype}; check supported() and use the reference")
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    s, p = k_pages.shape[3], page_table.shape[1]
    if p > _MAX_TABLE_ENTRIES:
        raise ValueError(f"a page table of {p} pages a row does not fit the kernel's SMEM budget "
                         f"({_MAX_TABLE_ENTRIES} entries): use larger pages or the reference")
    pages = min(_MAX_PAGES, max(1, _BLOCK_TOKENS // s), p)
    if window is None or (isinstance(window, int) and window <= 0):
        window = 0
    return _paged_decode_attention(q, k_pages, v_pages, page_table, q_pos, layer, window,
                                   scale=None if scale is None else float(scale),
                                   softcap=float(softcap) if softcap else None,
                                   pages_per_block=pages, interpret=interpret)
