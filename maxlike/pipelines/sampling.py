"""On-device token sampling: greedy, temperature, top-k, top-p, per-request seeds.

A draw is the Gumbel-max trick over the tokens a row allows: the token with the
largest logit / temperature + Gumbel noise. A row limited by top-k or top-p
takes each token's noise from fold_in(fold_in(PRNGKey(seed), position), token
id): it does not depend on which other tokens are looked at, so the row draws
the same token whichever path below computes it. A row with neither always
takes the same path, with noise drawn for the whole vocabulary at once from
fold_in(PRNGKey(seed), position). Either way a seeded row draws the same token
whatever batch it runs in.

Paths, picked on device per batch (`lax.cond`, one executable), so that the
vocabulary is sorted only when a row needs it:
- rows with neither top-k nor top-p draw over every token (no sort);
- the others draw among the CANDIDATES best tokens (`lax.top_k`) when their
  allowed set lies inside them: top_k <= CANDIDATES, or top-p alone whose
  nucleus those candidates already cover;
- otherwise (a larger top-k, a wider nucleus) the whole vocabulary is sorted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

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


CANDIDATES = 256  # best tokens looked at before sorting the whole vocabulary is needed


def sample(logits: jax.Array, params: SamplingInputs, positions: jax.Array) -> jax.Array:
    """logits [B, V]; positions [B] (the position the new token will take) -> tokens [B]."""
    b, vocab = logits.shape
    sampled = params.temperature > 0
    x = logits.astype(jnp.float32) / jnp.where(sampled, params.temperature, 1.0)[:, None]
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(params.seed, positions)
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)  # [B]
    top_p = params.top_p[:, None]
    whole = (k >= vocab) & (params.top_p >= 1.0)  # every token allowed
    c = min(CANDIDATES, vocab)

    def draw(vals, ids, allowed):
        """The allowed id with the largest vals + its own Gumbel noise (vals, ids, allowed [B, N])."""
        noise = jax.vmap(lambda key, row: jax.vmap(lambda t: jax.random.gumbel(jax.random.fold_in(key, t)))(row))(
            keys, ids)
        pick = jnp.argmax(jnp.where(allowed, vals + noise, -jnp.inf), axis=-1)
        return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]

    def nucleus(vals, rank, lse):
        """Allowed tokens among descending `vals`: within top-k, and the mass before them < top_p."""
        in_k = rank < k[:, None]
        probs = jnp.where(in_k, jnp.exp(vals - lse[:, None]), 0.0)
        return in_k & (jnp.cumsum(probs, axis=-1) - probs < top_p)  # the best token is always kept

    def limited_rows(_):
        # The candidates: top-k's mass is normalised over the top k, top-p alone's over the whole vocabulary.
        vals, ids = jax.lax.top_k(x, c)
        rank = jnp.arange(c)[None, :]
        lse = jnp.where(k <= c, jax.nn.logsumexp(jnp.where(rank < k[:, None], vals, -jnp.inf), axis=-1),
                        jax.nn.logsumexp(x, axis=-1))
        covered = (k <= c) | ((k >= vocab) & (jnp.sum(jnp.exp(vals - lse[:, None]), axis=-1) >= params.top_p))

        def by_candidates(_):
            return draw(vals, ids, nucleus(vals, rank, lse))

        def by_sort(_):
            sorted_vals, sorted_ids = jax.lax.top_k(x, vocab)
            full_rank = jnp.arange(vocab)[None, :]
            full_lse = jax.nn.logsumexp(jnp.where(full_rank < k[:, None], sorted_vals, -jnp.inf), axis=-1)
            return draw(sorted_vals, sorted_ids, nucleus(sorted_vals, full_rank, full_lse))

        return jax.lax.cond(jnp.any(sampled & ~whole & ~covered), by_sort, by_candidates, None)

    def every_token_rows(_):  # these rows always come here: bulk noise, no per-token keys needed
        return jax.vmap(lambda key, row: jnp.argmax(row + jax.random.gumbel(key, (vocab,))))(keys, x).astype(jnp.int32)

    def nothing(_):
        return jnp.zeros((b,), jnp.int32)

    limited = jax.lax.cond(jnp.any(sampled & ~whole), limited_rows, nothing, None)
    everything = jax.lax.cond(jnp.any(sampled & whole), every_token_rows, nothing, None)
    return jnp.where(sampled, jnp.where(whole, everything, limited), greedy(logits)).astype(jnp.int32)
