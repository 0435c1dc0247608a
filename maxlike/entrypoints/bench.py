"""Decode and prefill throughput of one model (used by `maxlike benchmark` and benchmarks/).

decode tokens/s = batch * (N - 1) / (t(N new tokens) - t(1 new token));
prefill tokens/s = batch * prompt_tokens / t(1 new token). Every shape is
run once first so compiles are not timed.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from maxlike.config import PipelineConfig


def prompts_for(batch: int, prompt_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, min(vocab, 30000), size=prompt_tokens).tolist() for _ in range(batch)]


def measure(generate: Callable[[list[list[int]], int], None], batch: int, prompt_tokens: int, new_tokens: int,
            vocab: int, repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` timings of `generate(prompts, n)` for n = 1 and n = new_tokens."""
    prompts = prompts_for(batch, prompt_tokens, vocab)
    generate(prompts, 1)
    generate(prompts, new_tokens)  # warm-up: compiles and first-run costs
    t1 = min(_timed(generate, prompts, 1) for _ in range(repeats))
    tn = min(_timed(generate, prompts, new_tokens) for _ in range(repeats))
    return {
        "batch": batch,
        "prefill_tok_s": batch * prompt_tokens / t1,
        "decode_tok_s": batch * (new_tokens - 1) / max(tn - t1, 1e-9),
    }


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def hf_generate(model, static: bool = False):
    """`generate(prompts, n)` for an HF transformers model on its own device: greedy, exactly n new
    tokens, finished when it returns (CUDA synchronized). `static`: HF's static KV cache, with which
    transformers compiles the decode step (torch.compile, CUDA graphs) on a GPU by itself."""
    import torch

    device = next(model.parameters()).device
    extra = {"cache_implementation": "static"} if static else {}

    def generate(prompts, n):
        ids = torch.tensor(prompts, device=device)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return generate


def maxlike_generate(config: PipelineConfig):
    from maxlike.entrypoints import LLM
    from maxlike.interfaces import SamplingParams

    llm = LLM(config, progress=False)

    def generate(prompts, n):
        llm.generate(prompts, sampling_params=SamplingParams(top_k=1, max_new_tokens=n, ignore_eos=True),
                     use_tqdm=False)

    return llm, generate


def run_decode_benchmark(config: PipelineConfig, *, batch_sizes=(1, 8), new_tokens=64, prompt_tokens=64,
                         roofline: bool = False) -> list[dict]:
    """Decode and prefill tokens/s per batch size; with `roofline`, each row also holds the bytes a
    decode step reads and its share of this device's measured bandwidth, and prefill's share of
    its matmul peak (maxlike.entrypoints.roofline)."""
    llm, generate = maxlike_generate(config)
    model = llm.pipeline.model
    vocab = model.config.vocab_size
    if roofline:  # at start, before the model's own runs warm the machine up or slow it down
        from maxlike.entrypoints import roofline as rl

        peaks = rl.measure_peaks(model.devices[0], model.dtype)
    rows = []
    for b in batch_sizes:
        r = measure(generate, b, prompt_tokens, new_tokens, vocab)
        rows.append(r)
        if not roofline:
            print(f"maxlike batch {b}: decode {r['decode_tok_s']:.1f} tok/s, prefill {r['prefill_tok_s']:.1f} tok/s",
                  flush=True)
    if roofline:
        rows = rl.report(model, peaks, rows, prompt_tokens, new_tokens)
        rl.print_report(rows)
    return rows
