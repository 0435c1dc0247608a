"""The on-device sampler alone: microseconds per call at batch 8 over SmolLM2's vocabulary.

    .venv/bin/python benchmarks/bench_sampler.py [--batch 8] [--calls 100] [--compare REV]

Two sets of logits: SmolLM2's own at the last 8 positions of a chat exchange (real,
peaked distributions), and random normal ones (std 3: flat, the nucleus of top-p
0.9 spans thousands of tokens). Rows of one kind per run: top-k only (k=50), the
whole vocabulary (no top-k/top-p), top-p (0.9, with top-k 50 and without), and
the greedy argmax as the floor. Each figure is the best of 5 medians of `--calls`
calls of the compiled sampler.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from maxlike.interfaces import SamplingParams
from maxlike.pipelines import sampling

KINDS = {
    "top_k=50": SamplingParams(top_k=50),
    "whole vocabulary": SamplingParams(),
    "top_p=0.9": SamplingParams(top_p=0.9),
    "top_k=50, top_p=0.9": SamplingParams(top_k=50, top_p=0.9),
}


def time_call(fn, args, calls: int) -> float:
    jax.block_until_ready(fn(*args))
    medians = []
    for _ in range(5):
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t)
        medians.append(statistics.median(times))
    return min(medians) * 1e6


def smollm2_logits(rows: int) -> np.ndarray:
    """SmolLM2's next-token logits at the last `rows` positions of a chat exchange."""
    from maxlike.entrypoints import LLM
    from maxlike.entrypoints.llm import default_model_path
    from maxlike.pipelines import PipelineConfig, TextContext

    llm = LLM(PipelineConfig(model_path=default_model_path(), max_length=256, max_batch_size=1, enable_echo=True),
              progress=False)
    model = llm.pipeline.model
    ids = llm.tokenizer.apply_chat_template([
        {"role": "user", "content": "What should I pack for a weekend of hiking in the mountains?"},
        {"role": "assistant", "content": "Bring layers, rain gear, sturdy boots, water, snacks and a map."}])
    ctx = TextContext("bench", ids, len(ids) + 1)
    model.kv_manager.claim("bench", total_tokens=len(ids) + 1)
    out = model.execute(model.prepare_initial_token_inputs([[ctx]]))
    return np.asarray(out.logits)[0, len(ids) - rows: len(ids)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--compare", metavar="REV", help="a git revision whose maxlike/pipelines/sampling.py is timed "
                    "in the same run on the same inputs")
    args = ap.parse_args()
    samplers = {"": sampling.sample}
    if args.compare:
        import importlib.util
        import os
        import subprocess
        import tempfile

        source = subprocess.run(["git", "show", f"{args.compare}:maxlike/pipelines/sampling.py"], check=True,
                                capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location("compared_sampling", f.name)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        os.unlink(f.name)
        samplers[" [compared]"] = other.sample
    b = args.batch
    sets = {"SmolLM2 logits": smollm2_logits(b)}
    sets["random normal logits"] = np.random.default_rng(0).normal(size=sets["SmolLM2 logits"].shape) * 3
    positions = jax.device_put(np.arange(b, dtype=np.int32))
    report = {}
    for set_name, host in sets.items():
        logits = jax.device_put(np.asarray(host, np.float32))
        results = {"greedy (argmax)": time_call(jax.jit(sampling.greedy), (logits,), args.calls)}
        for name, params in KINDS.items():
            inputs = jax.device_put(sampling.SamplingInputs.build([params] * b, list(range(b)), b,
                                                                 vocab=logits.shape[1], stop_slots=8))
            for suffix, fn in samplers.items():
                results[name + suffix] = time_call(jax.jit(fn), (logits, inputs, positions), args.calls)
        print(f"{jax.devices()[0].device_kind}, batch {b}, vocab {logits.shape[1]}, {set_name}: "
              "microseconds per sampler call")
        for name, us in results.items():
            print(f"  {name:36s} {us:9.1f}")
        report[set_name] = results
    print(json.dumps({"batch": b, "device": jax.devices()[0].device_kind, "us": report}))


if __name__ == "__main__":
    main()
