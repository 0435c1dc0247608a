"""The engine thread: the one owner of the device, the scheduler and every request in flight.

HTTP handlers never touch the model. They `submit` requests and `abort` them through a
thread-safe inbox; the engine thread takes what is in the inbox before every step, so a request
from any connection joins the running batch at the next step (continuous batching across clients),
and sends each request's results back through its sink, a callable the handler gave (the server's
puts them on its event loop).

Multi-host: every process runs this loop. Process 0 takes the inbox and `exchange` broadcasts what
it took to the others before each step, so every process adds, aborts and steps the same requests
in the same order (stop strings included: each process's pipeline detokenizes the same tokens the
same way).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from maxlike.interfaces import LogProbabilities, RequestError, TextGenerationRequest

log = logging.getLogger("maxlike.serve")


@dataclass
class Submission:
    """One request for the engine (stop strings are its SamplingParams.stop)."""

    request: TextGenerationRequest
    index: int = 0  # the choice it is, in its HTTP response


@dataclass
class Event:
    """What the engine sends a request's sink: "accepted" (queued), "error" (refused, alone), or
    "delta" (new text and tokens; `finish_reason` set on the last one)."""

    kind: str
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogProbabilities] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


Sink = Callable[[Event], None]


@dataclass(eq=False)
class _Live:
    """Engine-side state of one request in flight."""

    submission: Submission
    sink: Sink | None  # None on the other processes of a multi-host job
    row: Any  # GenerationRow
    arrival: float
    sent_tokens: int = 0
    sent_logprobs: int = 0
    last_token_at: float | None = None


def local_exchange(commands: list) -> list:
    """One process: what process 0 took is what everyone runs."""
    return commands


class Engine:
    """Load the model (in the engine thread), then step the scheduler while there is work.

    `factory()` returns an `LLM`; it runs in the engine thread so the server can answer `/health`
    (503) while weights load and executables compile. `metrics` (optional) is told about every
    step and every token.
    """

    def __init__(self, factory: Callable[[], Any], *, metrics: Any = None,
                 exchange: Callable[[list], list] = local_exchange, lead: bool = True) -> None:
        self._factory = factory
        self._exchange = exchange
        self.lead = lead  # process 0: takes the inbox, owns the sinks
        self.metrics = metrics
        self.llm: Any = None
        self.ready = threading.Event()  # set once loaded (or failed: see load_error)
        self.load_error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0  # submissions in the inbox, not yet in the scheduler
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._sinks: dict[str, Sink] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the handlers' side ------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self.run, name="maxlike-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, submissions: list[Submission], sink: Sink) -> None:
        """Queue requests; each gets an "accepted" or an "error" event, then its deltas."""
        with self._lock:
            self._queued += len(submissions)
            for s in submissions:
                self._sinks[s.request.request_id] = sink
        self._inbox.put(("add", submissions))

    def abort(self, request_id: str) -> None:
        """Drop a request (a client went away): its pages are free after the next step."""
        self._inbox.put(("abort", request_id))

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not running yet (inbox plus the scheduler's queue)."""
        scheduler = self.llm.scheduler if self.llm is not None else None
        return self._queued + (len(scheduler.waiting) if scheduler is not None else 0)

    @property
    def num_running(self) -> int:
        return len(self.llm.scheduler.running) if self.llm is not None else 0

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop once the requests in flight have finished (the server stops taking new ones first)."""
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the engine thread -------------------------------------------------------
    def run(self) -> None:
        try:
            self.llm = self._factory()
        except BaseException as e:  # noqa: BLE001 - reported by the server, which then exits
            self.load_error = e
            self.ready.set()
            log.error("maxlike: the model failed to load: %s: %s", type(e).__name__, e)
            return
        if self.metrics is not None:
            self.metrics.on_ready(self)
        self.ready.set()
        scheduler = self.llm.scheduler
        while True:
            commands = self._exchange(self._take(block=not scheduler.has_work) if self.lead else [])
            for kind, value in commands:
                if kind == "add":
                    self._add(value)
                elif kind == "abort":
                    self._abort(value)
                else:
                    self._stopping = True
            if commands and self.metrics is not None:  # an abort frees pages even when nothing steps next
                self.metrics.on_step(self, None, None)
            if not scheduler.has_work:
                if self._stopping:
                    return
                continue
            t = time.perf_counter()
            try:
                rows = scheduler.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                self._fail_all(e)
                continue
            if self.metrics is not None:
                self.metrics.on_step(self, len(rows), time.perf_counter() - t)
            for row in rows:
                live = self._live.get(row.ctx.request_id)
                if live is not None:
                    self._emit(live)

    def _take(self, *, block: bool) -> list:
        """Everything in the inbox now; when idle, wait a little for the first command."""
        out = []
        try:
            out.append(self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait())
            while True:
                out.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return out

    def _add(self, submissions: list[Submission]) -> None:
        scheduler = self.llm.scheduler
        for s in submissions:
            rid = s.request.request_id
            with self._lock:
                self._queued -= self.lead
                sink = self._sinks.pop(rid, None)
            try:
                row = scheduler.add(s.request)
            except RequestError as e:
                self._send(sink, Event("error", s.index, error=str(e)))
                continue
            self._live[rid] = _Live(s, sink, row, time.perf_counter())
            self._send(sink, Event("accepted", s.index, prompt_tokens=row.ctx.prompt_length))

    def _abort(self, request_id: str) -> None:
        live = self._live.pop(request_id, None)  # None: refused or finished already
        if live is not None:
            self.llm.scheduler.abort(request_id)
            if self.metrics is not None:
                self.metrics.on_finish("abort", live.row)

    def _fail_all(self, error: Exception) -> None:
        """A step raised: every request in flight gets an error (its client a 500), the scheduler
        drops them all (pages freed), and the engine goes on with the next requests."""
        log.exception("maxlike: an engine step failed; failing the %d requests in flight", len(self._live))
        for rid, live in list(self._live.items()):
            self.llm.scheduler.abort(rid)
            self._send(live.sink, Event("error", live.submission.index, error=f"{type(error).__name__}: {error}",
                                        finish_reason="error"))
            if self.metrics is not None:
                self.metrics.on_finish("error", live.row)
        self._live.clear()

    def _emit(self, live: _Live) -> None:
        """Send what a step added to one request: text (the pipeline holds back or cuts stop
        strings), token ids, log-probabilities, and its finish reason once it is done."""
        row, rid = live.row, live.row.ctx.request_id
        generated = row.ctx.generated
        new_ids = [int(t) for t in generated[live.sent_tokens:]]
        text = self.llm.pipeline.stream_text(row)
        finish = row.finish_reason if row.done else None
        if not new_ids and not text and finish is None:
            return
        now = time.perf_counter()
        if self.metrics is not None and new_ids:
            self.metrics.on_tokens(now - (live.last_token_at or live.arrival), len(new_ids),
                                   first=live.last_token_at is None)
        live.last_token_at = now if new_ids else live.last_token_at
        live.sent_tokens = len(generated)
        logprobs = row.logprobs[live.sent_logprobs:]
        live.sent_logprobs = len(row.logprobs)
        self._send(live.sink, Event("delta", live.submission.index, text, new_ids, logprobs, finish,
                                    row.ctx.prompt_length, len(generated)))
        if finish is not None:
            del self._live[rid]
            if self.metrics is not None:
                self.metrics.on_finish(finish, row)

    @staticmethod
    def _send(sink: Sink | None, event: Event) -> None:
        if sink is None:
            return
        try:
            sink(event)
        except Exception:  # noqa: BLE001 - the client's loop is gone; the request is aborted by its handler
            log.debug("maxlike: a result could not be delivered", exc_info=True)
