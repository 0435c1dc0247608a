"""maxlike.serve.benchmark: figures by hand, the SSE client against a tiny local server."""

from __future__ import annotations

import argparse
import json
import math
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from maxlike.serve import benchmark as bench
from maxlike.serve.benchmark import BenchRequest, RequestRecord

CHUNKS = ["Hel", "lo", "", " wor", "ld"]  # one empty text chunk: neither TTFT nor an ITL gap
TEXT_CHUNKS = [c for c in CHUNKS if c]


def percentile(values, p):
    """Linear interpolation between the two closest ranks of the sorted list."""
    s = sorted(values)
    pos = (len(s) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---- summarize ----

def test_summarize_by_hand():
    ttfts = [0.10, 0.30, 0.20, 0.50]
    recs = [RequestRecord(success=True, ttft=t, latency=t + 1.0, output_tokens=11, prompt_tokens=7,
                          itl=[0.1, 0.1]) for t in ttfts]
    recs.append(RequestRecord(error="HTTP 400: no"))
    s = bench.summarize(recs, duration_s=2.0)
    assert (s["completed"], s["errors"], s["error_samples"]) == (4, 1, ["HTTP 400: no"])
    assert s["request_throughput"] == pytest.approx(4 / 2.0)
    assert s["output_throughput"] == pytest.approx(44 / 2.0)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (28, 44)
    ms = [t * 1000 for t in ttfts]
    assert s["ttft_ms"]["mean"] == pytest.approx(sum(ms) / 4)
    for p in (50, 90, 99):
        assert s["ttft_ms"][f"p{p}"] == pytest.approx(percentile(ms, p))
    assert s["ttft_ms"]["p90"] == pytest.approx(300 + (500 - 300) * 0.7)  # pos 2.7 in [100, 200, 300, 500]
    # TPOT = (latency - ttft) / (output_tokens - 1) = 1.0 s / 10 = 100 ms for every request
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert s["itl_ms"]["p99"] == pytest.approx(100.0)
    assert s["e2el_ms"]["p50"] == pytest.approx(percentile([t * 1000 + 1000 for t in ttfts], 50))


def test_tpot_formula_and_empty_summary():
    assert RequestRecord(success=True, ttft=0.5, latency=2.5, output_tokens=5).tpot == pytest.approx(0.5)
    assert RequestRecord(success=True, ttft=0.5, latency=2.5, output_tokens=1).tpot is None
    s = bench.summarize([], duration_s=0.0)
    assert s["completed"] == 0 and s["request_throughput"] is None
    assert s["ttft_ms"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    bench.print_summary(s)  # no crash on Nones


# ---- workloads ----

def test_random_workload():
    reqs = bench.random_workload(50, input_len=(3, 9), output_len=(4, 6), vocab_size=500, seed=1)
    assert len(reqs) == 50
    for r in reqs:
        assert 3 <= len(r.prompt) <= 9 and r.prompt_len == len(r.prompt) and 4 <= r.max_tokens <= 6
        assert all(100 <= t < 500 for t in r.prompt)
    assert reqs == bench.random_workload(50, input_len=(3, 9), output_len=(4, 6), vocab_size=500, seed=1)


def test_jsonl_workload(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text('{"prompt": "hi", "max_tokens": 3}\n\n{"prompt": [101, 102]}\n{"prompt": "x"}\n')
    reqs = bench.jsonl_workload(str(p), num_requests=2, output_len=(8, 8))
    assert reqs == [BenchRequest("hi", 3, None), BenchRequest([101, 102], 8, 2)]
    p.write_text('{"prompt": "ok"}\n{"prompt": "ok"\n')
    with pytest.raises(ValueError, match=r"line 2: bad JSON.*each line must be one JSON object"):
        bench.jsonl_workload(str(p))
    p.write_text('{"max_tokens": 4}\n')
    with pytest.raises(ValueError, match=r'line 1: missing or empty "prompt"'):
        bench.jsonl_workload(str(p))


# ---- the client against a real local HTTP server ----

class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def do_POST(self):
        srv = self.server
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.payloads.append(payload)
        srv.auth.append(self.headers.get("Authorization"))
        if self.path.startswith("/bad/"):
            return self._json(400, {"error": {"message": "max_tokens too large", "type": "invalid_request"}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if self.path.startswith("/slow/"):
            srv.release.wait(10)  # never finishes within the client's timeout
            return
        with srv.lock:
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        for text in CHUNKS:
            time.sleep(0.02)
            chunk = {"object": "text_completion", "choices": [{"index": 0, "text": text}], "usage": None}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        with srv.lock:
            srv.in_flight -= 1


@contextmanager
def fake_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.payloads, srv.auth, srv.lock, srv.release = [], [], threading.Lock(), threading.Event()
    srv.in_flight = srv.max_in_flight = 0
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def test_stream_record_and_payload():
    with fake_server() as (srv, url):
        s = bench.benchmark(url + "/v1/", "m", [BenchRequest([101, 102, 103], 7, 3)], api_key="sekret")
        assert srv.payloads[0] == {"model": "m", "prompt": [101, 102, 103], "max_tokens": 7, "stream": True,
                                   "stream_options": {"include_usage": True}, "temperature": 0,
                                   "ignore_eos": True}
        assert srv.auth == ["Bearer sekret"]
    assert (s["completed"], s["errors"], s["total_output_tokens"], s["total_input_tokens"]) == (1, 0, 7, 3)
    assert s["ttft_ms"]["mean"] < s["e2el_ms"]["mean"]
    assert s["config"]["model"] == "m" and s["config"]["api_key"] is True


def test_send_request_itl_and_error():
    import asyncio

    import httpx

    async def go(url):
        async with httpx.AsyncClient() as client:
            ok = await bench.send_request(client, url + "/v1/completions", {"prompt": "x"}, {})
            bad = await bench.send_request(client, url + "/bad/v1/completions", {"prompt": "x"}, {})
            return ok, bad

    with fake_server() as (srv, url):
        ok, bad = asyncio.run(go(url))
    assert ok.success and ok.output_tokens == 7 and ok.prompt_tokens == 3
    assert 0 < ok.ttft < ok.latency
    assert len(ok.itl) == len(TEXT_CHUNKS) - 1 and all(g > 0 for g in ok.itl)
    assert ok.tpot == pytest.approx((ok.latency - ok.ttft) / 6)
    assert not bad.success and bad.status == 400 and bad.error == "HTTP 400: max_tokens too large"


def test_concurrency_cap_and_rate():
    reqs = [BenchRequest("x", 4) for _ in range(6)]
    with fake_server() as (srv, url):
        s = bench.benchmark(url, "m", reqs, concurrency=2, ignore_eos=False)
        assert s["completed"] == 6 and srv.max_in_flight <= 2
        assert "ignore_eos" not in srv.payloads[0]
        s = bench.benchmark(url, "m", reqs[:3], request_rate=50.0, concurrency=2, seed=3)
        assert s["completed"] == 3 and s["config"]["request_rate"] == 50.0


def test_timeout_cancels_outstanding():
    with fake_server() as (srv, url):
        t0 = time.perf_counter()
        s = bench.benchmark(url + "/slow", "m", [BenchRequest("x", 4)], timeout_s=0.5)
        assert time.perf_counter() - t0 < 2.5
    assert (s["completed"], s["errors"], s["error_samples"]) == (0, 1, ["timed out"])


# ---- the command-line entry ----

def _args(endpoint, *extra):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--endpoint", endpoint, *extra])


def test_main_from_args(tmp_path, capsys):
    out = tmp_path / "s.json"
    with fake_server() as (srv, url):
        rc = bench.main_from_args(_args(url, "--num-requests", "3", "--input-len", "2", "4",
                                        "--output-len", "5", "5", "--output-json", str(out)))
        assert rc == 0 and srv.payloads[0]["model"] == "fake-model" and srv.payloads[0]["max_tokens"] == 5
        assert bench.main_from_args(_args(url + "/bad", "--model", "m", "--num-requests", "1")) == 1
    summary = json.loads(out.read_text())
    assert summary["completed"] == 3 and summary["config"]["request_rate"] == "inf"
    assert "Request throughput (req/s):" in capsys.readouterr().out


def test_main_unreachable(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert bench.main_from_args(_args(f"127.0.0.1:{port}", "--num-requests", "1")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach http://127.0.0.1:") and "\n" not in err
