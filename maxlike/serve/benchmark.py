"""A serving benchmark that speaks only the OpenAI HTTP API (`POST /v1/completions`, streamed).

It works against maxlike's own server or any OpenAI-compatible one (vLLM, MAX, SGLang).
Every figure is measured on the client, from the moment a request is sent:

- TTFT (time to first token): until the first streamed chunk that carries non-empty text.
- ITL (inter-token latency): every gap between two consecutive text-carrying chunks
  (a server that packs several tokens into one chunk shows one longer gap).
- E2EL (end-to-end latency): until the stream ends (`data: [DONE]`).
- TPOT (time per output token): (E2EL - TTFT) / (output tokens - 1), for requests with
  more than one output token; the decode speed one user sees, first token excluded.

Output tokens come from the final usage chunk's `completion_tokens` (we ask for it with
`stream_options.include_usage`), else the count of text chunks. Throughputs divide the
totals of successful requests by the wall time of the whole run. Latencies are reported
in milliseconds as mean and p50/p90/p99 (numpy's linear percentile) over successful requests.
`ignore_eos` (a vLLM/MAX extension, on by default) makes every request produce exactly
`max_tokens` tokens, so runs are comparable across servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (the completions API takes both)
    max_tokens: int
    prompt_len: int | None = None  # known for token-id prompts


@dataclass
class RequestRecord:
    success: bool = False
    error: str = ""
    status: int | None = None  # HTTP status of a failed request
    ttft: float | None = None  # seconds, like every time here
    itl: list[float] = field(default_factory=list)
    latency: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def _check_range(name: str, lo_hi: tuple[int, int]) -> tuple[int, int]:
    lo, hi = lo_hi
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {lo_hi}")
    return lo, hi


def random_workload(num_requests: int, input_len: tuple[int, int] = (16, 512),
                    output_len: tuple[int, int] = (64, 128), vocab_size: int = 32000,
                    seed: int = 0) -> list[BenchRequest]:
    """Prompts of random token ids in [100, min(vocab_size, 30000)) (no low special ids);
    lengths uniform in the inclusive ranges."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be at least 1, got {num_requests}")
    (ilo, ihi), (olo, ohi) = _check_range("input_len", input_len), _check_range("output_len", output_len)
    top = min(vocab_size, 30000)
    if top <= 100:
        raise ValueError(f"vocab_size must be over 100 (ids below 100 are avoided), got {vocab_size}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_requests):
        ids = rng.integers(100, top, size=int(rng.integers(ilo, ihi + 1))).tolist()
        out.append(BenchRequest(ids, int(rng.integers(olo, ohi + 1)), len(ids)))
    return out


def jsonl_workload(path: str, num_requests: int | None = None,
                   output_len: tuple[int, int] = (64, 128), seed: int = 0) -> list[BenchRequest]:
    """The first `num_requests` lines (all when None) of a JSONL file of
    {"prompt": str | [ids], "max_tokens": int (optional, else uniform in output_len)}."""
    olo, ohi = _check_range("output_len", output_len)
    rng = np.random.default_rng(seed)
    fix = 'each line must be one JSON object like {"prompt": "Hello", "max_tokens": 128}'
    out: list[BenchRequest] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if num_requests is not None and len(out) >= num_requests:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: bad JSON ({e.msg}); {fix}") from None
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
            if not (isinstance(prompt, str) or ids) or not prompt:
                raise ValueError(f'{path} line {n}: missing or empty "prompt" (a string or a list '
                                 f'of token ids); {fix}')
            max_tokens = obj.get("max_tokens", int(rng.integers(olo, ohi + 1)))
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise ValueError(f'{path} line {n}: "max_tokens" must be a positive integer; {fix}')
            out.append(BenchRequest(prompt, max_tokens, len(prompt) if ids else None))
    if not out:
        raise ValueError(f"{path}: no requests; {fix}")
    return out


def _error_message(body: str) -> str:
    """The message of an OpenAI-style ({"error": {"message"}}), vLLM or FastAPI error body."""
    try:
        obj = json.loads(body)
        err = obj.get("error", obj)
        msg = err.get("message") or err.get("detail") if isinstance(err, dict) else err
        if msg:
            return str(msg)
    except (ValueError, AttributeError):
        pass
    return body.strip()[:500]


async def send_request(client: httpx.AsyncClient, url: str, payload: dict,
                       headers: dict, prompt_len: int | None = None) -> RequestRecord:
    """One streamed completion; every outcome (but cancellation) lands in the record."""
    rec, usage, text_chunks, last = RequestRecord(), {}, 0, None
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                rec.status = resp.status_code
                body = (await resp.aread()).decode("utf-8", "replace")
                rec.error = f"HTTP {resp.status_code}: {_error_message(body)}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    rec.error = f"stream error: {_error_message(data)}"
                    return rec
                now = time.perf_counter()
                if any(c.get("text") for c in chunk.get("choices") or []):
                    if last is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last, text_chunks = now, text_chunks + 1
                usage = chunk.get("usage") or usage
    except Exception as e:  # refused, reset, timed out, a chunk that isn't JSON: this request's error only
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.latency = time.perf_counter() - start
    rec.output_tokens = usage.get("completion_tokens") or text_chunks
    rec.prompt_tokens = usage.get("prompt_tokens", prompt_len)
    rec.success = True
    return rec


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ms = np.asarray(values, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    ok = [r for r in records if r.success]
    errors = [r.error for r in records if not r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: None)
    return {
        "completed": len(ok), "errors": len(errors), "error_samples": errors[:5],
        "duration_s": duration_s,
        "request_throughput": per_s(len(ok)), "output_throughput": per_s(out_tokens),
        "total_input_tokens": sum(r.prompt_tokens or 0 for r in ok), "total_output_tokens": out_tokens,
        "ttft_ms": _stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats([g for r in ok for g in r.itl]),
        "e2el_ms": _stats([r.latency for r in ok]),
    }


def _base(url: str) -> str:
    """http:// added when missing; a trailing / or /v1 dropped (we add /v1/... ourselves)."""
    url = url if "://" in url else "http://" + url
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


async def run_benchmark(base_url: str, model: str, requests: list[BenchRequest], *,
                        concurrency: int | None = None, request_rate: float = math.inf,
                        api_key: str | None = None, timeout_s: float = 600,
                        ignore_eos: bool = True, seed: int = 0) -> dict:
    """Send `requests` with at most `concurrency` in flight and/or Poisson arrivals at
    `request_rate` per second; after `timeout_s` what is left is cancelled ("timed out")."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be positive (inf: all at once), got {request_rate}")
    url = _base(base_url) + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    rng = np.random.default_rng(seed)
    records = [RequestRecord(error="timed out") for _ in requests]  # until each one finishes
    tasks: list[asyncio.Task] = []

    async def one(client: httpx.AsyncClient, i: int, req: BenchRequest) -> None:
        payload = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "stream": True,
                   "stream_options": {"include_usage": True}, "temperature": 0}
        if ignore_eos:
            payload["ignore_eos"] = True
        if gate is None:
            records[i] = await send_request(client, url, payload, headers, req.prompt_len)
        else:
            async with gate:
                records[i] = await send_request(client, url, payload, headers, req.prompt_len)

    async def dispatch(client: httpx.AsyncClient) -> None:
        for i, req in enumerate(requests):
            if i and math.isfinite(request_rate):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
            tasks.append(asyncio.create_task(one(client, i, req)))
        await asyncio.gather(*tasks)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        start = time.perf_counter()
        try:
            await asyncio.wait_for(dispatch(client), timeout_s)
        except asyncio.TimeoutError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        duration = time.perf_counter() - start
    summary = summarize(records, duration)
    summary["config"] = {"base_url": base_url, "model": model, "num_requests": len(requests),
                         "concurrency": concurrency, "request_rate": request_rate, "api_key": bool(api_key),
                         "timeout_s": timeout_s, "ignore_eos": ignore_eos, "seed": seed}
    return summary


def benchmark(*args, **kwargs) -> dict:
    """run_benchmark, synchronously (same arguments)."""
    return asyncio.run(run_benchmark(*args, **kwargs))


def print_summary(summary: dict, file=None) -> None:
    """A compact table: counts and throughputs, then one row of mean/p50/p90/p99 per latency."""
    def show(v):
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    c = summary.get("config")
    rows = [("Concurrency / request rate (req/s):", f"{c['concurrency'] or '-'} / {c['request_rate']}")] if c else []
    rows += [("Successful requests:", summary["completed"]), ("Failed requests:", summary["errors"]),
             ("Benchmark duration (s):", summary["duration_s"]),
             ("Total input tokens:", summary["total_input_tokens"]),
             ("Total generated tokens:", summary["total_output_tokens"]),
             ("Request throughput (req/s):", summary["request_throughput"]),
             ("Output token throughput (tok/s):", summary["output_throughput"])]
    print(f"{' Serving Benchmark Result ':=^56}", file=file)
    for label, value in rows:
        print(f"{label:<40}{show(value):>16}", file=file)
    print(f"{'(ms)':<16}" + "".join(f"{h:>10}" for h in ("mean", "p50", "p90", "p99")), file=file)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = summary[key]
        print(f"{key[:-3].upper():<16}" + "".join(f"{show(stats[h]):>10}" for h in ("mean", "p50", "p90", "p99")),
              file=file)
    for msg in summary["error_samples"]:
        print(f"error: {msg}", file=file)
    print("=" * 56, file=file)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--endpoint", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    a("--model", help="model name (default: the first id from GET /v1/models)")
    a("--api-key", help="sent as 'Authorization: Bearer KEY'")
    a("--num-requests", type=int, default=256)
    a("--input-len", type=int, nargs=2, default=(16, 512), metavar=("LO", "HI"),
      help="random prompt length range in tokens (default 16 512)")
    a("--output-len", type=int, nargs=2, default=(64, 128), metavar=("LO", "HI"),
      help="max_tokens range (default 64 128)")
    a("--dataset", metavar="PATH", help='JSONL of {"prompt": ..., "max_tokens": ...} (default: random prompts)')
    a("--vocab-size", type=int, default=32000, help="token ids for random prompts stay below this")
    a("--concurrency", type=int, help="at most N requests in flight")
    a("--request-rate", type=float, default=math.inf, help="Poisson arrivals, req/s (default inf: all at once)")
    a("--seed", type=int, default=0)
    a("--timeout", type=float, default=600, help="whole-run limit in seconds (default 600)")
    a("--no-ignore-eos", dest="ignore_eos", action="store_false", help="let requests stop at EOS")
    a("--output-json", metavar="PATH", help="write the summary here as JSON")


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "inf": strict JSON has no Infinity
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    return [_jsonable(v) for v in x] if isinstance(x, list) else x


def main_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; 0 when every request succeeded, else 1."""
    base = _base(args.endpoint)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        resp = httpx.get(base + "/v1/models", headers=headers, timeout=10)  # also a reachability check
    except httpx.HTTPError as e:
        print(f"error: cannot reach {base} ({type(e).__name__}: {e}); is the server running?", file=sys.stderr)
        return 1
    model = args.model
    if model is None:
        try:
            resp.raise_for_status()
            model = resp.json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            print(f"error: could not read a model id from {base}/v1/models (HTTP {resp.status_code}); "
                  "pass --model", file=sys.stderr)
            return 1
    try:
        if args.dataset:
            reqs = jsonl_workload(args.dataset, args.num_requests, tuple(args.output_len), args.seed)
        else:
            reqs = random_workload(args.num_requests, tuple(args.input_len), tuple(args.output_len),
                                   args.vocab_size, args.seed)
        print(f"Benchmarking {model} at {base}: {len(reqs)} requests", file=sys.stderr)
        summary = benchmark(base, model, reqs, concurrency=args.concurrency, request_rate=args.request_rate,
                            api_key=args.api_key, timeout_s=args.timeout, ignore_eos=args.ignore_eos,
                            seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(_jsonable(summary), f, indent=2)
    return 0 if summary["errors"] == 0 else 1
