"""Continuous batching: admission, chunked prefill, incremental KV pages, preemption.

Requests join and leave at any step. Each step is either a prefill step
(chunks of pending prompts under a token budget) or a decode step over every
running request (`max_num_steps` tokens per host call); with in-flight batching,
while prompts are pending, a mixed step: one token of every running request and
one prompt chunk per replica. KV pages are claimed as
sequences grow; when the pool runs dry the newest request is preempted (its
pages freed) and later recomputed from its tokens so far, which gives the same
output: sampling keys depend only on (seed, position).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterable, Iterator

from tqdm.auto import tqdm

from maxlike.interfaces import RequestError, TextGenerationOutput, TextGenerationRequest
from maxlike.pipelines.text_generation import GenerationRow, Launch, TextGenerationPipeline


@dataclass
class SchedulerStats:
    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (recomputation after preemption included)
    decode_tokens: int = 0
    preemptions: int = 0
    overlapped: int = 0  # decode blocks dispatched before the previous block's tokens were read
    mixed_steps: int = 0  # in-flight batching: steps that ran decode rows and a prompt chunk together


class Scheduler:
    def __init__(self, pipeline: TextGenerationPipeline, *, prefill_chunk_size: int | None = None,
                 max_num_steps: int | None = None) -> None:
        config = pipeline.pipeline_config
        self.pipeline = pipeline
        self.kv = pipeline.model.kv_manager
        self.max_batch_size = pipeline.model.max_batch_size  # rows per replica
        self.replicas = pipeline.model.replicas
        self.prefill_chunk_size = prefill_chunk_size or config.prefill_chunk_size
        self.max_num_steps = max_num_steps or pipeline.max_num_steps
        self.async_scheduling = config.async_scheduling
        self.in_flight_batching = config.enable_in_flight_batching
        self._inflight: Launch | None = None  # a decode block dispatched, its tokens not yet read
        self._prefilled_last = False  # the last step was a prefill step (the next one decodes, if it can)
        self.waiting: collections.deque[GenerationRow] = collections.deque()
        self.running: list[GenerationRow] = []
        self.stats = SchedulerStats()
        self._arrival: dict[str, int] = {}
        self._next_arrival = 0

    # -- requests ------------------------------------------------------------------
    def add(self, request: TextGenerationRequest) -> GenerationRow:
        """Validate and queue a request; one that can never run is rejected here, alone."""
        return self._enqueue(self.check(request))

    def check(self, request: TextGenerationRequest) -> GenerationRow:
        """Encode and validate a request (RequestError naming the fix if it can never run)."""
        row = self.pipeline.row(request)
        ctx = row.ctx
        if ctx.request_id in self._arrival:
            raise RequestError(f"request id {ctx.request_id!r} is already in flight.")
        # prompt + max_new_tokens <= max_length was checked, and the pool holds one max_length
        # sequence (the model refuses to build otherwise): every valid request fits alone.
        if ctx.lora_name is not None:
            lora = self.pipeline.model.lora_manager
            if lora is None:
                raise RequestError(f"request {ctx.request_id}: asks for LoRA adapter {ctx.lora_name!r} but LoRA is "
                                   "off: load the model with enable_lora=True (--enable-lora) and the adapter.")
            if ctx.lora_name not in lora.list_adapters():
                raise RequestError(f"request {ctx.request_id}: unknown LoRA adapter {ctx.lora_name!r}; loaded: "
                                   f"{lora.list_adapters() or 'none'}.")
        if row.echo_pending and ctx.prompt_length > self.prefill_chunk_size:
            raise RequestError(f"request {ctx.request_id}: echo needs the whole prompt ({ctx.prompt_length} tokens) in "
                               f"one prefill chunk (prefill_chunk_size={self.prefill_chunk_size}): raise "
                               "prefill_chunk_size or shorten the prompt.")
        return row

    def _enqueue(self, row: GenerationRow) -> GenerationRow:
        self._arrival[row.ctx.request_id] = self._next_arrival
        self._next_arrival += 1
        self.waiting.append(row)
        return row

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inflight)

    # -- one step ------------------------------------------------------------------
    def step(self) -> list[GenerationRow]:
        """Run one batch and return its rows that were live (some may have finished).

        With async scheduling, a decode block's successor on the same rows is
        dispatched before the block's tokens are read, so the device never waits
        for the host's commits, detokenizing and scheduling between the two.
        """
        prev, self._inflight = self._inflight, None
        if prev is None:
            prev = self._launch()
            if prev is None:
                return []
        if self.async_scheduling:
            self._inflight = self._launch_after(prev)
            self.stats.overlapped += self._inflight is not None
        return self._complete(prev)

    def _launch(self) -> Launch | None:
        """Admit, pick a batch, dispatch it. With in-flight batching, while both prompts and
        running requests have work, each step does both (a mixed step). Without it, prefill
        and decode steps alternate, so prompts arriving do not stall the running requests'
        streams for longer than one prefill chunk (`prefill_chunk_size` tokens)."""
        self._admit()
        prefill = [r for r in self.running if r.ctx.pending > 1]
        decode = [r for r in self.running if r.ctx.pending == 1]
        if self.in_flight_batching and prefill and decode:
            batch = self._mixed_batch(prefill, decode)
            chunks = [r.ctx.chunk for r in batch if r.ctx.pending > 1]
            self.stats.mixed_steps += bool(chunks)
            self.stats.prefill_tokens += sum(chunks)
            self._prefilled_last = False
            return self.pipeline.launch(batch, 1)
        prefill_now = bool(prefill) and not (self._prefilled_last and decode)
        batch = self._prefill_batch(prefill) if prefill_now else self._decode_batch(decode)
        self._prefilled_last = prefill_now
        if not batch:
            return None
        if prefill_now:
            self.stats.prefill_tokens += sum(r.ctx.chunk for r in batch)
            return self.pipeline.launch(batch, 1)
        return self.pipeline.launch(batch, min(self.max_num_steps, min(r.max_new - len(r.ctx.generated)
                                                                       for r in batch)))

    def _launch_after(self, prev: Launch) -> Launch | None:
        """The decode block after `prev` on the same rows, while `prev` runs; None when the
        batch changes next (a row has finished, a request could be admitted) or pages would
        need a preemption."""
        if prev.last is None or any(r.done for r in prev.rows) or (self.waiting and
                                                                   len(self.running) < self.capacity):
            return None
        if any(r.ctx.pending > 1 for r in self.running):  # a prompt is mid-prefill: its turn next
            return None
        for r in prev.rows:
            total = len(r.ctx.tokens) - 1 + prev.steps + min(self.max_num_steps,
                                                              r.max_new - len(r.ctx.generated) - prev.steps)
            if self.kv.pages_short(r.ctx.request_id, total):
                return None
            self.kv.reserve(r.ctx.request_id, total)
        return self.pipeline.launch_after(prev, self.max_num_steps)

    def _complete(self, launch: Launch) -> list[GenerationRow]:
        live = [r for r in launch.rows if not r.done]  # rows finished by an earlier block are skipped
        before = [len(r.ctx.generated) for r in live]
        ran = self.pipeline.complete(launch)
        decoding = launch.last is not None or all(n == 1 for n in launch.chunks) and all(launch.sampling_rows)
        running = {id(r) for r in self.running}
        for r in live:
            if id(r) in running:
                self.kv.commit(r.ctx.request_id, r.ctx.tokens, r.ctx.cache_length)
        self.stats.steps += 1
        self.stats.prefill_steps += not decoding
        self.stats.decode_steps += ran if decoding else 0
        self.stats.decode_tokens += sum(len(r.ctx.generated) - b for r, b in zip(live, before)) if decoding else 0
        for r in live:
            if r.done and id(r) in running:
                self._finish(r)
        return live

    @property
    def capacity(self) -> int:
        return self.max_batch_size * self.replicas

    def _rows_on(self, replica: int) -> list[GenerationRow]:
        return [r for r in self.running if self.kv.replica_of(r.ctx.request_id) == replica]

    def _admit(self) -> None:
        """Waiting -> running, oldest first, while a replica has a row and pages for its
        pending tokens (the replica with the fewest rows, then the most free pages)."""
        while self.waiting and len(self.running) < self.capacity:
            row = self.waiting[0]
            ctx = row.ctx
            load = [len(self._rows_on(r)) for r in range(self.replicas)]
            replica = min((r for r in range(self.replicas) if load[r] < self.max_batch_size),
                          key=lambda r: (load[r], -self.kv.replica_free_pages(r)))
            if ctx.lora_name is not None and self.pipeline.model.lora_manager.acquire(ctx.lora_name) is None:
                break  # every adapter slot is held by running requests: wait for one
            # > 0 on a prefix hit; echo computes the whole prompt, so it takes no cached pages
            namespace = None if ctx.lora_name is None else self.pipeline.model.lora_manager.namespace(ctx.lora_name)
            ctx.cache_length = self.kv.claim(ctx.request_id, None if row.echo_pending else ctx.tokens, replica=replica,
                                             namespace=namespace)
            if self.kv.pages_short(ctx.request_id, len(ctx.tokens)):
                self.kv.release(ctx.request_id)
                self._release_adapter(row)
                ctx.cache_length = 0
                break
            self.waiting.popleft()
            self.running.append(row)

    def _prefill_batch(self, rows: list[GenerationRow]) -> list[GenerationRow]:
        """Chunks of pending prompts under the token budget; every replica's part of the
        batch pads to one bucket of (rows, tokens), which must be in the bucket set."""
        batch, budget = [], self.prefill_chunk_size
        per_replica = [0] * self.replicas
        for row in rows:
            if budget == 0 or len(batch) == self.capacity:
                break
            if row not in self.running:  # preempted by an earlier row's reservation
                continue
            replica = self.kv.replica_of(row.ctx.request_id)
            n = min(row.ctx.pending, budget)
            if row.echo_pending and n < row.ctx.pending:  # echo's prompt runs whole, in a later step
                continue
            widest = max(per_replica[replica] + 1, max(per_replica))
            if not self.pipeline.model.prefill_fits(widest, max([n] + [r.ctx.chunk for r in batch])):
                break
            if not self._reserve(row, row.ctx.cache_length + n):
                continue
            row.ctx.chunk = n
            batch.append(row)
            per_replica[replica] += 1
            budget -= n
        return [r for r in batch if r in self.running]  # a later reservation may have preempted an earlier row

    def _mixed_batch(self, prefill: list[GenerationRow], decode: list[GenerationRow]) -> list[GenerationRow]:
        """One token of every decode row and a chunk of the oldest pending prompt on each
        replica: the model runs them as one step (decode rows, then the chunks)."""
        for row in decode:
            if row in self.running:
                self._reserve(row, row.ctx.cache_length + 1)
        chunks: dict[int, GenerationRow] = {}  # replica -> its chunk's row
        for row in prefill:
            replica = self.kv.replica_of(row.ctx.request_id) if row in self.running else None
            if replica is None or replica in chunks:
                continue
            n = min(row.ctx.pending, self.prefill_chunk_size)
            if self._reserve(row, row.ctx.cache_length + n):
                row.ctx.chunk = n
                chunks[replica] = row
        return [r for r in decode + list(chunks.values()) if r in self.running]

    def _decode_batch(self, rows: list[GenerationRow]) -> list[GenerationRow]:
        steps = self.max_num_steps
        for row in rows:
            if row in self.running:
                ahead = min(steps, row.max_new - len(row.ctx.generated))
                self._reserve(row, row.ctx.cache_length + ahead)
        return [r for r in rows if r in self.running]

    def _reserve(self, row: GenerationRow, total_tokens: int) -> bool:
        """Pages for `total_tokens` of `row`, preempting the newest requests if needed."""
        rid = row.ctx.request_id
        replica = self.kv.replica_of(rid)
        while self.kv.pages_short(rid, total_tokens):  # only rows on the same replica free pages for it
            victim = max(self._rows_on(replica), key=lambda r: self._arrival[r.ctx.request_id])
            self._preempt(victim)
            if victim is row:
                return False
        self.kv.reserve(rid, total_tokens)
        return True

    def _release_adapter(self, row: GenerationRow) -> None:
        if row.ctx.lora_name is not None:
            self.pipeline.model.lora_manager.release(row.ctx.lora_name)

    def _preempt(self, row: GenerationRow) -> None:
        self.running.remove(row)
        self.kv.release(row.ctx.request_id)
        self._release_adapter(row)
        row.ctx.cache_length, row.ctx.chunk = 0, None  # recompute from its tokens so far
        self.waiting.appendleft(row)
        self.stats.preemptions += 1

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is (waiting, running, or in a decode block still on the
        device): its pages are free when this returns, and it is never stepped again. False if
        the scheduler does not hold it (finished, or never added)."""
        row = next((r for r in [*self.running, *self.waiting] if r.ctx.request_id == request_id), None)
        if row is None:
            return False
        row.done, row.finish_reason = True, "abort"  # an in-flight block's tokens for it are ignored
        if row in self.running:
            self._finish(row)  # the block's writes land in freed pages ahead of any later step
        else:
            self.waiting.remove(row)
            del self._arrival[request_id]
        return True

    def _finish(self, row: GenerationRow) -> None:
        self.running.remove(row)
        self.kv.release(row.ctx.request_id)
        self._release_adapter(row)
        del self._arrival[row.ctx.request_id]

    # -- drivers -------------------------------------------------------------------
    def run(self, requests: Iterable[TextGenerationRequest], *, use_tqdm: bool = False) -> list[TextGenerationOutput]:
        """Every request to completion; each is validated before anything runs."""
        rows = [self.check(r) for r in requests]  # all valid before any is queued
        ids = [r.ctx.request_id for r in rows]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise RequestError(f"request ids {twice[:5]} appear more than once in one run: give each request "
                               "its own id.")
        rows = [self._enqueue(r) for r in rows]
        bar = tqdm(total=len(rows), desc="generating", unit="req", disable=not use_tqdm)
        try:
            while self.has_work:
                for r in self.step():
                    if r.done:
                        bar.update(1)
        finally:
            bar.close()
            self._drop_all()
        return [self.pipeline.output(r) for r in rows]

    def stream(self, request: TextGenerationRequest) -> Iterator[str]:
        """Yield one request's text as it is generated."""
        row = self.add(request)
        try:
            while not row.done:
                self.step()
                piece = self.pipeline.stream_text(row)
                if piece:
                    yield piece
        finally:
            self._drop_all()

    def _drop_all(self) -> None:
        """After an error or an abandoned stream: free every page so the next call starts clean."""
        self._inflight = None  # its writes land in pages freed here, ahead of any later step on the device
        for row in list(self.running):
            self._finish(row)
        self.waiting.clear()
        self._arrival.clear()
