"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP, against
`LLM.generate` on the same checkpoint (a tiny random Llama). Servers listen on 127.0.0.1, on a free port."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import free_port

MAX_LENGTH, BATCH = 128, 8
NAME = "tiny"


class Running:
    """uvicorn serving `build_app(engine, settings)` in a thread (the engine may be shared)."""

    def __init__(self, engine, settings, metrics):
        from maxlike.serve.app import build_app
        from maxlike.serve.server import run_in_thread

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = run_in_thread(build_app(engine, settings, metrics), "127.0.0.1", self.port)

    def stop(self):
        self.server.should_exit = True


@pytest.fixture(scope="module")
def config(tiny_llama):
    from maxlike.config import PipelineConfig

    return PipelineConfig(model_path=tiny_llama[0], max_length=MAX_LENGTH, max_batch_size=BATCH)


@pytest.fixture(scope="module")
def engine(config):
    from maxlike.serve.engine import Engine
    from maxlike.serve.metrics import Metrics
    from maxlike.serve.server import llm_factory

    metrics = Metrics()
    eng = Engine(llm_factory(config, progress=False), metrics=metrics).start()
    assert eng.ready.wait(120) and eng.load_error is None
    eng.test_metrics = metrics
    yield eng
    eng.shutdown(10)


@pytest.fixture(scope="module")
def server(engine):
    from maxlike.serve.app import ServerSettings

    s = Running(engine, ServerSettings(served_names=(NAME, "alias")), engine.test_metrics)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(config):
    """LLM.generate on the same checkpoint and config: what the server must answer."""
    from maxlike.entrypoints import LLM

    return LLM(config, progress=False)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


PROMPTS = ["hello there", "the quick brown fox", "0123456789 abc"]


def _ids(logprobs_tokens: list[str]) -> list[int]:
    return [int(t.split(":")[1]) for t in logprobs_tokens]


def test_completions_equal_llm_generate(client, reference):
    want = reference.generate_outputs(PROMPTS, max_new_tokens=12, use_tqdm=False)
    for prompt, ref in zip(PROMPTS, want):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=1,
                                      extra_body={"return_tokens_as_token_ids": True})
        choice = r.choices[0]
        assert _ids(choice.logprobs.tokens) == ref.token_ids  # token for token
        assert choice.text == ref.text and choice.finish_reason == ref.finish_reason
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.id and r.created and r.model == NAME
        pieces, usage = [], None
        for chunk in client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                               stream_options={"include_usage": True}):
            pieces += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
        assert "".join(pieces) == choice.text
        assert usage.completion_tokens == len(ref.token_ids)
    # a list of prompts, token ids, n > 1: one choice per (prompt, n)
    ids = [[int(t) for t in w.prompt_token_ids] for w in want[:2]]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [want[0].text] * 2 + [want[1].text] * 2
    r = client.completions.create(model=NAME, prompt=PROMPTS[:2], max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == [want[0].text, want[1].text]
    assert r.usage.prompt_tokens == len(want[0].prompt_token_ids) + len(want[1].prompt_token_ids)
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0, echo=True)
    assert r.choices[0].text == PROMPTS[0] + want[0].text


def test_chat_equals_llm_generate_chat(client, reference):
    want = reference.generate_outputs(PROMPTS, max_new_tokens=10, use_tqdm=False, chat=True)
    for prompt, ref in zip(PROMPTS, want):
        messages = [{"role": "user", "content": prompt}]
        r = client.chat.completions.create(model="alias", messages=messages, max_completion_tokens=10,
                                           temperature=0, logprobs=True, top_logprobs=2,
                                           extra_body={"return_tokens_as_token_ids": True})
        choice = r.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == ref.text
        assert _ids([e.token for e in choice.logprobs.content]) == ref.token_ids
        assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)
        assert choice.finish_reason == ref.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))
        stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
            {"type": "text", "text": prompt}]}], max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}, user="ignored")
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
        assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_stop_strings_end_the_text_across_token_boundaries(client, reference):
    ref = reference.generate_outputs(["abc"], max_new_tokens=24, sampling_params=None, use_tqdm=False)[0]
    text = ref.text
    stop = text[5:8]  # three bytes, three tokens of the byte-level tokenizer: spans token boundaries
    cut = text[: text.index(stop)]
    r = client.completions.create(model=NAME, prompt="abc", max_tokens=24, temperature=0, stop=[stop, "\x00zz"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt="abc", max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_penalties_bias_and_min_tokens_equal_llm_generate(client, reference):
    from maxlike.interfaces import SamplingParams

    params = SamplingParams(top_k=1, max_new_tokens=16, frequency_penalty=0.8, presence_penalty=0.5,
                            repetition_penalty=1.2, min_p=0.05, min_new_tokens=6, logit_bias={40: 3.0, 41: -5.0})
    ref = reference.generate_outputs(["abc"], sampling_params=params, use_tqdm=False)[0]
    plain = reference.generate_outputs(["abc"], max_new_tokens=16, use_tqdm=False)[0]
    assert ref.token_ids != plain.token_ids
    r = client.completions.create(model=NAME, prompt="abc", max_tokens=16, temperature=0, frequency_penalty=0.8,
                                  presence_penalty=0.5, logit_bias={"40": 3.0, "41": -5.0},
                                  extra_body={"repetition_penalty": 1.2, "min_p": 0.05, "min_tokens": 6})
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)


def test_response_format_over_the_server(client):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "json please"}],
                                           max_tokens=40, temperature=1.0, seed=seed, response_format={
                                               "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.completions.create(model=NAME, prompt="pick", max_tokens=8, temperature=1.0,
                                  extra_body={"response_format": {"type": "choice", "choices": ["left", "right"]}})
    assert r.choices[0].text in ("left", "right")


@pytest.mark.slow  # `make test-slow` (the fast suite must stay under 15 minutes)
def test_processed_logprobs_over_the_server(config):
    """logprobs_mode=processed_logprobs: with top_k=3 the three kept tokens' probabilities sum to 1,
    and the alternatives past them (-inf, which JSON cannot hold) arrive as -9999.0, as from OpenAI."""
    import math

    import openai

    from maxlike.serve.app import ServerSettings
    from maxlike.serve.engine import Engine
    from maxlike.serve.metrics import Metrics
    from maxlike.serve.server import llm_factory

    metrics = Metrics()
    eng = Engine(llm_factory(config.replace(logprobs_mode="processed_logprobs"), progress=False),
                 metrics=metrics).start()
    assert eng.ready.wait(120) and eng.load_error is None
    running = Running(eng, ServerSettings(served_names=(NAME,)), metrics)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                              temperature=1.0, seed=3, logprobs=True, top_logprobs=5,
                                              extra_body={"top_k": 3, "ignore_eos": True,
                                                          "return_tokens_as_token_ids": True})
        entries = chat.choices[0].logprobs.content
        legacy = client.completions.create(model=NAME, prompt="hi", max_tokens=4, temperature=1.0, seed=3, logprobs=5,
                                           extra_body={"top_k": 3, "ignore_eos": True,
                                                       "return_tokens_as_token_ids": True}).choices[0].logprobs
        tops = [[t.logprob for t in e.top_logprobs] for e in entries] + [list(t.values()) for t in legacy.top_logprobs]
        assert len(tops) == 8
        for top in tops:
            kept = [v for v in top if v > -9999.0]
            assert len(kept) == 3 and top.count(-9999.0) == 2
            assert math.isclose(sum(math.exp(v) for v in kept), 1.0, rel_tol=1e-4)
        for e in entries:
            assert e.logprob in [t.logprob for t in e.top_logprobs[:3]]
    finally:
        running.stop()
        eng.shutdown(10)


def test_stop_strings_against_a_reference_cut():
    """Any split of a text into pieces: the shown text is the text up to the first stop string."""
    import random

    from maxlike.pipelines.stop_strings import StopStrings

    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab\nxy") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("ab\nxy") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        found = [text.find(s) for s in stops if s in text]
        want = text[: min(found)] if found else text
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        s, shown, stopped = StopStrings(stops), "", False
        for p in pieces:
            out, stopped = s.feed(p)
            shown += out
            if stopped:
                break
        shown += "" if stopped else s.flush()
        assert (shown, stopped) == (want, bool(found)), (text, stops, pieces)


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return {(s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else "")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_concurrent_streaming_clients_batch_together(server, client, reference):
    prompts = [f"client {i} says" + "!" * (i % 7) for i in range(64)]
    want = reference.generate(prompts, max_new_tokens=8, use_tqdm=False)
    before = _metrics(server.url)

    def one(prompt):
        stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        got = list(pool.map(one, prompts))
    assert got == want
    after = _metrics(server.url)
    steps = after["maxlike_step_batch_rows_count"] - before["maxlike_step_batch_rows_count"]
    solo = after['maxlike_step_batch_rows_bucket{"le": "1.0"}'] - before['maxlike_step_batch_rows_bucket{"le": "1.0"}']
    assert steps > 0 and solo < steps, "the engine's steps should batch requests from different connections"
    assert after['maxlike_step_batch_rows_bucket{"le": "4.0"}'] < after["maxlike_step_batch_rows_count"]


def test_a_client_that_disconnects_is_aborted_and_its_pages_freed(server, engine):
    body = {"model": NAME, "prompt": "a long one", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            got = []
            for line in r.iter_lines():
                if line.startswith("data:"):
                    got.append(line)
                if len(got) == 2:
                    break
        assert len(got) == 2
    deadline, m = time.time() + 1.0, {}
    while time.time() < deadline:
        m = _metrics(server.url)
        if m["maxlike_num_requests_running"] == 0 and m["maxlike_kv_cache_pages_in_use"] == 0:
            break
        time.sleep(0.05)
    assert m["maxlike_num_requests_running"] == 0 and m["maxlike_kv_cache_pages_in_use"] == 0, m
    assert m['maxlike_request_finished_total{"reason": "abort"}'] >= 1
    r = httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_a_failed_engine_step_fails_its_requests_and_the_server_goes_on(server, engine, monkeypatch):
    scheduler = engine.llm.scheduler
    real, failed = scheduler.step, []

    def step_that_fails_once():
        if not failed:
            failed.append(True)
            raise RuntimeError("injected device failure")
        return real()

    monkeypatch.setattr(scheduler, "step", step_that_fails_once)
    body = {"model": NAME, "prompt": "fail me", "max_tokens": 4, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 500 and "injected device failure" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert _metrics(server.url)["maxlike_kv_cache_pages_in_use"] == 0


BAD = [
    ("completions", {"frequency_penalty": 3}, 400, "frequency_penalty must be in [-2, 2] (0 is off), got 3.0", None),
    ("completions", {"logit_bias": {"5": 250}}, 400, "logit_bias values must be numbers in [-100, 100]", None),
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "if": {"required": ["a"]}}}}}, 400, 'response_format is not supported: Unimplemented keys: ["if"]',
     None),
    ("completions", {"response_format": {"type": "xml"}}, 400, "response_format must be a dict whose 'type' is one of",
     None),
    ("completions", {"max_tokens": 0}, 400, "'max_tokens' must be at least 1, got 0", "max_tokens"),
    ("completions", {"max_tokens": -3}, 400, "'max_tokens' must be at least 1, got -3", "max_tokens"),
    ("completions", {"temperature": -0.5}, 400, "'temperature' must be >= 0", "temperature"),
    ("completions", {"top_p": 0}, 400, "'top_p' must be in (0, 1], got 0", "top_p"),
    ("completions", {"top_p": 1.5}, 400, "'top_p' must be in (0, 1], got 1.5", "top_p"),
    ("completions", {"n": 0}, 400, "'n' must be between 1 and", "n"),
    ("completions", {"logprobs": 21}, 400, "'logprobs' must be between 0 and 20, got 21", "logprobs"),
    ("completions", {"max_tokens": "ten"}, 400, "'max_tokens' input should be a valid integer", "max_tokens"),
    ("completions", {"prompt": ""}, 400, "'prompt' is empty", "prompt"),
    ("completions", {"prompt": "x" * 100, "max_tokens": 60}, 400,
     "This model's maximum context length is 128 tokens. However, you requested 160 tokens (100 in the prompt, "
     "60 in the completion)", "prompt"),
    ("completions", {"model": "nope"}, 404, "The model `nope` does not exist", "model"),
    ("completions", {"model": None}, 400, "'model' is required", "model"),
    ("completions", {"model": 5}, 400, "'model' input should be a valid string", "model"),
    ("completions", {"echo": True, "logprobs": 2}, 400, "load the model with enable_echo=True", None),
    ("chat/completions", {"messages": []}, 400, "'messages' is empty", "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages[0].role 'robot' is not a role", "messages.0.role"),
    ("chat/completions", {"top_logprobs": 21, "logprobs": True}, 400, "'top_logprobs' must be between 0 and 20",
     "top_logprobs"),
    ("chat/completions", {"max_completion_tokens": 0}, 400, "'max_completion_tokens' must be at least 1",
     "max_completion_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "only text parts", "messages.0.content.0"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    base = {"completions": {"model": NAME, "prompt": "hi", "max_tokens": 4},
            "chat/completions": {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}
    with httpx.Client(base_url=server.url + "/v1", timeout=30) as http:
        for path, change, status, message, param in BAD:
            body = {k: v for k, v in {**base[path], **change}.items() if v is not None}
            r = http.post("/" + path, json=body)
            assert r.status_code == status, (change, r.text)
            err = r.json()["error"]
            assert message in err["message"], (change, err)
            assert err["param"] == param and set(err) == {"message", "type", "param", "code"}
        r = http.post("/completions", content=b'{"model": "tiny", "prompt": ',
                      headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = http.get("/nothing-here")
        assert r.status_code == 404 and "error" in r.json()
        r = http.post("/completions", json=base["completions"])
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_api_key_and_queue_limit(engine):
    import openai

    from maxlike.serve.app import ServerSettings

    keyed = Running(engine, ServerSettings(served_names=(NAME,), api_key="sesame"), engine.test_metrics)
    try:
        assert httpx.get(keyed.url + "/health").status_code == 200  # no key needed
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.get(keyed.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in good.models.list().data] == [NAME]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        keyed.stop()

    limited = Running(engine, ServerSettings(served_names=(NAME,), max_queued_requests=2), engine.test_metrics)
    try:
        body = {"model": NAME, "prompt": "wait", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda _: httpx.post(limited.url + "/v1/completions", json=body, timeout=120),
                                    range(24)))
        refused = [r for r in answers if r.status_code == 503]
        served = [r for r in answers if r.status_code == 200]
        assert refused and served and len(refused) + len(served) == 24
        assert refused[0].headers["retry-after"] and refused[0].json()["error"]["code"] == "queue_full"
        assert all(r.json()["usage"]["completion_tokens"] == 40 for r in served)  # accepted ones all finish
    finally:
        limited.stop()


def test_metrics_are_prometheus_text(server, client):
    before = _metrics(server.url)
    r = client.completions.create(model=NAME, prompt="count me", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = _metrics(server.url)
    assert r.usage.completion_tokens == 5
    assert after["maxlike_generation_tokens_total"] - before["maxlike_generation_tokens_total"] == 5
    assert after["maxlike_prompt_tokens_total"] - before["maxlike_prompt_tokens_total"] == r.usage.prompt_tokens
    assert after['maxlike_request_finished_total{"reason": "length"}'] - \
        before.get('maxlike_request_finished_total{"reason": "length"}', 0) == 1
    assert after["maxlike_time_to_first_token_seconds_count"] - before["maxlike_time_to_first_token_seconds_count"] == 1
    assert after["maxlike_inter_token_latency_seconds_count"] - before["maxlike_inter_token_latency_seconds_count"] == 4
    for name in ("maxlike_num_requests_waiting", "maxlike_kv_cache_pages_total", "maxlike_prefix_cache_hit_rate",
                 "maxlike_compiles", "maxlike_ready"):
        assert name in after


def test_bench_serve_against_the_server(server):
    from maxlike.serve.benchmark import benchmark, random_workload

    work = random_workload(6, input_len=(4, 20), output_len=(3, 6), vocab_size=320, seed=1)
    out = benchmark(server.url, NAME, work, concurrency=3, timeout_s=120)
    assert out["completed"] == 6 and out["errors"] == 0
    assert out["total_output_tokens"] == sum(w.max_tokens for w in work)  # ignore_eos: exactly max_tokens each
    assert out["total_input_tokens"] == sum(len(w.prompt) for w in work)
    assert out["ttft_ms"]["p50"] > 0 and out["output_throughput"] > 0


def test_serve_process_health_warmup_and_sigterm_drain(tiny_llama):
    """`maxlike serve` as a process: /health 503 while it warms up, 200 after, and no compile after that;
    SIGTERM lets the running stream finish, then the process exits 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve_process(tiny_llama[0], port, "--max-batch-size", "1", "--max-length", "16", "--shutdown-grace", "20")
    try:
        seen = _wait_ready(url, [proc])
        assert seen and seen[0] == 503 and seen[-1] == 200, seen
        compiled = _metrics(url)["maxlike_compiles"]
        body = {"model": NAME, "prompt": "drain me", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "stream": True}
        chunks = []
        with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                chunks.append(line)
                if len(chunks) == 1:
                    assert _metrics(url)["maxlike_compiles"] == compiled, "warm-up left a bucket to compile"
                    proc.send_signal(signal.SIGTERM)
        assert chunks[-1] == "data: [DONE]"
        finals = [json.loads(c[5:])["choices"] for c in chunks[:-1]]
        assert finals[-1][0]["finish_reason"] == "length" and len(finals) == 8
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read()
    assert "Traceback" not in out, out


def _serve_process(path: str, port: int, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "maxlike.entrypoints.cli", "serve", "--model-path", path,
                             "--port", str(port), "--quiet", "--served-model-name", NAME, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or os.environ.copy())


def _wait_ready(url: str, procs, timeout: float = 180) -> list[int]:
    """The /health answers seen until the first 200."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline and 200 not in seen:
        assert all(p.poll() is None for p in procs), [p.stdout.read()[-3000:] for p in procs if p.poll() is not None]
        try:
            seen.append(httpx.get(url + "/health", timeout=2).status_code)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return seen


@pytest.mark.slow  # about 20 s: `make test-slow`
def test_multi_host_serving_two_processes(eight_head_models):
    """Process 0 serves HTTP and broadcasts each step's requests; process 1 runs the same steps (one
    mesh of 2 x 2 fake CPU devices, tensor parallel 4). Answers equal a one-device LLM's; SIGTERM on
    process 0 stops both."""
    from maxlike.config import PipelineConfig
    from maxlike.entrypoints import LLM

    path, coordinator, port = eight_head_models["llama"], free_port(), free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [_serve_process(path, port, "--no-warmup", "--max-batch-size", "2", "--max-length", "64",
                            "--tensor-parallel-degree", "4", "--coordinator-address", f"127.0.0.1:{coordinator}",
                            "--num-processes", "2", "--process-id", str(i), env=env) for i in range(2)]
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait_ready(url, procs)[-1] == 200
        prompts = ["first prompt", "second one", "and a third"]
        ref = LLM(PipelineConfig(model_path=path, max_length=64, max_batch_size=2), progress=False)
        want = ref.generate(prompts, max_new_tokens=6, use_tqdm=False)
        body = {"model": NAME, "max_tokens": 6, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: httpx.post(url + "/v1/completions", json={**body, "prompt": p},
                                                      timeout=120).json()["choices"][0]["text"], prompts))
        assert got == want
        procs[0].send_signal(signal.SIGTERM)
        assert [p.wait(60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
