"""Offline throughput on SmolLM2-135M (CPU): 64 prompts, maxlike's scheduler vs HF batched generate.

    .venv/bin/python benchmarks/bench_throughput.py [--requests 64] [--max-batch-size 32] [--hf-batch 64]

Prompts are random token ids of random length (16-128); every request makes
exactly --new-tokens tokens (EOS ignored), so both sides do the same work.
Also reports the executables compiled, the compile time, and decode tokens/s
with 1 vs several decode steps per host call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from maxlike.entrypoints import LLM  # noqa: E402
from maxlike.entrypoints.bench import maxlike_generate, measure  # noqa: E402
from maxlike.entrypoints.llm import default_model_path  # noqa: E402
from maxlike.interfaces import SamplingParams  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402


def workload(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 30000, size=int(rng.integers(16, 129))).tolist() for _ in range(n)]


def run_maxlike(path, prompts, new_tokens, max_batch_size, steps, warmup) -> dict:
    config = PipelineConfig(model_path=path, max_length=256, max_batch_size=max_batch_size, max_num_steps=steps,
                            prefill_chunk_size=1024, warmup=warmup)
    t0 = time.perf_counter()
    llm = LLM(config, progress=False)
    load = time.perf_counter() - t0
    params = SamplingParams(top_k=1, max_new_tokens=new_tokens, ignore_eos=True)
    llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)  # compiles and first-run costs
    t = time.perf_counter()
    outs = llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
    dt = time.perf_counter() - t
    stats = llm.pipeline.model.session.stats
    return {"tok_s": sum(len(o.token_ids) for o in outs) / dt, "seconds": dt, "load": load,
            "executables": stats.compiled, "compile_s": stats.compile_seconds,
            "buckets": len(llm.pipeline.model.step_buckets()), "sched": llm.scheduler.stats}


def run_hf(path, prompts, new_tokens, batch) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    return hf_batched_generate(model, prompts, new_tokens, batch)


def hf_batched_generate(model, prompts, new_tokens, batch) -> dict:
    """HF `generate` over `prompts` in batches (left padding), every request making exactly `new_tokens`."""
    import torch

    device = next(model.parameters()).device

    def go(chunk):
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
        return out.shape[0] * (out.shape[1] - width)

    go(prompts[:2])
    t = time.perf_counter()
    made = sum(go(prompts[i : i + batch]) for i in range(0, len(prompts), batch))
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"tok_s": made / dt, "seconds": dt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--warmup", action="store_true", help="compile the whole bucket set first (reports its size)")
    args = ap.parse_args()
    path = default_model_path()
    prompts = workload(args.requests)
    first = None
    for steps in args.steps:
        r = run_maxlike(path, prompts, args.new_tokens, args.max_batch_size, steps, warmup=args.warmup and first is None)
        print(f"maxlike max_num_steps={steps}: {r['tok_s']:.1f} output tok/s ({r['seconds']:.1f}s, second pass); "
              f"{r['executables']} executables compiled in {r['compile_s']:.1f}s ({r['buckets']} step buckets "
              f"in the set); {r['sched']}", flush=True)
        first = first or r
    if not args.skip_hf:
        h = run_hf(path, prompts, args.new_tokens, args.hf_batch)
        print(f"HF transformers batched generate (batch {args.hf_batch}): {h['tok_s']:.1f} output tok/s "
              f"({h['seconds']:.1f}s); maxlike/HF = {first['tok_s'] / h['tok_s']:.2f}x", flush=True)
    # decode tokens/s at batch 1 and 8, one vs several decode steps per host call
    for steps in args.steps:
        llm, gen = maxlike_generate(PipelineConfig(model_path=path, max_length=256, max_batch_size=8,
                                                   max_num_steps=steps))
        for b in (1, 8):
            m = measure(gen, b, 64, 64, 49152)
            print(f"decode batch {b}, max_num_steps={steps}: {m['decode_tok_s']:.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
