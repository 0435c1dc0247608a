"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """Updated by the engine thread after every step; read by `GET /metrics`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("maxlike_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("maxlike_num_requests_waiting", "Requests accepted, waiting for a batch row",
                             registry=r)
        self.finished = Counter("maxlike_request_finished", "Requests finished, by reason (stop, length, abort)",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("maxlike_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("maxlike_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("maxlike_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("maxlike_inter_token_latency_seconds", "Time between a request's generated tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("maxlike_step_batch_rows", "Requests in each engine step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.step_seconds = Histogram("maxlike_step_seconds", "Engine step time", buckets=_LATENCY_BUCKETS,
                                      registry=r)
        self.kv_pages_in_use = Gauge("maxlike_kv_cache_pages_in_use", "KV cache pages held by requests", registry=r)
        self.kv_pages_total = Gauge("maxlike_kv_cache_pages_total", "KV cache pages in the pool", registry=r)
        self.prefix_hit_rate = Gauge("maxlike_prefix_cache_hit_rate",
                                     "Prompt tokens found in the prefix cache / prompt tokens looked up", registry=r)
        self.compiles = Gauge("maxlike_compiles", "Executables compiled since the server started", registry=r)
        self.ready = Gauge("maxlike_ready", "1 once the model is loaded and warm", registry=r)

    def on_ready(self, engine: Any) -> None:
        self.ready.set(1)
        self.on_step(engine, None, None)

    def on_step(self, engine: Any, rows: int | None, seconds: float | None) -> None:
        if rows is not None:
            self.batch_rows.observe(rows)
            self.step_seconds.observe(seconds)
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        kv = engine.llm.pipeline.model.kv_manager
        self.kv_pages_in_use.set(kv.pages_in_use)
        self.kv_pages_total.set(kv.replicas * (kv.num_pages - 1))
        caches = [kv.replica_state(r)[1] for r in range(kv.replicas)]
        queried = sum(c.stats.queried_tokens for c in caches if c is not None)
        self.prefix_hit_rate.set(sum(c.stats.hit_tokens for c in caches if c is not None) / queried if queried else 0)
        self.compiles.set(engine.llm.pipeline.model.session.stats.compiled)

    def on_tokens(self, gap: float, count: int, *, first: bool) -> None:
        self.generation_tokens.inc(count)
        if first:
            self.ttft.observe(gap)
            count -= 1  # the rest of a multi-token first delta came in the same gap
        for _ in range(count):
            self.itl.observe(gap / max(count, 1))

    def on_finish(self, reason: str, row: Any) -> None:
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(row.ctx.prompt_length)

    def render(self) -> bytes:
        return generate_latest(self.registry)
