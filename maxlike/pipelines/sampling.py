"""On-device token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Each request's key is fold_in(PRNGKey(seed), position), so a sampled request
draws the same tokens whatever batch it runs in.
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


def sample(logits: jax.Array, params: SamplingInputs, positions: jax.Array) -> jax.Array:
    """logits [B, V]; positions [B] (the position the new token will take) -> tokens [B]."""
    vocab = logits.shape[-1]
    temp = jnp.where(params.temperature > 0, params.temperature, 1.0)
    vals, idx = jax.lax.top_k(logits.astype(jnp.float32) / temp[:, None], vocab)  # sorted, descending
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(params.top_k > 0, params.top_k, vocab)[:, None]
    vals = jnp.where(rank < k, vals, -jnp.inf)
    probs = jax.nn.softmax(vals, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    vals = jnp.where(mass_before < params.top_p[:, None], vals, -jnp.inf)  # rank 0 always kept
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(params.seed, positions)
    choice = jax.vmap(jax.random.categorical)(keys, vals)
    drawn = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    return jnp.where(params.temperature > 0, drawn, greedy(logits)).astype(jnp.int32)
