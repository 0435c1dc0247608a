"""On-device token sampling: greedy, temperature, top-k, top-p, per-request seeds.

A draw is the Gumbel-max trick over the tokens a row allows: the token with the
largest logit / temperature + Gumbel noise. A row limited by top-k or top-p
takes each token's noise from fold_in(fold_in(PRNGKey(seed), position), token
id): it does not depend on which other tokens are looked at, so the row draws
the same token whichever path below computes it. A row with neither always
takes the same path, with noise drawn for the whole vocabulary at once from
fold_in(PRNGKey(seed), position). Either way a seeded row draws the same token
whatever batch it runs in.

Nothing sorts the vocabulary. The allowed set (the k best tokens, ties going to
the lower id as `lax.top_k` breaks them, then the smallest prefix of that ranking
whose mass before each token stays below top_p) is found by bisection over the
logits' bit patterns: counting and summing passes instead of a sort, which on
TPU took 10-15 s to compile per executable. Paths, picked on device per batch
(`lax.cond`, one executable):
- rows with neither top-k nor top-p draw over every token;
- the others draw among the CANDIDATES best tokens when their allowed set lies
  inside them: top_k <= CANDIDATES, or top-p alone whose nucleus those
  candidates already cover;
- otherwise (a larger top-k, a wider nucleus) over the whole vocabulary.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from maxlike.interfaces import SamplingParams


@struct.dataclass
class SamplingInputs:
    temperature: jax.Array  # [B] f32; 0 = greedy
    top_k: jax.Array  # [B] i32; <= 0 = whole vocabulary
    top_p: jax.Array  # [B] f32
    seed: jax.Array  # [B] u32

    @staticmethod
    def build(params: list[SamplingParams], seeds: list[int], rows: int) -> "SamplingInputs":
        pad = rows - len(params)
        greedy = [0.0 if p.greedy else p.temperature for p in params] + [0.0] * pad
        return SamplingInputs(
            temperature=np.asarray(greedy, np.float32),
            top_k=np.asarray([p.top_k for p in params] + [1] * pad, np.int32),
            top_p=np.asarray([p.top_p for p in params] + [1.0] * pad, np.float32),
            seed=np.asarray(list(seeds) + [0] * pad, np.uint32),
        )


    @staticmethod
    def abstract(rows: int) -> "SamplingInputs":
        """Shapes and dtypes only (for compiling without data)."""
        sds = jax.ShapeDtypeStruct
        return SamplingInputs(temperature=sds((rows,), np.dtype(np.float32)), top_k=sds((rows,), np.dtype(np.int32)),
                              top_p=sds((rows,), np.dtype(np.float32)), seed=sds((rows,), np.dtype(np.uint32)))


def greedy(logits: jax.Array) -> jax.Array:
    """logits [B, V] -> tokens [B]."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# Best tokens looked at before the whole vocabulary is needed. `lax.top_k` up to 64 compiles in
# 0.3 s for TPU; 128 and more became a sort (5-11 s).
CANDIDATES = 64


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 [..., N] -> uint32 keys in the floats' order (bisection runs over these)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _max_key_where(keys: jax.Array, holds) -> jax.Array:
    """The largest uint32 m per row with holds(m [B, 1]) -> [B] true, for a predicate that holds
    for every m up to some point (built bit by bit from the top: 32 passes, no sort)."""
    def step(i, m):  # a loop, not unrolled: one small body to compile
        candidate = m | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(holds(candidate[:, None])[:, 0], candidate, m)

    return jax.lax.fori_loop(0, 32, step, jnp.zeros(keys.shape[:1], jnp.uint32))


def _first_of_ties(tied: jax.Array, room: jax.Array) -> jax.Array:
    """The first `room` [B] (by position) of the tokens marked `tied` [B, N]: a bisection over
    positions (a cumulative sum over the vocabulary took TPU 4 s to compile)."""
    n = tied.shape[-1]
    where = jnp.arange(n, dtype=jnp.int32)
    top = n.bit_length()

    def step(i, end):  # the largest end with at most `room` tied before it, bit by bit
        candidate = end + (jnp.int32(1) << (top - i))
        fits = (candidate <= n) & (jnp.sum(tied & (where < candidate[:, None]), axis=-1) <= room)
        return jnp.where(fits, candidate, end)

    end = jax.lax.fori_loop(0, top + 1, step, jnp.zeros(tied.shape[:1], jnp.int32))
    return tied & (where < end[:, None])


def top_k_mask(keys: jax.Array, k: jax.Array) -> jax.Array:
    """keys [B, N] (`_order_keys`), k [B] in [1, N] -> the k best [B, N], ties to the lower position."""
    kth = _max_key_where(keys, lambda m: jnp.sum(keys >= m, axis=-1, keepdims=True) >= k[:, None])
    above = keys > kth[:, None]
    return above | _first_of_ties(keys == kth[:, None], k - jnp.sum(above, axis=-1))


def nucleus_mask(keys: jax.Array, probs: jax.Array, allowed: jax.Array, top_p: jax.Array) -> jax.Array:
    """Among `allowed` [B, N] ranked by keys (ties: lower position first), those whose mass before
    them (probs [B, N], over the allowed tokens) is below top_p [B] (so the best one always stays)."""
    probs = jnp.where(allowed, probs, 0.0)

    def mass_above(m):  # [B, 1] -> [B, 1]
        return jnp.sum(jnp.where(keys > m, probs, 0.0), axis=-1, keepdims=True)

    # Every token strictly above `cut` has less than top_p before it; the lowest of them may be a
    # run of equal logits (each with mass q) of which only the first ceil((top_p - before) / q) fit.
    cut = _max_key_where(keys, lambda m: mass_above(m) >= top_p[:, None])
    floor = jnp.min(jnp.where(allowed & (keys > cut[:, None]), keys, jnp.uint32(0xFFFFFFFF)), axis=-1)
    tied = allowed & (keys == floor[:, None])
    q = jnp.max(jnp.where(tied, probs, 0.0), axis=-1)
    room = jnp.ceil((top_p - mass_above(floor[:, None])[:, 0]) / jnp.maximum(q, jnp.finfo(jnp.float32).tiny))
    room = jnp.clip(room, 1, tied.shape[-1]).astype(jnp.int32)  # the floor's first token always fits
    return allowed & ((keys > floor[:, None]) | _first_of_ties(tied, room))


def sample(logits: jax.Array, params: SamplingInputs, positions: jax.Array) -> jax.Array:
    """logits [B, V]; positions [B] (the position the new token will take) -> tokens [B]."""
    b, vocab = logits.shape
    sampled = params.temperature > 0
    x = logits.astype(jnp.float32) / jnp.where(sampled, params.temperature, 1.0)[:, None]
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(params.seed, positions)
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)  # [B]
    whole = (k >= vocab) & (params.top_p >= 1.0)  # every token allowed
    c = min(CANDIDATES, vocab)

    def draw(vals, ids, allowed):
        """The allowed id with the largest vals + its own Gumbel noise (vals, ids, allowed [B, N])."""
        noise = jax.vmap(lambda key, row: jax.vmap(lambda t: jax.random.gumbel(jax.random.fold_in(key, t)))(row))(
            keys, ids)
        pick = jnp.argmax(jnp.where(allowed, vals + noise, -jnp.inf), axis=-1)
        return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]

    def limited_rows(_):
        vals, ids = jax.lax.top_k(x, c)  # [B, c], ties to the lower id (as every mask here breaks them)
        vals_order = _order_keys(vals)
        in_k = top_k_mask(vals_order, jnp.minimum(k, c))  # the global top k when k <= c
        # Top-k's mass is normalised over the top k, top-p alone's over the whole vocabulary.
        lse = jnp.where(k <= c, jax.nn.logsumexp(jnp.where(in_k, vals, -jnp.inf), axis=-1),
                        jax.nn.logsumexp(x, axis=-1))
        probs = jnp.exp(vals - lse[:, None])
        covered = (k <= c) | ((k >= vocab) & (jnp.sum(probs, axis=-1) >= params.top_p))

        def by_candidates(_):
            return draw(vals, ids, nucleus_mask(vals_order, probs, in_k, params.top_p))

        def by_vocabulary(_):
            order = _order_keys(x)
            every_k = top_k_mask(order, k)
            every_lse = jax.nn.logsumexp(jnp.where(every_k, x, -jnp.inf), axis=-1)
            allowed = nucleus_mask(order, jnp.exp(x - every_lse[:, None]), every_k, params.top_p)
            return draw(x, jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), (b, vocab)), allowed)

        return jax.lax.cond(jnp.any(sampled & ~whole & ~covered), by_vocabulary, by_candidates, None)

    def every_token_rows(_):  # these rows always come here: bulk noise, no per-token keys needed
        return jax.vmap(lambda key, row: jnp.argmax(row + jax.random.gumbel(key, (vocab,))))(keys, x).astype(jnp.int32)

    def nothing(_):
        return jnp.zeros((b,), jnp.int32)

    limited = jax.lax.cond(jnp.any(sampled & ~whole), limited_rows, nothing, None)
    everything = jax.lax.cond(jnp.any(sampled & whole), every_token_rows, nothing, None)
    return jnp.where(sampled, jnp.where(whole, everything, limited), greedy(logits)).astype(jnp.int32)


def sampler_for(mesh) -> Callable:
    """`sample` for step outputs whose rows are split over the mesh's data axis: each replica
    samples its own rows (`shard_map`; rows are independent). Left to the partitioner, the
    split rows made TPU compile the sampler in 9.7 s instead of 4.0."""
    if mesh.shape["data"] == 1:
        return sample
    rows = PartitionSpec("data")
    return jax.shard_map(sample, mesh=mesh, in_specs=(rows, rows, rows), out_specs=rows, check_vma=False)
