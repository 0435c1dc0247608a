"""Decode attention over the paged KV pool as a Pallas kernel: the GPU (Triton) path.

Same contract as `graphs.attention.paged_attention` for a decode step (one query token per
row), and `graphs.attention._attend` is its plain-XLA reference (the tests compare the two in
Pallas interpret mode on CPU):

    q           [B, 1, H, D]   one token per row; H query heads in KV groups of G = H / KV
    k_pages     [R, L, N, S, KV, D]   (v_pages alike) R data-parallel replicas (row b uses
                                replica b // (B / R)), L layers (`layer` a static or traced
                                index), N pages of S tokens, KV heads of dim D
    page_table  [B, P] int32   page ids within the row's replica (0: the null page)
    q_pos       [B, 1] int32   the query's absolute position; keys 0..q_pos are attended,
                                and with `window` w > 0 only the last w of them
    -> out      [B, 1, H, D]   in q's dtype (scores and softmax in float32)

Kernel: one program per (row, KV head, split). It loads the G query heads of its group as
one [G, D] block once, then walks only the chunks of the row's own pages (ceil((q_pos+1)/S)
pages, starting at the page holding the window's first key), `pages_per_block` pages a step:
each step reads those pages' page ids from the table and loads their [S, D] slices for this
KV head straight out of the pool (a masked pointer gather: no copy of the pool, no gather
of the table into a new array), and folds them into a float32 online softmax (running max,
running sum, unnormalised output). With one split the kernel normalises and writes the
output; with several (flash-decoding, for few rows x heads over long contexts) each split
takes a contiguous run of the table's chunks and a small XLA combine pass merges their
(output, max, sum) triples.

`supported(q, k_pages)` says whether the kernel handles the shapes; callers fall back to
`graphs.attention.paged_attention` otherwise.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_MASKED = float(jnp.finfo(jnp.float32).min)  # the reference's mask value (finite: no inf - inf)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MIN_DOT = 16  # Triton's tl.dot wants every dimension >= 16
_BLOCK_TOKENS = 64  # keys per loop step (pages_per_block = 64 / S, at least one page)
_TARGET_PROGRAMS = 128  # split the pages until rows x KV heads x splits reaches about this
_MIN_SPLIT_BLOCKS = 4  # ... but give each split at least this many loop steps


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(q, k_pages) -> bool:
    """Whether `paged_decode_attention` handles these shapes and dtypes (else use the reference).

    Needs a decode step (T = 1), q and the pool in the same float32/bfloat16/float16 dtype,
    H a multiple of KV, B a multiple of R, and head dim D and page size S powers of two
    (Triton block shapes), D >= 16 (tl.dot).
    """
    if q.ndim != 4 or k_pages.ndim != 6:
        return False
    b, t, h, d = q.shape
    r, _, _, s, kv, dk = k_pages.shape
    return (t == 1 and d == dk and h % kv == 0 and b % r == 0
            and jnp.dtype(q.dtype) in _DTYPES and jnp.dtype(k_pages.dtype) == jnp.dtype(q.dtype)
            and _pow2(d) and d >= _MIN_DOT and _pow2(s) and h // kv <= 128)  # G <= 128: registers


def _kernel(meta_ref, pos_ref, table_ref, q_ref, k_ref, v_ref, *out_refs,
            page_size: int, pages_per_block: int, blocks_per_split: int, table_pages: int,
            scale: float | None, softcap: float | None, split: bool):
    # meta_ref [2] (layer, window); pos_ref [] this row's q_pos; table_ref [P'] this row's
    # page ids (P' padded to whole blocks with null pages); q_ref [G', D] this group's heads;
    # k_ref/v_ref [L, N, S, D]: this row's replica and this program's KV head of the pool.
    s, c = page_size, pages_per_block
    bk = c * s  # keys a step
    g, d = q_ref.shape
    layer, window = meta_ref[0], meta_ref[1]
    pos = pos_ref[...]
    n_keys = jnp.clip(pos + 1, 0, table_pages * s)  # keys [lo, n_keys) are attended
    lo = jnp.where(window > 0, jnp.maximum(pos - window + 1, 0), 0)
    j = pl.program_id(2)
    first = jnp.maximum(lo // bk, j * blocks_per_split)  # only the blocks holding the row's keys
    stop = jnp.minimum(pl.cdiv(n_keys, bk), (j + 1) * blocks_per_split)

    q = q_ref[...]
    exact = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None  # no TF32 for float32

    def step(i, carry):
        o, m, l = carry
        pages = table_ref[pl.ds(i * c, c)]  # [c] page ids
        at = i * bk
        # Key positions of the step as [c, S, 1] (for the loads) and [G', bk] (for the scores).
        tok3 = at + lax.broadcasted_iota(jnp.int32, (c, s, 1), 0) * s + lax.broadcasted_iota(jnp.int32, (c, s, 1), 1)
        live3 = jnp.broadcast_to((tok3 >= lo) & (tok3 < n_keys), (c, s, d))
        # Keys outside the row's range are not read (0 instead): no traffic, no stale NaNs.
        # A pure integer-index gather ([c, S, D] offsets): Triton turns it into one pointer
        # tensor; interpret mode's masked load takes integer indices or slices, not both.
        idx = (layer, jnp.broadcast_to(pages[:, None, None], (c, s, d)),
               lax.broadcasted_iota(jnp.int32, (c, s, d), 1), lax.broadcasted_iota(jnp.int32, (c, s, d), 2))
        k = plgpu.load(k_ref.at[idx], mask=live3, other=0).reshape(bk, d)
        v = plgpu.load(v_ref.at[idx], mask=live3, other=0).reshape(bk, d)
        scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=exact,
                                 preferred_element_type=jnp.float32)  # [G', bk]
        scores = scores / math.sqrt(d) if scale is None else scores * scale
        if softcap:
            scores = jnp.tanh(scores / softcap) * softcap
        tok = at + lax.broadcasted_iota(jnp.int32, (g, bk), 1)
        live = (tok >= lo) & (tok < n_keys)
        scores = jnp.where(live, scores, _MASKED)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        alpha = jnp.exp(m - m_new)
        # (Masking p too only matters for a step with no live key, which the bounds rule out.)
        p = jnp.where(live, jnp.exp(scores - m_new[:, None]), 0.0)
        l = alpha * l + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=exact,
                             preferred_element_type=jnp.float32)  # [G', D]
        return alpha[:, None] * o + pv, m_new, l

    init = (jnp.zeros((g, d), jnp.float32), jnp.full((g,), _MASKED, jnp.float32), jnp.zeros((g,), jnp.float32))
    o, m, l = lax.fori_loop(first, stop, step, init)
    if split:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l
    else:
        (o_ref,) = out_refs
        # l > 0 whenever pos >= 0 (the query sees itself); a negative pos gives zeros, not NaN.
        o_ref[...] = (o / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


def _heuristics(b: int, kv: int, s: int, p: int) -> tuple[int, int]:
    """(pages_per_block, splits) for B rows x KV heads over a P-page table of S-token pages."""
    c = max(1, _BLOCK_TOKENS // s, -(-_MIN_DOT // s))
    blocks = -(-p // c)
    splits = min(-(-_TARGET_PROGRAMS // (b * kv)), max(1, blocks // _MIN_SPLIT_BLOCKS))
    return c, max(1, splits)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "pages_per_block", "splits", "interpret"))
def _paged_decode_attention(q, k_pages, v_pages, page_table, q_pos, layer, window, *, scale, softcap,
                            pages_per_block: int, splits: int, interpret: bool):
    b, _, h, d = q.shape
    r, nl, n, s, kv, _ = k_pages.shape
    p = page_table.shape[1]
    g = h // kv
    c = pages_per_block
    if c * s < _MIN_DOT:
        raise ValueError(f"pages_per_block x page size = {c * s} keys a step: Triton's dot needs >= {_MIN_DOT}")
    if not _pow2(c):
        raise ValueError(f"pages_per_block={c} must be a power of two")
    blocks = -(-p // c)
    per_split = -(-blocks // splits)
    rows = b // r  # rows per replica
    # Padding, all of it small and outside the pool: the group's heads to a power of two >= 16
    # (tl.dot and Triton block shapes; the extra heads are zeros, cut off below), the table to
    # whole blocks for every split (null pages, never read: their keys lie past the row's end).
    gp = max(_MIN_DOT, 1 << (g - 1).bit_length())
    qg = q.reshape(b, kv, g, d)
    if gp != g:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    table = page_table.astype(jnp.int32)
    if splits * per_split * c != p:
        table = jnp.pad(table, ((0, 0), (0, splits * per_split * c - p)))
    meta = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(window, jnp.int32)])
    pos = q_pos.reshape(b).astype(jnp.int32)

    kernel = functools.partial(_kernel, page_size=s, pages_per_block=c, blocks_per_split=per_split,
                               table_pages=p, scale=scale, softcap=softcap, split=splits > 1)
    pool_spec = pl.BlockSpec((None, nl, n, s, None, d), lambda i, k, j: (i // rows, 0, 0, 0, k, 0))
    in_specs = [
        pl.BlockSpec((2,), lambda i, k, j: (0,)),  # meta
        pl.BlockSpec((None,), lambda i, k, j: (i,)),  # q_pos
        pl.BlockSpec((None, table.shape[1]), lambda i, k, j: (i, 0)),  # page table
        pl.BlockSpec((None, None, gp, d), lambda i, k, j: (i, k, 0, 0)),  # q
        pool_spec,  # k_pages
        pool_spec,  # v_pages
    ]
    if splits > 1:
        out_shape = [jax.ShapeDtypeStruct((b, kv, splits, gp, d), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv, splits, gp), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv, splits, gp), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, gp, d), lambda i, k, j: (i, k, j, 0, 0)),
                     pl.BlockSpec((None, None, None, gp), lambda i, k, j: (i, k, j, 0)),
                     pl.BlockSpec((None, None, None, gp), lambda i, k, j: (i, k, j, 0))]
    else:
        out_shape = [jax.ShapeDtypeStruct((b, kv, gp, d), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, gp, d), lambda i, k, j: (i, k, 0, 0))]
    outs = pl.pallas_call(
        kernel,
        grid=(b, kv, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="paged_decode_attention",
    )(meta, pos, table, qg, k_pages, v_pages)
    if splits > 1:  # flash-decoding's combine: rescale each split to the common max
        o, m, l = outs
        m_all = jnp.max(m, axis=2, keepdims=True)
        w = jnp.exp(m - m_all)  # an empty split: m = finfo.min, w = 0
        l_all = jnp.sum(w * l, axis=2)
        out = jnp.sum(w[..., None] * o, axis=2) / jnp.where(l_all > 0, l_all, 1.0)[..., None]
        out = out.astype(q.dtype)
    else:
        (out,) = outs
    return out[:, :, :g].reshape(b, 1, h, d)


def paged_decode_attention(q, k_pages, v_pages, page_table, q_pos, layer=0, *, window=None, scale=None,
                           softcap=None, interpret=False) -> jax.Array:
    """Causal (optionally windowed, soft-capped) grouped-query decode attention over layer
    `layer` of the paged pool, as `graphs.attention.paged_attention` with T = 1 (see the module
    docstring for the layout). `window`: None/0 or a static or traced int (0: full);
    `interpret`: run the kernel in Pallas interpret mode (CPU tests)."""
    if not supported(q, k_pages):
        raise ValueError(f"paged_decode_attention does not handle q {q.shape} {q.dtype} over a pool "
                         f"{k_pages.shape} {k_pages.dtype}; check supported() and use the reference")
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    b, _, _, _ = q.shape
    s, kv = k_pages.shape[3], k_pages.shape[4]
    c, splits = _heuristics(b, kv, s, page_table.shape[1])
    if window is None or (isinstance(window, int) and window <= 0):
        window = 0
    return _paged_decode_attention(q, k_pages, v_pages, page_table, q_pos, layer, window,
                                   scale=None if scale is None else float(scale),
                                   softcap=float(softcap) if softcap else None,
                                   pages_per_block=c, splits=splits, interpret=interpret)
