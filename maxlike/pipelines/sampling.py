"""On-device token sampling: greedy, temperature, top-k, top-p, per-request seeds.

A draw is the Gumbel-max trick over the tokens a row allows: the token with the
largest logit / temperature + Gumbel noise. Each token's noise is a hash of the
row's seed, the position the new token takes and the token id (murmur3's 32-bit
finaliser, 24 bits of it as the uniform): it does not depend on which other
tokens are looked at, so a row draws the same token whichever path below
computes it, and a seeded row the same token whatever batch it runs in. (A hash,
not jax.random's threefry: that took most of the sampler's compile time, in
every decode-loop executable.)

The vocabulary is never sorted. Paths, picked on device per batch (`lax.cond`,
one executable):
- rows with neither top-k nor top-p draw over every token;
- the others draw among the CANDIDATES best tokens (`lax.top_k`; 64 on TPU) when their
  allowed set lies inside them: top_k <= CANDIDATES, or top-p alone whose
  nucleus those candidates already cover;
- otherwise (a larger top-k, a wider nucleus) over the whole vocabulary, the
  allowed set (the k best, ties to the lower id as `lax.top_k` breaks them, then
  the smallest prefix of that ranking whose mass before each token stays below
  top_p) found by bisection over the logits' bit patterns: counting and summing
  passes instead of a sort, which took TPU 10-15 s to compile.
min-p then keeps, of a row's allowed set, the tokens within log(min_p) of its best
logit (after temperature), as HF applies it after top-k and top-p.

Before all that, logit processors change the logits of the rows that ask (`process`,
skipped by one `lax.cond` when no row does): the token bitmask of structured output
(filled on the host each step, maxlike.pipelines.structured), a sparse logit bias, the
ban on stop ids until `min_new_tokens`, and the repetition / frequency / presence penalties. The
penalties read `history` [B, V]: 2 x (times the token was generated) + (1 if the prompt
holds it), kept on the device and advanced by every sampled token (`advance`), so a
multi-step decode loop and the block after it need nothing from the host.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from maxlike.interfaces import MAX_LOGIT_BIAS, SamplingParams


@struct.dataclass
class SamplingInputs:
    temperature: jax.Array  # [B] f32; 0 = greedy
    top_k: jax.Array  # [B] i32; <= 0 = whole vocabulary
    top_p: jax.Array  # [B] f32
    seed: jax.Array  # [B] u32
    min_p: jax.Array  # [B] f32; 0 = off
    repetition: jax.Array  # [B] f32; 1 = off
    frequency: jax.Array  # [B] f32
    presence: jax.Array  # [B] f32
    bias_ids: jax.Array  # [B, MAX_LOGIT_BIAS] i32 (padding: token 0 with bias 0)
    bias: jax.Array  # [B, MAX_LOGIT_BIAS] f32
    min_left: jax.Array  # [B] i32: tokens still to make before `banned` may be sampled
    banned: jax.Array  # [B, stop_slots] i32: the row's stop ids (-1 padded)
    history: jax.Array  # [B, V] i32: 2 x generated count + in-prompt bit (penalised rows only)
    allowed: jax.Array  # [B, ceil(V / 32)] i32: bit v of a row set = token v allowed (structured output)

    @staticmethod
    def build(params: list[SamplingParams], seeds: list[int], rows: int, *, vocab: int, stop_slots: int,
              contexts: list | None = None, stops: list | None = None) -> "SamplingInputs":
        """Rows past len(params) are padding (greedy, nothing applied). contexts (TextContext per
        row) and stops (each row's stop ids) feed the penalties and min_new_tokens."""
        pad = rows - len(params)
        f32 = lambda values, fill: np.asarray(list(values) + [fill] * pad, np.float32)  # noqa: E731
        bias_ids = np.zeros((rows, MAX_LOGIT_BIAS), np.int32)
        bias = np.zeros((rows, MAX_LOGIT_BIAS), np.float32)
        min_left = np.zeros((rows,), np.int32)
        banned = np.full((rows, stop_slots), -1, np.int32)
        history = np.zeros((rows, vocab), np.int32)
        for i, p in enumerate(params):
            if p.logit_bias:
                bias_ids[i, : len(p.logit_bias)] = list(p.logit_bias)
                bias[i, : len(p.logit_bias)] = list(p.logit_bias.values())
            ctx = contexts[i] if contexts is not None else None
            if ctx is None:
                continue
            if p.min_new_tokens > len(ctx.generated):
                min_left[i] = p.min_new_tokens - len(ctx.generated)
                ids = sorted(stops[i])[:stop_slots]
                banned[i, : len(ids)] = ids
            if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
                history[i, np.unique(ctx.tokens[: ctx.prompt_length])] = 1
                history[i] += 2 * np.bincount(ctx.generated, minlength=vocab)[:vocab].astype(np.int32)
        return SamplingInputs(
            temperature=f32([0.0 if p.greedy else p.temperature for p in params], 0.0),
            top_k=np.asarray([p.top_k for p in params] + [1] * pad, np.int32),
            top_p=f32([p.top_p for p in params], 1.0),
            seed=np.asarray(list(seeds) + [0] * pad, np.uint32),
            min_p=f32([p.min_p for p in params], 0.0),
            repetition=f32([p.repetition_penalty for p in params], 1.0),
            frequency=f32([p.frequency_penalty for p in params], 0.0),
            presence=f32([p.presence_penalty for p in params], 0.0),
            bias_ids=bias_ids, bias=bias, min_left=min_left, banned=banned, history=history,
            allowed=np.full((rows, (vocab + 31) // 32), -1, np.int32),
        )

    @staticmethod
    def abstract(rows: int, vocab: int, stop_slots: int) -> "SamplingInputs":
        """Shapes and dtypes only (for compiling without data)."""
        built = SamplingInputs.build([], [], rows, vocab=vocab, stop_slots=stop_slots)
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), built)


def greedy(logits: jax.Array) -> jax.Array:
    """logits [B, V] -> tokens [B]."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# Best tokens looked at before the whole vocabulary is needed. For TPU `lax.top_k` up to 64
# compiled in 0.3 s, 128 and more became a sort (5-11 s); elsewhere 256 costs little.
CANDIDATES = 256
TPU_CANDIDATES = 64


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


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: every input bit flips about half the output bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel_noise(seed: jax.Array, positions: jax.Array, ids: jax.Array) -> jax.Array:
    """seed [B] u32, positions [B], ids [B, N] -> standard Gumbel noise [B, N], a pure function
    of (seed, position, token id)."""
    row = _mix(_mix(seed.astype(jnp.uint32)) + positions.astype(jnp.uint32) * jnp.uint32(0x9E3779B1))
    h = _mix(row[:, None] ^ _mix(ids.astype(jnp.uint32) * jnp.uint32(0x27D4EB2F) + jnp.uint32(0x165667B1)))
    u = (h >> 8).astype(jnp.float32) * (2.0**-24) + 2.0**-25  # in (0, 1)
    return -jnp.log(-jnp.log(u))


def processing(params: SamplingInputs) -> jax.Array:
    """True when some row's logits are changed by a processor (then `process` runs)."""
    return (jnp.any(params.bias != 0) | jnp.any(params.min_left > 0) | jnp.any(params.repetition != 1.0)
            | jnp.any(params.frequency != 0.0) | jnp.any(params.presence != 0.0) | jnp.any(params.allowed != -1))


def process(logits: jax.Array, params: SamplingInputs) -> jax.Array:
    """The logit processors, in SamplingParams' order: a structured-output mask, bias,
    min_new_tokens' ban on stop ids, repetition penalty (HF's), frequency and presence penalties
    (OpenAI's). logits [B, V] f32."""
    b, vocab = logits.shape
    rows = jnp.arange(b)[:, None]
    ids = jnp.arange(vocab, dtype=jnp.int32)
    bits = jnp.right_shift(params.allowed[:, ids // 32], ids % 32) & 1  # [B, V]
    x = jnp.where(bits == 1, logits, -jnp.inf).at[rows, params.bias_ids].add(params.bias)
    ban = (params.min_left[:, None] > 0) & (params.banned >= 0)
    x = x.at[rows, jnp.where(ban, params.banned, vocab)].set(-jnp.inf, mode="drop")
    seen = params.history > 0
    rep = params.repetition[:, None]
    x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
    count = (params.history >> 1).astype(jnp.float32)
    return x - count * params.frequency[:, None] - (count > 0) * params.presence[:, None]


def advance(params: SamplingInputs, tokens: jax.Array) -> SamplingInputs:
    """The state after each row sampled `tokens` [B]: one more of that token in its history,
    one fewer token to make before its stop ids may come."""
    b = tokens.shape[0]
    return params.replace(history=params.history.at[jnp.arange(b), tokens].add(2, mode="drop"),
                          min_left=jnp.maximum(params.min_left - 1, 0))


def sample(logits: jax.Array, params: SamplingInputs, positions: jax.Array,
           candidates: int = CANDIDATES) -> tuple[jax.Array, SamplingInputs]:
    """logits [B, V]; positions [B] (the position the new token will take) -> (tokens [B],
    the sampling state after them)."""
    logits = logits.astype(jnp.float32)
    logits = jax.lax.cond(processing(params), process, lambda x, _: x, logits, params)
    tokens = _draw_tokens(logits, params, positions, candidates)
    return tokens, advance(params, tokens)


def _tempered(logits: jax.Array, params: SamplingInputs):
    """(logits / temperature for sampled rows, the min-p floor [B] (-inf when off), top-k [B] in [1, V])."""
    vocab = logits.shape[-1]
    x = logits / jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    floor = jnp.max(x, axis=-1) + jnp.log(params.min_p)
    return x, floor, jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)


def _truncated(x: jax.Array, k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The tokens top-k then top-p keep, over the whole vocabulary: x [B, V] -> [B, V] bool."""
    order = _order_keys(x)
    in_k = top_k_mask(order, k)
    lse = jax.nn.logsumexp(jnp.where(in_k, x, -jnp.inf), axis=-1)
    return nucleus_mask(order, jnp.exp(x - lse[:, None]), in_k, top_p)


def processed(logits: jax.Array, params: SamplingInputs, tokens: jax.Array) -> jax.Array:
    """The distribution each row drew `tokens` [B] from, as logits [B, V] f32: the processors, then
    for sampled rows temperature, top-k, top-p and min-p, the tokens they leave out at -inf (greedy
    rows: the processors alone). For `logprobs_mode` processed_*; the whole-vocabulary path for the
    allowed set, which the candidates path equals up to rounding at the top-p edge: the drawn token
    is kept whatever that rounding says."""
    logits = jax.lax.cond(processing(params), process, lambda x, _: x, logits.astype(jnp.float32), params)
    x, floor, k = _tempered(logits, params)
    keep = _truncated(x, k, params.top_p) & (x >= floor[:, None])
    keep |= jnp.arange(x.shape[-1])[None, :] == tokens[:, None]
    return jnp.where((params.temperature > 0)[:, None] & ~keep, -jnp.inf, x)


def _draw_tokens(logits: jax.Array, params: SamplingInputs, positions: jax.Array, candidates: int) -> jax.Array:
    b, vocab = logits.shape
    sampled = params.temperature > 0
    x, floor, k = _tempered(logits, params)
    whole = (k >= vocab) & (params.top_p >= 1.0)  # every token allowed
    c = min(candidates, vocab)
    every_id = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), (b, vocab))

    def draw(vals, ids, allowed):
        """The allowed id with the largest vals + its own Gumbel noise (vals, ids, allowed [B, N])."""
        noisy = vals + gumbel_noise(params.seed, positions, ids)
        pick = jnp.argmax(jnp.where(allowed & (vals >= floor[:, None]), noisy, -jnp.inf), axis=-1)
        return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]

    def limited_rows(_):
        vals, ids = jax.lax.top_k(x, c)  # [B, c] descending, ties to the lower id
        in_k = jnp.arange(c)[None, :] < k[:, None]
        # Top-k's mass is normalised over the top k, top-p alone's over the whole vocabulary.
        lse = jnp.where(k <= c, jax.nn.logsumexp(jnp.where(in_k, vals, -jnp.inf), axis=-1),
                        jax.nn.logsumexp(x, axis=-1))
        probs = jnp.where(in_k, jnp.exp(vals - lse[:, None]), 0.0)
        covered = (k <= c) | ((k >= vocab) & (jnp.sum(probs, axis=-1) >= params.top_p))

        def by_candidates(_):  # the mass before each candidate, in rank order
            return draw(vals, ids, in_k & (jnp.cumsum(probs, axis=-1) - probs < params.top_p[:, None]))

        def by_vocabulary(_):
            return draw(x, every_id, _truncated(x, k, params.top_p))

        return jax.lax.cond(jnp.any(sampled & ~whole & ~covered), by_vocabulary, by_candidates, None)

    def every_token_rows(_):
        return draw(x, every_id, jnp.ones((b, vocab), bool))

    def nothing(_):
        return jnp.zeros((b,), jnp.int32)

    limited = jax.lax.cond(jnp.any(sampled & ~whole), limited_rows, nothing, None)
    everything = jax.lax.cond(jnp.any(sampled & whole), every_token_rows, nothing, None)
    return jnp.where(sampled, jnp.where(whole, everything, limited), greedy(logits)).astype(jnp.int32)


def sampler_for(mesh) -> Callable:
    """`sample` for step outputs whose rows are split over the mesh's data axis: each replica
    samples its own rows (`shard_map`; rows are independent). Left to the partitioner, the
    split rows made TPU compile the sampler in 9.7 s instead of 4.0."""
    tpu = next(iter(mesh.devices.flat)).platform == "tpu"
    fn = functools.partial(sample, candidates=TPU_CANDIDATES if tpu else CANDIDATES)
    if mesh.shape["data"] == 1:
        return fn
    rows = PartitionSpec("data")
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows, rows), out_specs=(rows, rows), check_vma=False)
