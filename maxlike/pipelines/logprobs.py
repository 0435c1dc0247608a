"""Log-probabilities of sampled (and, with echo, prompt) tokens, computed on device.

The top-n is bucketed (`serving.LOGPROB_BUCKETS`): every request's n is served
by one of a few executables, all compiled with the bucket set, and each row's
dicts are cut to its own n on the host.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from maxlike.engine.session import signature
from maxlike.interfaces import LogProbabilities
from maxlike.pipelines import sampling
from maxlike.pipelines.model import ReturnLogits
from maxlike.pipelines.serving import LOGPROB_BUCKETS, MAX_LOGPROBS, logprob_bucket


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


class LogProbsMixin:
    """DecoderPipelineModel's log-probabilities: MAX's `compute_log_probabilities` and its
    bucketed executables (`session`, `vocab_size`, `return_logits`, `pipeline_config`,
    `greedy_sampling` and `_replicated` come from the model)."""

    def compute_log_probabilities(self, session, model_inputs, model_outputs, next_tokens, batch_top_n, batch_echo,
                                  sampling_inputs=None):
        """MAX's semantics: top-n dicts always hold the sampled token; with echo, one entry
        per input token of this step (the log-prob of the token after it, the last being the
        sampled one). batch_top_n and batch_echo run over the rows of the inputs' arrays;
        top-n is at most MAX_LOGPROBS and computed by a bucketed executable. What the values
        are follows `logprobs_mode`; the processed modes read `sampling_inputs`, the sampler's
        inputs of this step (None: every row plain greedy)."""
        if not any(batch_top_n):
            return [None] * len(batch_top_n)
        if max(batch_top_n) > MAX_LOGPROBS or min(batch_top_n) < 0:
            raise ValueError(f"top-n log-probabilities must be in [0, {MAX_LOGPROBS}], got {max(batch_top_n)}.")
        with_echo = any(e and n for e, n in zip(batch_echo, batch_top_n))
        if with_echo and self.return_logits != ReturnLogits.ALL:
            raise ValueError("logprobs with echo need every prompt logit: build the model with ReturnLogits.ALL "
                             "(PipelineConfig(enable_echo=True)).")
        top_n = logprob_bucket(max(batch_top_n), self.vocab_size)
        extra = ()
        if self.logprobs_mode.startswith("processed"):
            extra = (sampling_inputs if sampling_inputs is not None else self.greedy_sampling(len(batch_top_n)),)
        if with_echo:
            args = (model_outputs.logits, model_inputs.tokens, model_inputs.logit_indices, next_tokens, *extra)
            results = self._logprobs_executable("echo_logprobs", echo, top_n, args)(*args)
            columns = [model_inputs.logit_counts[r] if e else 1 for r, e in enumerate(batch_echo)]
        else:
            args = (model_outputs.next_token_logits, next_tokens, *extra)
            results = self._logprobs_executable("logprobs", next_token, top_n, args)(*args)
            columns = [1] * len(batch_top_n)
        return assemble(results, list(batch_top_n), columns)

    @property
    def logprobs_mode(self) -> str:
        return self.pipeline_config.sampling.logprobs_mode

    def _logprob_buckets(self) -> list[int]:
        return sorted({logprob_bucket(n, self.vocab_size) for n in LOGPROB_BUCKETS})

    def _logprobs_executable(self, name: str, fn, top_n: int, args: tuple):
        """The mode is in the key: raw log-probs and raw logits have the same arguments."""
        return self.session.compile(f"{name}_top{top_n}", partial(fn, top_n, self.logprobs_mode), args,
                                    key=(self.logprobs_mode, signature(args)), out_shardings=self._replicated)
