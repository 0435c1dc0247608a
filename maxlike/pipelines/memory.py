"""Sizes from shapes: weights, activations, KV pages, buckets."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def resolve_dtype(name: str, platform: str) -> jnp.dtype:
    """"auto" is float32 on CPU (XLA:CPU has no fast bf16 matmul) and bfloat16 elsewhere."""
    if name == "auto":
        name = "float32" if platform == "cpu" else "bfloat16"
    return jnp.dtype(name)


def weights_bytes(specs: dict, dtype) -> int:
    """Bytes of the weights `specs` describes; `dtype` one dtype, or a function of the name."""
    of = dtype if callable(dtype) and not isinstance(dtype, type) else (lambda _: dtype)
    return sum(int(np.prod(s.shape)) * jnp.dtype(of(name)).itemsize for name, s in specs.items())


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def bucket(n: int, minimum: int, maximum: int) -> int:
    """The smallest power of two >= n (at least `minimum`), capped at `maximum`'s bucket."""
    return min(max(next_pow2(n), minimum), next_pow2(maximum))


def activation_bytes(
    *, batch: int, tokens: int, context: int, hidden: int, q_heads: int, kv_width: int, intermediate: int,
    vocab: int, logits_rows: int, itemsize: int, score_buffers: int = 2,
) -> int:
    """Peak temporaries of one step of the reference (plain-XLA) decoder.

    `score_buffers` buffers of attention scores [B, H, T, L] in fp32 (L = `context`, the
    keys attended at once: the scores and the probabilities), the gathered keys and values
    [B, L, KV x D] (`kv_width` = KV x D), the MLP's gate/up products, the residual stream,
    and the logits [B, N, V] in fp32.
    """
    scores = score_buffers * batch * q_heads * tokens * context * 4
    kv_gather = 2 * batch * context * kv_width * itemsize
    mlp = 3 * batch * tokens * intermediate * itemsize
    residual = 4 * batch * tokens * hidden * itemsize
    logits = batch * logits_rows * vocab * 4
    return scores + kv_gather + mlp + residual + logits
