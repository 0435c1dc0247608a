"""TextGenerationPipeline: MAX's loop over a batch of requests.

prepare_initial_token_inputs -> execute -> sample (on device) ->
prepare_next_token_inputs, `max_num_steps` steps per host transfer, until
every row hit EOS, a stop token or its `max_new_tokens`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from maxlike.config import PipelineConfig
from maxlike.interfaces import (
    LogProbabilities,
    RequestError,
    SamplingParams,
    TextGenerationOutput,
    TextGenerationRequest,
)
from maxlike.pipelines import sampling
from maxlike.pipelines.context import TextContext
from maxlike.pipelines.model import PipelineModel


@dataclass
class _Row:
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

    def _row(self, ctx: TextContext) -> _Row:
        p = ctx.sampling_params
        stops = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        return _Row(ctx, ctx.max_length - ctx.prompt_length, stops)

    # -- generation --------------------------------------------------------------
    def generate(self, requests: Sequence[TextGenerationRequest], *, use_tqdm: bool = False) -> list[TextGenerationOutput]:
        """Run every request to completion. Each request is validated before anything runs."""
        rows = [self._row(self.make_context(r)) for r in requests]
        bar = tqdm(total=len(rows), desc="generating", unit="req", disable=not use_tqdm)
        for batch in self._batches(rows):
            for _ in self._run(batch):
                pass
            bar.update(len(batch))
        bar.close()
        return [self._output(r) for r in rows]

    def stream(self, request: TextGenerationRequest) -> Iterator[str]:
        """Yield the text of one request as it is generated."""
        row = self._row(self.make_context(request))
        self._check_fits([row])
        shown = ""
        for _ in self._run([row]):
            text = self._decode(row.ctx.generated, row)
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text
        text = self._decode(row.ctx.generated, row)
        if len(text) > len(shown):
            yield text[len(shown):]

    def _check_fits(self, rows: list[_Row]) -> None:
        kv = self.model.kv_manager
        for r in rows:
            if kv.params.pages_for(r.ctx.max_length) > kv.num_pages - 1:
                raise RequestError(f"request {r.ctx.request_id} needs {kv.params.pages_for(r.ctx.max_length)} KV pages "
                                   f"but the pool has {kv.num_pages - 1}: lower max_new_tokens or max_length.")

    def _batches(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        """Consecutive groups that fit max_batch_size and the free KV pages."""
        self._check_fits(rows)
        kv = self.model.kv_manager
        batch: list[_Row] = []
        for r in rows:
            if batch and (len(batch) == self.model.max_batch_size
                          or not kv.can_reserve([b.ctx.max_length for b in batch + [r]])):
                yield batch
                batch = []
            batch.append(r)
        if batch:
            yield batch

    def _run(self, rows: list[_Row]) -> Iterator[None]:
        """Generate for one batch; yields after every host transfer of new tokens."""
        model, kv = self.model, self.model.kv_manager
        session = model.session
        try:
            inputs = model.prepare_initial_token_inputs([[r.ctx for r in rows]])
            width = inputs.tokens.shape[0]
            params = sampling.SamplingInputs.build([r.ctx.sampling_params for r in rows], [r.ctx.seed for r in rows], width)
            all_greedy = all(r.ctx.sampling_params.greedy for r in rows)
            top_n = [r.ctx.sampling_params.logprobs for r in rows]
            echo = [r.ctx.sampling_params.echo for r in rows]
            steps = self.pipeline_config.max_num_steps
            while True:
                pending = []
                for _ in range(steps):
                    out = model.execute(inputs)
                    if all_greedy:
                        tokens = session.compile("sample_greedy", sampling.greedy, (out.next_token_logits,))(
                            out.next_token_logits)
                    else:
                        positions = inputs.kv_cache_inputs.cache_lengths + inputs.input_lengths
                        args = (out.next_token_logits, params, positions)
                        tokens = session.compile("sample", sampling.sample, args)(*args)
                    if any(top_n):
                        for r, lp in zip(rows, model.compute_log_probabilities(session, inputs, out, tokens, top_n, echo)):
                            if lp is not None:
                                r.logprobs.append(lp)
                        echo = [False] * len(rows)  # only the prompt step echoes
                    pending.append(tokens)
                    inputs = model.prepare_next_token_inputs(tokens, inputs)
                    if len(pending) >= min(r.max_new - len(r.ctx.generated) for r in rows if not r.done):
                        break
                for step_tokens in jax.device_get(pending):
                    self._commit(rows, step_tokens)
                yield
                if all(r.done for r in rows):
                    return
        finally:
            for r in rows:
                if kv.contains(r.ctx.request_id):
                    kv.release(r.ctx.request_id)

    def _commit(self, rows: list[_Row], tokens: np.ndarray) -> None:
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

    def _decode(self, ids: np.ndarray, row: _Row) -> str:
        ids = [int(t) for t in ids]
        if row.finish_reason == "stop" and ids and ids[-1] in row.stops:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _output(self, row: _Row) -> TextGenerationOutput:
        ctx = row.ctx
        return TextGenerationOutput(
            request_id=ctx.request_id, text=self._decode(ctx.generated, row),
            token_ids=[int(t) for t in ctx.generated], prompt_token_ids=[int(t) for t in ctx.tokens[: ctx.prompt_length]],
            finish_reason=row.finish_reason, log_probabilities=row.logprobs,
        )

    def next_request_id(self) -> str:
        return f"req-{next(self._ids)}"
