"""TextGenerationPipeline: runs one scheduled batch the MAX way.

prepare_initial_token_inputs -> execute -> sample (on device) ->
prepare_next_token_inputs, up to `max_num_steps` decode steps per host
transfer. Which requests form a batch is the scheduler's business.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from maxlike.config import PipelineConfig
from maxlike.interfaces import (
    LogProbabilities,
    RequestError,
    TextGenerationOutput,
    TextGenerationRequest,
)
from maxlike.pipelines import sampling
from maxlike.pipelines.context import TextContext
from maxlike.pipelines.model import PipelineModel


@dataclass
class GenerationRow:
    """One request in flight: its context, budget, stop tokens and results so far."""

    ctx: TextContext
    max_new: int
    stops: frozenset[int]
    done: bool = False
    finish_reason: str = "length"
    logprobs: list[LogProbabilities] = field(default_factory=list)


class TextGenerationPipeline:
    def __init__(self, pipeline_config: PipelineConfig, pipeline_model: PipelineModel, tokenizer: Any) -> None:
        self.pipeline_config = pipeline_config
        self.model = pipeline_model
        self.tokenizer = tokenizer
        # CPU: 1 (1, 4 and 8 steps per call measured within noise of each other on SmolLM2);
        # accelerators: MAX's 10, not yet measured here.
        self.max_num_steps = pipeline_config.max_num_steps or (1 if pipeline_model.session.platform == "cpu" else 10)
        self._seeds = np.random.default_rng(pipeline_config.seed)
        self._ids = itertools.count()
        eos = getattr(pipeline_model.huggingface_config, "eos_token_id", None)
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(int(e) for e in eos)

    @property
    def max_length(self) -> int:
        return self.model.max_length

    # -- requests -> contexts ------------------------------------------------
    def encode(self, request: TextGenerationRequest) -> list[int]:
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError(f"request {request.request_id}: this model's tokenizer has no chat template; "
                                   "send a plain prompt instead of messages.")
            out = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if hasattr(out, "keys") else out
        elif isinstance(request.prompt, str):
            ids = self.tokenizer.encode(request.prompt)
        else:
            ids = [int(t) for t in request.prompt]
            vocab = self.model.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"request {request.request_id}: token ids {bad[:5]} are outside the "
                                   f"vocabulary [0, {vocab}).")
        if not ids:
            raise RequestError(f"request {request.request_id}: the prompt encodes to no tokens; give a non-empty prompt.")
        return list(ids)

    def make_context(self, request: TextGenerationRequest) -> TextContext:
        """Validate and encode one request; a RequestError names the problem and the fix."""
        ids = self.encode(request)
        params = request.sampling_params
        n, limit = len(ids), self.max_length
        if n >= limit:
            raise RequestError(f"request {request.request_id}: the prompt has {n} tokens but max_length is {limit}, "
                               "leaving no room to generate: shorten the prompt or raise max_length.")
        max_new = params.max_new_tokens if params.max_new_tokens is not None else limit - n
        if n + max_new > limit:
            raise RequestError(f"request {request.request_id}: prompt ({n} tokens) + max_new_tokens ({max_new}) "
                               f"exceeds max_length ({limit}): lower max_new_tokens or raise max_length.")
        seed = params.seed if params.seed is not None else int(self._seeds.integers(0, 2**31))
        return TextContext(request.request_id, np.asarray(ids, np.int32), n + max_new, params, seed)

    def row(self, request: TextGenerationRequest) -> "GenerationRow":
        """Validate and encode a request into the state the scheduler and `execute` share."""
        ctx = self.make_context(request)
        p = ctx.sampling_params
        stops = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        return GenerationRow(ctx, ctx.max_length - ctx.prompt_length, stops)

    # -- one scheduled batch ---------------------------------------------------------
    def execute(self, rows: list["GenerationRow"], num_steps: int = 1) -> None:
        """Run one scheduled batch: a prefill step (chunks of pending prompts), or
        `num_steps` decode steps on device followed by one host transfer.

        KV pages for every token written must already be reserved (the
        scheduler does it). Rows that complete their pending tokens sample one
        new token per step; the others only advance their cache.
        """
        model, session = self.model, self.model.session
        inputs = model.prepare_initial_token_inputs([[r.ctx for r in rows]])
        chunks = [len(r.ctx.next_tokens) for r in rows]
        sampling_rows = [r.ctx.cache_length + n == len(r.ctx.tokens) for r, n in zip(rows, chunks)]
        decoding = all(n == 1 for n in chunks) and all(sampling_rows)
        steps = max(1, min(num_steps, min(r.max_new - len(r.ctx.generated) for r in rows))) if decoding else 1
        params = None if all(r.ctx.sampling_params.greedy for r in rows) else sampling.SamplingInputs.build(
            [r.ctx.sampling_params for r in rows], [r.ctx.seed for r in rows], inputs.tokens.shape[0])
        top_n = [r.ctx.sampling_params.logprobs if s else 0 for r, s in zip(rows, sampling_rows)]
        echo = [r.ctx.sampling_params.echo and r.ctx.cache_length == 0 for r in rows]
        pending = []
        for _ in range(steps):
            out = model.execute(inputs)
            tokens = self._sample(out, inputs, params)
            if any(top_n):
                for r, lp in zip(rows, model.compute_log_probabilities(session, inputs, out, tokens, top_n, echo)):
                    if lp is not None:
                        r.logprobs.append(lp)
                echo = [False] * len(rows)
            pending.append(tokens)
            if steps > 1:
                inputs = model.prepare_next_token_inputs(tokens, inputs)
        for r, n, samples in zip(rows, chunks, sampling_rows):
            r.ctx.chunk = None
            if not samples:
                r.ctx.cache_length += n
        for step_tokens in jax.device_get(pending):
            self._commit([r for r, s in zip(rows, sampling_rows) if s],
                         [t for t, s in zip(step_tokens, sampling_rows) if s])

    def _sample(self, out, inputs, params: sampling.SamplingInputs | None) -> jax.Array:
        """Next tokens on device: argmax when every row is greedy (params None), else the full sampler."""
        session = self.model.session
        if params is None:
            return session.compile("sample_greedy", sampling.greedy, (out.next_token_logits,))(out.next_token_logits)
        positions = inputs.kv_cache_inputs.cache_lengths + inputs.input_lengths
        args = (out.next_token_logits, params, positions)
        return session.compile("sample", sampling.sample, args)(*args)

    def warmup(self, *, progress: bool = True) -> None:
        """Compile (and run once, on the null page) every executable of the bucket set."""
        model = self.model
        sampled: set[int] = set()
        for rows, tokens, width in tqdm(model.step_buckets(), desc="compiling", unit="bucket", disable=not progress):
            inputs = model.zero_inputs(rows, tokens, width)
            out = model.execute(inputs)
            if rows not in sampled:
                sampled.add(rows)
                self._sample(out, inputs, None)
                self._sample(out, inputs, sampling.SamplingInputs.build([], [], rows))
            if tokens == 1 and self.max_num_steps > 1:
                model.prepare_next_token_inputs(jnp.zeros((rows,), jnp.int32), inputs)
        jax.block_until_ready(model.kv_manager.pool)

    def stream_text(self, row: "GenerationRow", shown: str) -> str:
        """The new text of `row` since `shown` (held back while a character is incomplete)."""
        text = self._decode(row.ctx.generated, row)
        if len(text) > len(shown) and (row.done or not text.endswith("\ufffd")):
            return text[len(shown):]
        return ""

    def _commit(self, rows: list["GenerationRow"], tokens) -> None:
        for r, tok in zip(rows, tokens):
            if r.done:
                continue
            ctx = r.ctx
            ctx.cache_length = len(ctx.tokens)
            ctx.tokens = np.append(ctx.tokens, np.int32(tok))
            if int(tok) in r.stops:
                r.done, r.finish_reason = True, "stop"
            elif len(ctx.generated) >= r.max_new:
                r.done, r.finish_reason = True, "length"

    def _decode(self, ids: np.ndarray, row: "GenerationRow") -> str:
        ids = [int(t) for t in ids]
        if row.finish_reason == "stop" and ids and ids[-1] in row.stops:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def output(self, row: "GenerationRow") -> TextGenerationOutput:
        ctx = row.ctx
        return TextGenerationOutput(
            request_id=ctx.request_id, text=self._decode(ctx.generated, row),
            token_ids=[int(t) for t in ctx.generated], prompt_token_ids=[int(t) for t in ctx.tokens[: ctx.prompt_length]],
            finish_reason=row.finish_reason, log_probabilities=row.logprobs,
        )

    def next_request_id(self) -> str:
        return f"req-{next(self._ids)}"
