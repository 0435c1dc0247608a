"""The OpenAI-compatible HTTP face: FastAPI routes over the engine thread.

Each handler validates its body (400s name the parameter), encodes the prompt off the event loop,
submits one engine request per choice and reads the engine's events from an asyncio queue: all of
them for a JSON response, or chunk by chunk as server-sent events. A client that goes away has its
requests aborted (pages freed at the next engine step).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from maxlike.interfaces import MAX_SEED, RequestError, SamplingParams, TextGenerationRequest
from maxlike.serve import protocol
from maxlike.serve.engine import Engine, Event, Submission
from maxlike.serve.metrics import Metrics
from maxlike.serve.protocol import APIError

_POLL_S = 0.2  # how often a waiting handler checks that its client is still there


@dataclass
class ServerSettings:
    served_names: tuple[str, ...]
    api_key: str | None = None
    max_queued_requests: int | None = None


class _ClientGone(Exception):
    pass


@dataclass
class _Choice:
    """One choice's results so far (JSON responses and usage)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, dict[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


class OpenAIServer:
    """The routes' shared state: the engine, the settings, the metrics, a seed source."""

    def __init__(self, engine: Engine, settings: ServerSettings, metrics: Metrics) -> None:
        self.engine, self.settings, self.metrics = engine, settings, metrics
        self._rng = secrets.SystemRandom()
        self._token_text: dict[int, str] = {}
        self._encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="maxlike-tokenize")
        self.created = int(time.time())

    # -- helpers -----------------------------------------------------------------
    @property
    def pipeline(self):
        return self.engine.llm.pipeline

    def check_ready(self) -> None:
        if not self.engine.ready.is_set() or self.engine.llm is None:
            raise APIError(503, "The model is still loading; retry when GET /health answers 200.",
                           type="service_unavailable", code="model_loading", headers={"Retry-After": "5"})

    def adapters(self) -> list[str]:
        """The LoRA adapters clients may name as `model` (none while loading or with LoRA off)."""
        lora = self.engine.llm.pipeline.model.lora_manager if self.engine.llm is not None else None
        return lora.list_adapters() if lora is not None else []

    def check_model(self, name: str) -> str | None:
        """The LoRA adapter `model` names (None: the base model); 404 for a name nobody serves."""
        if name in self.settings.served_names:
            return None
        if name in self.adapters():
            return name
        raise APIError(404, f"The model `{name}` does not exist. This server serves: "
                       f"{', '.join([*self.settings.served_names, *self.adapters()])} (GET /v1/models lists them).",
                       param="model", code="model_not_found")

    def check_length(self, prompt_tokens: int, max_new: int | None, what: str) -> None:
        limit = self.pipeline.max_length
        asked = prompt_tokens + (max_new or 0)
        if asked > limit or prompt_tokens >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{asked} tokens ({prompt_tokens} in the {what}, {max_new or 0} in the completion). "
                           f"Please reduce the length of the {what} or completion.", param=what,
                           code="context_length_exceeded")

    def token_text(self, token: int, as_id: bool = False) -> str:
        """A token as logprobs show it: its text, or "token_id:N" (vLLM's return_tokens_as_token_ids)."""
        if as_id:
            return f"token_id:{token}"
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.pipeline.tokenizer.decode([token])
        return text

    def sampling(self, body: Any, max_new: int | None, logprobs: int) -> SamplingParams:
        try:
            return SamplingParams(
                max_new_tokens=max_new, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=-1 if body.top_k is None else body.top_k,
                seed=self._rng.randrange(MAX_SEED + 1) if body.seed is None else body.seed,
                ignore_eos=body.ignore_eos, stop_token_ids=tuple(body.stop_token_ids or ()), logprobs=logprobs,
                echo=bool(getattr(body, "echo", False)) and logprobs > 0, stop=protocol.stop_strings(body),
                min_p=body.min_p or 0.0, repetition_penalty=1.0 if body.repetition_penalty is None else
                body.repetition_penalty, frequency_penalty=body.frequency_penalty or 0.0,
                presence_penalty=body.presence_penalty or 0.0, min_new_tokens=body.min_tokens or 0,
                logit_bias=body.logit_bias, response_format=body.response_format)
        except RequestError as e:
            raise APIError(400, str(e)) from None

    async def encode(self, rid: str, **prompt) -> list[int]:
        """Token ids, computed off the event loop on one thread: transformers' tokenizers set their
        truncation state on every call and must not encode from two threads at once."""
        try:
            request = TextGenerationRequest(rid, **prompt)
            return await asyncio.get_running_loop().run_in_executor(self._encoder, self.pipeline.encode, request)
        except RequestError as e:
            raise APIError(400, str(e)) from None

    # -- one generation ----------------------------------------------------------
    async def generate(self, request: Request, rid: str, prompts: list[list[int]], params: SamplingParams, n: int,
                       lora: str | None = None) -> tuple[list[Submission], asyncio.Queue]:
        """Submit n choices per prompt; wait until the engine has accepted them all (or refused one:
        then the others are aborted and the refusal is a 400)."""
        subs = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                p = params.choice(j)
                subs.append(Submission(TextGenerationRequest(f"{rid}-{len(subs)}", prompt=ids, sampling_params=p,
                                                             lora_name=lora), index=i * n + j))
        limit = self.settings.max_queued_requests
        if limit is not None and self.engine.num_waiting + len(subs) > limit:
            raise APIError(503, f"The server is at capacity: {self.engine.num_waiting} requests are waiting "
                           f"(--max-queued-requests {limit}). Retry later.", type="service_unavailable",
                           code="queue_full", headers={"Retry-After": "1"})
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.engine.submit(subs, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        acks = [await self._next(events, request, subs) for _ in subs]  # one add: acks come before any delta
        refused = [ev for ev in acks if ev.kind == "error"]
        if refused:
            self.abort(subs)
            raise APIError(400, refused[0].error)
        return subs, events

    async def _next(self, events: asyncio.Queue, request: Request, subs: list[Submission]) -> Event:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), _POLL_S)
                if ev.kind == "error" and ev.finish_reason == "error":  # the engine failed mid-request
                    self.abort(subs)
                    raise APIError(500, f"The engine failed while generating: {ev.error}", type="server_error")
                return ev
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.abort(subs)
                    raise _ClientGone() from None

    def abort(self, subs: list[Submission]) -> None:
        for s in subs:
            self.engine.abort(s.request.request_id)

    async def collect(self, request: Request, subs: list[Submission], events: asyncio.Queue) -> list[_Choice]:
        choices = [_Choice() for _ in subs]
        open_ = len(subs)
        while open_:
            ev = await self._next(events, request, subs)
            c = choices[ev.index]
            c.text += ev.text
            c.token_ids += ev.token_ids
            c.logprobs += self.flat_logprobs(ev, subs[ev.index].request.prompt)
            c.completion_tokens = ev.completion_tokens
            if ev.finish_reason is not None:
                c.finish_reason = ev.finish_reason
                open_ -= 1
        return choices

    @staticmethod
    def flat_logprobs(ev: Event, prompt: list[int]) -> list[tuple[int, float, dict[int, float]]]:
        """(token, its log-prob, top alternatives) per position of the event's log-probabilities:
        its new tokens' (after the prompt's, from the second token on, in an echo's first event).
        -inf (a token the processed distribution excludes) is sent as -9999.0, as OpenAI and vLLM do:
        JSON has no infinity."""
        chosen = [max(v, -9999.0) for lp in ev.logprobs for v in lp.token_log_probabilities]
        tops = [{t: max(v, -9999.0) for t, v in top.items()} for lp in ev.logprobs for top in lp.top_log_probabilities]
        tokens = (list(prompt[1:]) + ev.token_ids)[-len(chosen):] if chosen else []
        return list(zip(tokens, chosen, tops))

    async def events_until_done(self, request: Request, subs: list[Submission],
                                events: asyncio.Queue) -> AsyncIterator[Event]:
        """The deltas of every choice until all have finished. An engine failure midway ends the
        stream with an error event (the status line is sent already), as vLLM does."""
        open_ = len(subs)
        while open_:
            try:
                ev = await self._next(events, request, subs)
            except APIError as e:
                yield Event("error", error=json.dumps(e.body()))
                return
            open_ -= ev.finish_reason is not None
            yield ev


def _as_ids(body: Any) -> bool:
    return getattr(body, "return_tokens_as_token_ids", None) is True  # a vLLM extension


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def build_app(engine: Engine, settings: ServerSettings, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="maxlike", docs_url=None, redoc_url=None)
    server = OpenAIServer(engine, settings, metrics)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     type=kind).body(), status_code=e.status_code)

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, e: _ClientGone):
        return Response(status_code=499)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        key = settings.api_key
        if key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return JSONResponse(APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                                             "<key>' with the key the server was started with (--api-key).",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if engine.load_error is not None:
            return JSONResponse({"status": "failed", "error": str(engine.load_error)}, status_code=500)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        limit = engine.llm.pipeline.max_length if engine.llm is not None else None
        base = [{"id": name, "object": "model", "created": server.created, "owned_by": "maxlike",
                 "max_model_len": limit} for name in settings.served_names]
        adapters = [{"id": name, "object": "model", "created": server.created, "owned_by": "maxlike",
                     "max_model_len": limit, "parent": settings.served_names[0]} for name in server.adapters()]
        return {"object": "list", "data": base + adapters}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = protocol.parse(protocol.ChatCompletionRequest, await request.body())
        lora = server.check_model(body.model)
        server.check_ready()
        max_new, max_name = ((body.max_completion_tokens, "max_completion_tokens")
                             if body.max_completion_tokens is not None else (body.max_tokens, "max_tokens"))
        protocol.check_common(body, max_new, max_name)
        protocol.check_logprobs(body.top_logprobs, "top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else 0
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        ids = await server.encode(rid, messages=protocol.chat_messages(body.messages))
        server.check_length(len(ids), max_new, "messages")
        params = server.sampling(body, max_new, max(top, 1) if body.logprobs else 0)
        subs, events = await server.generate(request, rid, [ids], params, body.n, lora)
        head = {"id": rid, "created": int(time.time()), "model": body.model}

        def logprobs(entries):
            return {"content": [_chat_logprob(server, t, lp, alts, top, _as_ids(body)) for t, lp, alts in entries]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                chunk = {**head, "object": "chat.completion.chunk"}
                done: dict[int, int] = {}
                try:
                    for i in range(len(subs)):
                        yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}]})
                    async for ev in server.events_until_done(request, subs, events):
                        if ev.kind == "error":
                            yield f"data: {ev.error}\n\n"
                            break
                        entries = server.flat_logprobs(ev, ids)
                        yield sse({**chunk, "choices": [{
                            "index": ev.index, "delta": {"content": ev.text} if ev.text else {},
                            "logprobs": logprobs(entries) if body.logprobs else None,
                            "finish_reason": ev.finish_reason}]})
                        if ev.finish_reason is not None:
                            done[ev.index] = ev.completion_tokens
                    if include_usage:
                        yield sse({**chunk, "choices": [], "usage": _usage(len(ids), sum(done.values()))})
                    yield "data: [DONE]\n\n"
                finally:
                    if len(done) < len(subs):  # the client went away mid-stream
                        server.abort(subs)

            return StreamingResponse(stream(), media_type="text/event-stream")

        choices = await server.collect(request, subs, events)
        return {**head, "object": "chat.completion", "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text},
             "logprobs": logprobs(c.logprobs) if body.logprobs else None, "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)], "usage": _usage(len(ids), sum(c.completion_tokens for c in choices))}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = protocol.parse(protocol.CompletionRequest, await request.body())
        lora = server.check_model(body.model)
        server.check_ready()
        protocol.check_common(body, body.max_tokens, "max_tokens")
        protocol.check_logprobs(body.logprobs, "logprobs")
        rid = f"cmpl-{secrets.token_hex(12)}"
        prompts = protocol.completion_prompts(body.prompt)
        ids = [await server.encode(rid, prompt=p) for p in prompts]
        for p in ids:
            server.check_length(len(p), body.max_tokens, "prompt")
        top = body.logprobs
        params = server.sampling(body, body.max_tokens, max(top, 1) if top is not None else 0)
        subs, events = await server.generate(request, rid, ids, params, body.n, lora)
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model}
        n = body.n
        prompt_tokens = sum(len(p) for p in ids)

        def echo_text(index: int) -> str:
            p = prompts[index // n]
            return p if isinstance(p, str) else server.pipeline.tokenizer.decode(p)

        def logprobs(entries, offset: int, index: int, first: bool):
            if top is None:
                return None
            if first and body.echo:  # the first prompt token has no log-prob
                entries = [(ids[index // n][0], None, None)] + entries
            return _completion_logprobs(server, entries, top, offset, _as_ids(body))

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                done: dict[int, int] = {}
                offsets = [0] * len(subs)
                started = [False] * len(subs)
                try:
                    async for ev in server.events_until_done(request, subs, events):
                        if ev.kind == "error":
                            yield f"data: {ev.error}\n\n"
                            break
                        first = not started[ev.index]
                        text = (echo_text(ev.index) if body.echo and first else "") + ev.text
                        lp = logprobs(server.flat_logprobs(ev, ids[ev.index // n]), offsets[ev.index], ev.index, first)
                        started[ev.index] = True
                        offsets[ev.index] += len(text)
                        yield sse({**head, "choices": [{"index": ev.index, "text": text, "logprobs": lp,
                                                        "finish_reason": ev.finish_reason}]})
                        if ev.finish_reason is not None:
                            done[ev.index] = ev.completion_tokens
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": _usage(prompt_tokens, sum(done.values()))})
                    yield "data: [DONE]\n\n"
                finally:
                    if len(done) < len(subs):
                        server.abort(subs)

            return StreamingResponse(stream(), media_type="text/event-stream")

        choices = await server.collect(request, subs, events)
        out = []
        for i, c in enumerate(choices):
            text = (echo_text(i) if body.echo else "") + c.text
            out.append({"index": i, "text": text, "logprobs": logprobs(c.logprobs, 0, i, True),
                        "finish_reason": c.finish_reason})
        return {**head, "choices": out, "usage": _usage(prompt_tokens, sum(c.completion_tokens for c in choices))}

    return app


def _chat_logprob(server: OpenAIServer, token: int, logprob: float, alts: dict[int, float], top: int,
                  as_ids: bool) -> dict:
    def entry(t: int, lp: float) -> dict:
        text = server.token_text(t, as_ids)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    ranked = sorted(alts.items(), key=lambda kv: -kv[1])[:top]
    return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in ranked]}


def _completion_logprobs(server: OpenAIServer, entries: list, top: int, offset: int, as_ids: bool) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for token, lp, alts in entries:
        text = server.token_text(token, as_ids)
        tokens.append(text)
        token_lps.append(lp)
        ranked = [] if alts is None else sorted(alts.items(), key=lambda kv: -kv[1])[:max(top, 1)]
        tops.append(None if alts is None else {server.token_text(t, as_ids): v for t, v in ranked})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
