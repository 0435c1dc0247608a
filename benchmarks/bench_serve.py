"""Serving benchmark: maxlike's OpenAI server against `LLM.generate` on the same workload, one run.

    .venv/bin/python benchmarks/bench_serve.py [--requests 256] [--concurrency 1 8 32] [--json out.json]

One LLM (SmolLM2-135M by default) first runs a quarter of the workload untimed (it compiles the
buckets the workload uses; `--warmup` compiles every bucket instead, minutes at this size), then
the whole workload offline, timed (`LLM.generate_outputs`), then serves it over HTTP on
127.0.0.1 (uvicorn in this process, the engine thread owning the same model) to the bench-serve
client (`maxlike.serve.benchmark`) at each concurrency. Prompts are random token ids (16-512), each
request makes exactly 64-128 tokens (EOS ignored). Concurrency 1 runs `--solo-requests` requests
(256 one at a time would take most of an hour on a CPU).

"Long prompts arriving": the short-prompt streams at concurrency 8 again, while a second client sends
prompts of --long-prompt tokens (2 at a time); the streams' inter-token latency with and without them
shows what a prefill costs the running requests. `--in-flight both` runs that phase twice in one run,
without and with in-flight batching (each on its own LLM), to compare them:

    .venv/bin/python benchmarks/bench_serve.py --only-long --in-flight both --prefill-chunk-size 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from maxlike.entrypoints import LLM  # noqa: E402
from maxlike.entrypoints.llm import default_model_path  # noqa: E402
from maxlike.interfaces import SamplingParams  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402
from maxlike.serve.benchmark import BenchRequest, random_workload, run_benchmark  # noqa: E402

NAME = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline(llm: LLM, work: list[BenchRequest]) -> dict:
    params = [SamplingParams(top_k=1, ignore_eos=True, max_new_tokens=w.max_tokens) for w in work]
    t = time.perf_counter()
    outs = llm.generate_outputs([w.prompt for w in work], sampling_params=params, use_tqdm=False)
    seconds = time.perf_counter() - t
    tokens = sum(len(o.token_ids) for o in outs)
    return {"requests": len(work), "seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds}


def start_server(llm: LLM):
    from maxlike.serve.app import ServerSettings, build_app
    from maxlike.serve.engine import Engine
    from maxlike.serve.metrics import Metrics
    from maxlike.serve.server import run_in_thread

    metrics = Metrics()
    engine = Engine(lambda: llm, metrics=metrics).start()
    engine.ready.wait()
    port = free_port()
    server = run_in_thread(build_app(engine, ServerSettings((NAME,)), metrics), "127.0.0.1", port)
    return f"http://127.0.0.1:{port}", server, engine


def brief(s: dict) -> dict:
    keep = {k: s[k] for k in ("completed", "errors", "duration_s", "request_throughput", "output_throughput")}
    for k in ("ttft_ms", "itl_ms", "tpot_ms"):
        keep[k] = {q: None if v is None else round(v, 1) for q, v in (s[k] or {}).items()}
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--solo-requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=768)
    ap.add_argument("--warmup", action="store_true", help="compile every bucket first (slow on a CPU)")
    ap.add_argument("--long-prompt", type=int, default=700)
    ap.add_argument("--only-long", action="store_true", help="only the long-prompt runs (no offline, no concurrency)")
    ap.add_argument("--long-requests", type=int, default=8)
    ap.add_argument("--prefill-chunk-size", type=int, default=8192)
    ap.add_argument("--in-flight", choices=["off", "on", "both"], default="off",
                    help="in-flight batching (decode rows and a prompt chunk in one step); both: the long-prompt "
                         "phase once without, once with (needs --only-long)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.in_flight == "both" and not args.only_long:
        ap.error("--in-flight both compares the long-prompt phase only: add --only-long.")
    results: dict = {"config": vars(args)}
    for in_flight in (False, True) if args.in_flight == "both" else (args.in_flight == "on",):
        key = "in_flight" if in_flight else "no_in_flight"
        results[key] = run(args, in_flight)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


def run(args, in_flight: bool) -> dict:
    config = PipelineConfig(model_path=args.model_path or default_model_path(), max_length=args.max_length,
                            max_batch_size=args.max_batch_size, prefill_chunk_size=args.prefill_chunk_size,
                            warmup=args.warmup, enable_in_flight_batching=in_flight)
    print(f"in-flight batching {'on' if in_flight else 'off'}", flush=True)
    t = time.perf_counter()
    llm = LLM(config, progress=True)
    vocab = llm.pipeline.model.vocab_size
    stats = llm.pipeline.model.session.stats
    work = random_workload(args.requests, input_len=(16, 512), output_len=(64, 128), vocab_size=vocab, seed=0)
    if not args.warmup:
        offline(llm, work[: max(1, len(work) // 4)])
    warm = stats.compiled
    print(f"loaded and warmed up in {time.perf_counter() - t:.1f}s ({warm} executables compiled)", flush=True)
    results: dict = {}
    if not args.only_long:
        results["offline"] = offline(llm, work)
        print("offline LLM.generate:", results["offline"], flush=True)

    url, server, engine = start_server(llm)
    results["server"] = {}
    for c in [] if args.only_long else args.concurrency:
        subset = work[: args.solo_requests] if c == 1 else work
        s = asyncio.run(run_benchmark(url, NAME, subset, concurrency=c, timeout_s=3600))
        results["server"][c] = brief(s)
        print(f"server concurrency {c}:", results["server"][c], flush=True)
    if not args.only_long:
        top = max(args.concurrency)
        ratio = results["server"][top]["output_throughput"] / results["offline"]["output_tok_s"]
        results["server_vs_offline_at_max_concurrency"] = ratio
        print(f"server / LLM.generate output tokens/s at concurrency {top}: {ratio:.3f}", flush=True)

    short = random_workload(64, input_len=(16, 64), output_len=(64, 64), vocab_size=vocab, seed=1)
    long = random_workload(args.long_requests, input_len=(args.long_prompt, args.long_prompt), output_len=(4, 4),
                           vocab_size=vocab, seed=2)

    async def with_long():
        async def long_later():
            await asyncio.sleep(2.0)  # the streams are running by then
            return await run_benchmark(url, NAME, long, concurrency=2, timeout_s=3600)

        return await asyncio.gather(run_benchmark(url, NAME, short, concurrency=8, timeout_s=3600), long_later())

    if args.only_long and not args.warmup:  # untimed: compile what these two workloads use (some may remain:
        asyncio.run(with_long())              # batches form by timing; --warmup compiles every bucket first)
        asyncio.run(run_benchmark(url, NAME, short, concurrency=8, timeout_s=3600))
    alone = asyncio.run(run_benchmark(url, NAME, short, concurrency=8, timeout_s=3600))
    mixed, longs = asyncio.run(with_long())
    results["itl_short_streams"] = {"alone": brief(alone), "with_long_prompts": brief(mixed), "long": brief(longs)}
    print("short streams alone:", brief(alone), flush=True)
    print("short streams with long prompts arriving:", brief(mixed), flush=True)
    print("the long prompts:", brief(longs), flush=True)
    results["compiles_after_warmup"] = stats.compiled - warm
    results["scheduler"] = vars(llm.scheduler.stats)
    print("executables compiled after warm-up (offline run and serving):", stats.compiled - warm, flush=True)
    server.should_exit = True
    engine.shutdown(timeout=60)
    return results


if __name__ == "__main__":
    main()
