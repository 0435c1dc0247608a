"""Log-probabilities of sampled (and, with echo, prompt) tokens, computed on device.

The top-n is bucketed (`serving.LOGPROB_BUCKETS`): every request's n is served
by one of a few executables, all compiled with the bucket set, and each row's
dicts are cut to its own n on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maxlike.interfaces import LogProbabilities
from maxlike.pipelines import sampling


def _top(top_n: int, mode: str, logits: jax.Array, targets: jax.Array):
    """logits [B, N, V]; targets [B, N] -> (targets, their scores [B, N], top values and ids [B, N, top_n]),
    the scores being log-probs or (*_logits modes) the logits."""
    lp = logits.astype(jnp.float32)
    if not mode.endswith("_logits"):
        lp = jax.nn.log_softmax(lp, axis=-1)
    chosen = jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    # top_k over a 2-D [B*N, V]: on TPU a 3-D one compiled to a sort (12 s against 0.4 s).
    top_vals, top_ids = jax.lax.top_k(lp.reshape(-1, lp.shape[-1]), top_n)
    return targets, chosen, top_vals.reshape(*lp.shape[:-1], top_n), top_ids.reshape(*lp.shape[:-1], top_n)


def next_token(top_n: int, mode: str, logits: jax.Array, next_tokens: jax.Array, params=None):
    """The sampled tokens' log-probs: logits [B, V], next_tokens [B] -> one column. `params`
    (SamplingInputs, before the draw) for the processed modes."""
    if params is not None:
        logits = sampling.processed(logits, params, next_tokens)
    return _top(top_n, mode, logits[:, None, :], next_tokens[:, None])


def echo(top_n: int, mode: str, logits: jax.Array, tokens: jax.Array, logit_indices: jax.Array,
         next_tokens: jax.Array, params=None):
    """Every returned position's log-prob of the token after it (the sampled one after the last):
    logits [B, N, V] at the right-aligned input positions `logit_indices` [B, N] of tokens [B, T]."""
    following = jnp.take_along_axis(tokens, jnp.minimum(logit_indices + 1, tokens.shape[1] - 1), axis=1)
    logits = logits.astype(jnp.float32)
    if params is not None:
        logits = logits.at[:, -1].set(sampling.processed(logits[:, -1], params, next_tokens))
    return _top(top_n, mode, logits, following.at[:, -1].set(next_tokens))


def assemble(results, batch_top_n: list[int], columns: list[int]) -> list[LogProbabilities | None]:
    """Host-side: each row's last `columns[r]` positions as LogProbabilities, its top dicts cut to
    its own n (and always holding the chosen token); None where top_n is 0."""
    targets, chosen, top_vals, top_ids = (np.asarray(x) for x in jax.device_get(results))
    out: list[LogProbabilities | None] = []
    for r, n in enumerate(batch_top_n):
        if n == 0:
            out.append(None)
            continue
        token_lp, top_lp = [], []
        for c in range(chosen.shape[1] - columns[r], chosen.shape[1]):
            token_lp.append(float(chosen[r, c]))
            top = {int(top_ids[r, c, j]): float(top_vals[r, c, j]) for j in range(min(n, top_ids.shape[-1]))}
            top[int(targets[r, c])] = float(chosen[r, c])
            top_lp.append(top)
        out.append(LogProbabilities(token_lp, top_lp))
    return out
