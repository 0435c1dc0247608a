"""TextGenerationPipeline: runs one scheduled batch the MAX way.

prepare_initial_token_inputs -> execute -> sample (on device) ->
prepare_next_token_inputs, up to `max_num_steps` decode steps per host
transfer. Which requests form a batch is the scheduler's business.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from maxlike.config import PipelineConfig
from maxlike.interfaces import (
    GREEDY,
    LogProbabilities,
    RequestError,
    TextGenerationOutput,
    TextGenerationRequest,
)
from maxlike.pipelines import sampling
from maxlike.pipelines.context import TextContext
from maxlike.pipelines.detokenize import IncrementalDetokenizer
from maxlike.pipelines.model import ReturnLogits
from maxlike.pipelines.serving import LOGPROB_BUCKETS, ServingModel
from maxlike.pipelines.stop_strings import StopStrings
from maxlike.pipelines.structured import Grammars
from maxlike.sharding import replicated
from maxlike.weights.lean import text_config_of


@dataclass(eq=False)
class GenerationRow:
    """One request in flight: its context, budget, stop tokens and results so far."""

    ctx: TextContext
    max_new: int
    stops: frozenset[int]
    echo_pending: bool = False  # its prompt's log-probabilities are still to come (first step only)
    done: bool = False
    finish_reason: str = "length"
    logprobs: list[LogProbabilities] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None  # while its text is streamed
    streamed: int = 0  # generated tokens fed to the detokenizer so far
    stop_strings: StopStrings | None = None  # with SamplingParams.stop: its text is built token by token
    shown: str = ""  # with stop strings: the text so far, cut before the first stop string
    shown_sent: int = 0  # characters of `shown` stream_text has returned
    matcher: Any = None  # with SamplingParams.response_format: its grammar's state (llguidance)


@dataclass(eq=False)
class Launch:
    """A batch dispatched to the device; `complete` brings its tokens to the host."""

    rows: list[GenerationRow]
    chunks: list[int]  # tokens each row processes (1 per step while decoding)
    sampling_rows: list[bool]  # rows that sample (the others are mid-prompt)
    steps: int
    index: list[int] = field(default_factory=list)  # each row's row in the step's inputs (grouped by replica)
    tokens: Any = None  # [>= steps, B] new tokens (device array for a decode loop)
    last: Any = None  # decode loop only: [B] the tokens sampled last, on device
    params: sampling.SamplingInputs | None = None  # on device; None: every row plain greedy
    state: sampling.SamplingInputs | None = None  # decode loop only: the sampling state after it
    stop_ids: np.ndarray | None = None
    logprobs: list[dict[int, LogProbabilities]] = field(default_factory=list)  # per step: row -> its log-probs


def _scatter(index: list[int], total: int, values: list, fill) -> list:
    """`values` (one per row) laid out at `index` in a list of `total`, `fill` elsewhere."""
    out = [fill] * total
    for i, v in zip(index, values):
        out[i] = v
    return out


class TextGenerationPipeline:
    def __init__(self, pipeline_config: PipelineConfig, pipeline_model: ServingModel, tokenizer: Any) -> None:
        self.pipeline_config = pipeline_config
        self.model = pipeline_model
        self.tokenizer = tokenizer
        # CPU: 1 (1, 4 and 8 steps per call measured within noise of each other on SmolLM2);
        # accelerators: MAX's 10, not yet measured here.
        self.max_num_steps = pipeline_config.max_num_steps or (1 if pipeline_model.session.platform == "cpu" else 10)
        self._seeds = np.random.default_rng(pipeline_config.seed)
        self._ids = itertools.count()
        hf = pipeline_model.huggingface_config
        eos = getattr(hf, "eos_token_id", None) or getattr(text_config_of(hf), "eos_token_id", None)
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(int(e) for e in eos)
        self.grammars = Grammars(tokenizer, pipeline_model.vocab_size, self.eos_token_ids)

    @property
    def max_length(self) -> int:
        return self.model.max_length

    # -- requests -> contexts ------------------------------------------------
    def encode(self, request: TextGenerationRequest) -> list[int]:
        rid = request.request_id
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError(f"request {rid}: this model's tokenizer has no chat template; "
                                   "send a plain prompt instead of messages.")
            try:
                out = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
            except Exception as e:  # noqa: BLE001 - jinja2's TemplateError, the template's raise_exception, ...
                raise RequestError(f"request {rid}: the model's chat template refused these messages: "
                                   f"{type(e).__name__}: {e}") from None
            ids = out["input_ids"] if hasattr(out, "keys") else out
        elif isinstance(request.prompt, str):
            ids = self.tokenizer.encode(request.prompt)
        else:
            ids = [int(t) for t in request.prompt]
            self._check_ids(rid, "token ids", ids)
        if not ids:
            raise RequestError(f"request {rid}: the prompt encodes to no tokens; give a non-empty prompt.")
        return list(ids)

    def _check_ids(self, request_id: str, what: str, ids) -> None:
        vocab = self.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"request {request_id}: {what} {bad[:5]} are outside the vocabulary [0, {vocab}).")

    def make_context(self, request: TextGenerationRequest) -> TextContext:
        """Validate and encode one request; a RequestError names the problem and the fix."""
        params = request.sampling_params
        if params.echo and params.logprobs and self.model.return_logits != ReturnLogits.ALL:
            raise RequestError(f"request {request.request_id}: echo with logprobs needs the prompt's logits: load "
                               "the model with enable_echo=True (PipelineConfig, --enable-echo).")
        self._check_ids(request.request_id, "stop_token_ids", params.stop_token_ids)
        ids = self.encode(request)
        n, limit = len(ids), self.max_length
        if n >= limit:
            raise RequestError(f"request {request.request_id}: the prompt has {n} tokens but max_length is {limit}, "
                               "leaving no room to generate: shorten the prompt or raise max_length.")
        max_new = params.max_new_tokens if params.max_new_tokens is not None else limit - n
        if n + max_new > limit:
            raise RequestError(f"request {request.request_id}: prompt ({n} tokens) + max_new_tokens ({max_new}) "
                               f"exceeds max_length ({limit}): lower max_new_tokens or raise max_length.")
        seed = params.seed if params.seed is not None else int(self._seeds.integers(0, 2**31))
        return TextContext(request.request_id, np.asarray(ids, np.int32), n + max_new, params, seed,
                           lora_name=request.lora_name)

    def row(self, request: TextGenerationRequest) -> "GenerationRow":
        """Validate and encode a request into the state the scheduler and `execute` share."""
        ctx = self.make_context(request)
        p = ctx.sampling_params
        stops = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        row = GenerationRow(ctx, ctx.max_length - ctx.prompt_length, stops, echo_pending=p.echo and p.logprobs > 0)
        if p.response_format is not None:
            row.matcher = self.grammars.matcher(p.response_format, ctx.request_id)
        if p.stop:
            row.stop_strings = StopStrings(p.stop)
            row.detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        return row

    # -- one scheduled batch ---------------------------------------------------------
    def execute(self, rows: list["GenerationRow"], num_steps: int = 1) -> int:
        """Run one scheduled batch to completion: `launch` then `complete`. Returns the
        number of steps the device ran."""
        return self.complete(self.launch(rows, num_steps))

    def launch(self, rows: list["GenerationRow"], num_steps: int = 1) -> "Launch":
        """Dispatch one scheduled batch: a prefill step (chunks of pending prompts), or
        up to `num_steps` decode steps on device. KV pages for every token written
        must already be reserved (the scheduler does it). Rows that complete their
        pending tokens sample one new token per step; the others only advance their
        cache. A decode loop's tokens stay on the device until `complete`.
        """
        rows, inputs, index = self._inputs(rows, [r.ctx for r in rows])
        chunks = [len(r.ctx.next_tokens) for r in rows]
        sampling_rows = [r.ctx.cache_length + n == len(r.ctx.tokens) for r, n in zip(rows, chunks)]
        decoding = all(n == 1 for n in chunks) and all(sampling_rows)
        budgets = [r.max_new - len(r.ctx.generated) for r in rows]
        # Structured output: the host fills each step's token mask, so one step per call.
        constrained = any(r.matcher is not None for r, s in zip(rows, sampling_rows) if s)
        steps = max(1, min(num_steps, self.max_num_steps, min(budgets))) if decoding and not constrained else 1
        total = len(inputs.row_ids)
        params = None
        if not all(r.ctx.sampling_params.plain_greedy for r in rows):
            by_row = _scatter(index, total, [(r.ctx.sampling_params, r.ctx.seed, r.ctx, r.stops) for r in rows],
                              (GREEDY, 0, None, ()))
            params = self.model.place_sampling(sampling.SamplingInputs.build(
                [b[0] for b in by_row], [b[1] for b in by_row], total, vocab=self.model.vocab_size,
                stop_slots=self.model.stop_slots, contexts=[b[2] for b in by_row], stops=[b[3] for b in by_row]))
        top_n = [r.ctx.sampling_params.logprobs if s else 0 for r, s in zip(rows, sampling_rows)]
        launch = Launch(rows, chunks, sampling_rows, steps, index=index, params=params)
        if decoding and not any(top_n) and not constrained:  # logprobs need each step's logits
            slots = self.model.stop_slots
            launch.stop_ids = np.full((total, slots), -1, np.int32)
            for i, r in zip(index, rows):
                ids = sorted(r.stops)[:slots]
                launch.stop_ids[i, : len(ids)] = ids
            return self._launch_loop(launch, inputs, budgets)
        launch.tokens = self._host_steps(launch, inputs, top_n)
        return launch

    def _inputs(self, rows: list["GenerationRow"], contexts: list[TextContext]):
        """(rows grouped by replica, the step's inputs, each row's index in them)."""
        model, kv = self.model, self.model.kv_manager
        groups: list[list[int]] = [[] for _ in range(model.replicas)]
        for i, ctx in enumerate(contexts):
            groups[kv.replica_of(ctx.request_id) if kv.contains(ctx.request_id) else 0].append(i)
        inputs = model.prepare_initial_token_inputs([[contexts[i] for i in g] for g in groups])
        at = {rid: j for j, rid in enumerate(inputs.row_ids) if rid is not None}
        order = [i for g in groups for i in g]
        return [rows[i] for i in order], inputs, [at[contexts[i].request_id] for i in order]

    def launch_after(self, prev: "Launch", num_steps: int) -> "Launch | None":
        """The decode block that follows `prev` on the same rows, dispatched before
        `prev`'s tokens reach the host: its input tokens are `prev`'s last ones, on
        device. Rows that finish inside `prev` compute on and are dropped at commit.
        None when `prev` is not a decode loop or a row's budget ends inside it. The
        caller reserves KV pages for both blocks first."""
        if prev.last is None:
            return None
        budgets = [r.max_new - len(r.ctx.generated) - prev.steps for r in prev.rows]
        steps = min(num_steps, self.max_num_steps, min(budgets))
        if steps < 1:
            return None
        # Where each row will stand once `prev` is committed: prev.steps more tokens, the last one pending.
        ahead = [TextContext(r.ctx.request_id, np.zeros(len(r.ctx.tokens) + prev.steps, np.int32),
                             r.ctx.max_length, cache_length=len(r.ctx.tokens) - 1 + prev.steps,
                             prompt_length=r.ctx.prompt_length) for r in prev.rows]
        rows, inputs, index = self._inputs(prev.rows, ahead)  # same rows, same order and layout as prev
        inputs = inputs.replace(tokens=prev.last[:, None])
        launch = Launch(rows, prev.chunks, prev.sampling_rows, steps, index=index,
                        params=None if prev.params is None else prev.state, stop_ids=prev.stop_ids)
        return self._launch_loop(launch, inputs, budgets)

    def _launch_loop(self, launch: "Launch", inputs, budgets: list[int]) -> "Launch":
        padded = np.asarray(_scatter(launch.index, len(inputs.row_ids), budgets, 0), np.int32)
        launch.tokens, launch.last, launch.state = self.model.execute_decode_loop(
            inputs, launch.steps, self.max_num_steps, launch.params, launch.stop_ids, padded)
        return launch

    def complete(self, launch: "Launch") -> int:
        """Bring a launched batch's tokens to the host and commit them (stop checks
        included). Returns the number of steps the device ran: a decode loop stops
        early once every row has finished."""
        tokens = np.asarray(jax.device_get(launch.tokens))[: launch.steps][:, launch.index]  # [steps, rows]
        if launch.last is not None:  # steps after every row had finished did not run (-1)
            tokens = tokens[: max(1, int((tokens >= 0).any(axis=1).sum()))]
        for r, n, samples in zip(launch.rows, launch.chunks, launch.sampling_rows):
            r.ctx.chunk = None
            if not samples:
                r.ctx.cache_length += n
        sampled = [j for j, s in enumerate(launch.sampling_rows) if s]
        for step, step_tokens in enumerate(tokens):
            found = launch.logprobs[step] if launch.logprobs else {}
            for j in sampled:
                self._commit(launch.rows[j], int(step_tokens[j]), found.get(j))
        return len(tokens)

    def _host_steps(self, launch: "Launch", inputs, top_n: list[int]) -> np.ndarray:
        """One call per step (log-probabilities need each step's logits): tokens [steps, B]."""
        model, session, rows, total = self.model, self.model.session, launch.rows, len(inputs.row_ids)
        top_n = _scatter(launch.index, total, top_n, 0)
        # Echo is the request's first step: its whole prompt runs in it (the scheduler sees to that).
        echo = _scatter(launch.index, total, [r.echo_pending for r in rows], False)
        pending, params = [], launch.params
        constrained = [(i, r.matcher) for i, r, s in zip(launch.index, rows, launch.sampling_rows)
                       if s and r.matcher is not None]
        for step in range(launch.steps):
            out = model.execute(inputs)
            if constrained:  # filled on the host while the device runs the step (steps == 1 here)
                params = model.place_sampling(params.replace(allowed=self.grammars.fill(constrained, total)))
            drawn_with = params
            tokens, params = self._sample(out, inputs, params)
            if any(top_n):  # kept with the step's tokens: a row that stops earlier takes none of the rest
                results = model.compute_log_probabilities(session, inputs, out, tokens, top_n, echo,
                                                          sampling_inputs=drawn_with)
                launch.logprobs.append({j: results[i] for j, i in enumerate(launch.index) if results[i] is not None})
                echo = [False] * total
            pending.append(tokens)
            if step + 1 < launch.steps:
                inputs = model.prepare_next_token_inputs(tokens, inputs)
        return np.stack(jax.device_get(pending))

    def _sample(self, out, inputs, params: sampling.SamplingInputs | None):
        """Next tokens on device and the sampling state after them: argmax when every row is plain
        greedy (params None), else the full sampler."""
        positions = inputs.kv_cache_inputs.cache_lengths + inputs.input_lengths
        exe = self._sampler(out.next_token_logits, params, positions)
        return (exe(out.next_token_logits), None) if params is None else \
            exe(out.next_token_logits, params, positions)

    def _sampler(self, logits, params, positions):
        """The sampler executable for these logits (keyed by shape; replicated output, so every
        process of a multi-host job can read the tokens)."""
        session, everywhere = self.model.session, replicated(self.model.session.mesh)
        if params is None:
            return session.compile("sample_greedy", sampling.greedy, (logits,), key=logits.shape,
                                   out_shardings=everywhere)
        return session.compile("sample", sampling.sampler_for(session.mesh), (logits, params, positions),
                               key=logits.shape, out_shardings=everywhere)

    def warmup(self, *, progress: bool = True) -> None:
        """Compile (and run once, on the null page) every executable of the bucket set.
        A compile-only model is compiled, not run."""
        model = self.model
        if model.compile_only:
            self.compile_all(progress=progress)
            return
        session = model.session
        sampled: set[int] = set()
        for rows, tokens, width, mixed in tqdm(model.step_buckets(), desc="compiling", unit="bucket",
                                               disable=not progress):
            inputs = model.zero_inputs(rows, tokens, width, mixed)
            total = len(inputs.row_ids)  # rows on every replica
            out = model.execute(inputs)
            greedy, _ = self._sample(out, inputs, None)
            if rows not in sampled:
                sampled.add(rows)
                self._sample(out, inputs, model.greedy_sampling(total))
                for n in LOGPROB_BUCKETS:
                    model.compute_log_probabilities(session, inputs, out, greedy, [n] * total, [False] * total)
            if tokens > 1 and model.return_logits == ReturnLogits.ALL:
                for n in LOGPROB_BUCKETS:
                    model.compute_log_probabilities(session, inputs, out, greedy, [n] * total, [True] * total)
            if tokens == 1:
                if self.max_num_steps > 1:
                    model.prepare_next_token_inputs(greedy, inputs)
                stops, budgets = np.full((total, model.stop_slots), -1, np.int32), np.zeros((total,), np.int32)
                model.execute_decode_loop(inputs, 1, self.max_num_steps, None, stops, budgets)
        if model.lora_manager is not None:
            model.lora_manager.update_executable()
        jax.block_until_ready(model.kv_manager.pool)
        model.record_activation_memory()

    def compile_all(self, *, progress: bool = True, shard: tuple[int, int] = (0, 1),
                    on_bucket: Callable[[], None] | None = None) -> None:
        """Compile every executable of the bucket set from abstract inputs (nothing runs).
        shard (i, n): only buckets i, i + n, ... (with what they share with other buckets of
        their rows when they are the first of them), so n processes split the set exactly.
        `on_bucket` is called as each bucket is done (a worker's progress for its parent)."""
        model = self.model
        index, count = shard
        first_of_rows: set[int] = set()
        buckets = model.step_buckets()
        todo = []
        for j, bucket in enumerate(buckets):
            per_rows = bucket.rows not in first_of_rows
            first_of_rows.add(bucket.rows)
            if j % count == index:
                todo.append((bucket, per_rows))
        records = model.session.stats.records
        if model.lora_manager is not None and index == 0:
            model.lora_manager.update_executable()
        for (rows, tokens, width, mixed), per_rows in tqdm(todo, desc="compiling", unit="bucket", disable=not progress):
            seen = len(records)
            shapes = model.compile_bucket(rows, tokens, width, self.max_num_steps, per_rows=per_rows, mixed=mixed)
            if per_rows:
                total = shapes.logits.shape[0]
                self._sampler(shapes.logits, None, None)
                self._sampler(shapes.logits, model.sampling_abstract(total), shapes.positions)
            for record in records[seen:]:  # for warm-cache's table of the slowest and largest
                record["bucket"] = f"{rows}x{tokens}x{width}" + (" mixed" if mixed else "")
            if on_bucket is not None:
                on_bucket()
        if count == 1:  # a shard saw only part of the set: whoever splits it records the whole set's peak
            model.record_activation_memory()

    def stream_text(self, row: "GenerationRow") -> str:
        """The new text of `row` since the last call: incremental (each token is decoded once),
        never half a character, a final stop token left out, text that may begin a stop string held
        back; joined, the pieces are its output text."""
        if row.stop_strings is not None:
            piece, row.shown_sent = row.shown[row.shown_sent:], len(row.shown)
            return piece
        if row.detokenizer is None:
            row.detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        generated = row.ctx.generated
        end = len(generated) - (1 if self._ends_with_stop(row) else 0)
        piece = row.detokenizer.step(generated[row.streamed:end]) if end > row.streamed else ""
        row.streamed = max(row.streamed, end)
        return piece + row.detokenizer.finish() if row.done else piece

    @staticmethod
    def _ends_with_stop(row: "GenerationRow") -> bool:
        ids = row.ctx.generated
        return row.finish_reason == "stop" and len(ids) > 0 and int(ids[-1]) in row.stops

    @staticmethod
    def _commit(r: "GenerationRow", tok: int, logprobs: LogProbabilities | None) -> None:
        """One sampled token (and its log-probs) into a row, unless the row has finished. A row
        with stop strings decodes the token now: a stop string ends it here, its text cut before."""
        if r.done:
            return
        if tok < 0:
            raise RuntimeError(f"request {r.ctx.request_id}: the decode loop ended before this row finished.")
        ctx = r.ctx
        ctx.cache_length = len(ctx.tokens)
        ctx.tokens = np.append(ctx.tokens, np.int32(tok))
        if logprobs is not None:
            r.logprobs.append(logprobs)
            r.echo_pending = False
        if r.matcher is not None and tok not in r.stops:
            if not r.matcher.consume_token(tok):
                raise RuntimeError(f"request {ctx.request_id}: token {tok} was sampled outside its grammar: "
                                   f"{r.matcher.get_error()}")
        if tok in r.stops or (r.matcher is not None and r.matcher.is_stopped()):
            r.done, r.finish_reason = True, "stop"  # a stop token, or a complete structured output
        elif r.stop_strings is not None:
            shown, hit = r.stop_strings.feed(r.detokenizer.step([tok]))
            r.shown += shown
            if hit:
                r.done, r.finish_reason = True, "stop"
        if not r.done and len(ctx.generated) >= r.max_new:
            r.done, r.finish_reason = True, "length"
        if r.done and r.stop_strings is not None and not r.stop_strings.stopped:
            r.shown += r.stop_strings.feed(r.detokenizer.finish())[0] + r.stop_strings.flush()

    def _decode(self, ids: np.ndarray, row: "GenerationRow") -> str:
        ids = [int(t) for t in ids]
        return self.tokenizer.decode(ids[:-1] if self._ends_with_stop(row) else ids, skip_special_tokens=True)

    def output(self, row: "GenerationRow") -> TextGenerationOutput:
        ctx = row.ctx
        return TextGenerationOutput(
            request_id=ctx.request_id, text=row.shown if row.stop_strings is not None else self._decode(ctx.generated, row),
            token_ids=[int(t) for t in ctx.generated], prompt_token_ids=[int(t) for t in ctx.tokens[: ctx.prompt_length]],
            finish_reason=row.finish_reason, log_probabilities=row.logprobs,
        )

    def next_request_id(self) -> str:
        return f"req-{next(self._ids)}"
