"""Decode tokens/s on an accelerator: a Llama-3.2-1B-shaped model with random bf16 weights.

    python benchmarks/bench_gpu_decode.py [--shape llama-1b] [--batch-sizes 1 8 64]
                                          [--variants 1:sync 10:sync 10:async] [--json out.json]
                                          [--setups bf16 int8 q4_k fused pallas int8+fused]

`--setups`: maxlike configurations measured one after another (the first with every variant and
the offline run, the others with the last variant only): an encoding name (bf16 or a
quantization_encoding), `fused` / `unfused` (fuse_projections), `pallas` (decode_attention), `qpallas`
(quantized_matmul="pallas", which also holds the LM head in q8_0), `floathead` (the LM head float even
so, to tell the head's share), joined by +.

The shape and cache (1024 tokens) are those of the plain-JAX anchors in the
README's GPU section, so the figures compare with them. HF transformers' generate (dynamic cache) runs
the same weights on the same device in the same run as the peer, for single
batches and for an offline workload of random-length prompts. `--shape tiny`
runs the same script on CPU in seconds (a smoke test).

Each row also gives its share of the memory roofline (maxlike.entrypoints.roofline: the bytes a
decode step reads over the copy bandwidth measured at start); HF's rows are counted with the bf16
setup's bytes (the same weights and KV). `--hf-static-batch-sizes`: HF generate with its static
cache as well, which transformers compiles (torch.compile with CUDA graphs) on a GPU by itself.
The JSON file is rewritten after every row, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from maxlike.entrypoints.bench import hf_generate, maxlike_generate, measure  # noqa: E402
from maxlike.pipelines import PipelineConfig, layout  # noqa: E402

SHAPES = {
    # Llama-3.2-1B: 16 layers, 2048 hidden, 32 q / 8 kv heads of 64, 8192 MLP, 128256 vocab, tied head.
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_theta=500000.0, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Llama-3.1-8B: 32 layers, 4096 hidden, 32 q / 8 kv heads of 128, 14336 MLP, untied head.
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                     rope_theta=500000.0, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=2048),
}


def build_model(shape: str, path: str, device: str):
    """Random weights in bf16 saved as an HF checkpoint (with a byte tokenizer); returns the torch model."""
    import torch
    import transformers as tf

    from tests.conftest import byte_tokenizer

    cfg = tf.LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model


def offline_workload(args, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(3, min(vocab, 30000), size=int(rng.integers(16, 257))).tolist()
            for _ in range(args.offline_requests)]


def offline_maxlike(llm, args) -> float:
    """Output tokens/s for the whole workload through the scheduler (second pass; the first compiles)."""
    from maxlike.interfaces import SamplingParams

    prompts = offline_workload(args, llm.pipeline.model.config.vocab_size)
    params = SamplingParams(top_k=1, max_new_tokens=args.new_tokens, ignore_eos=True)
    llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)


def offline_hf(model, args, batch: int) -> float:
    """HF generate over the same workload in batches (left padding), same token counts."""
    from bench_throughput import hf_batched_generate

    return hf_batched_generate(model, offline_workload(args, model.config.vocab_size), args.new_tokens, batch)["tok_s"]


def setup_config(setup: str) -> dict:
    """'int8+fused' -> PipelineConfig overrides (bf16 / float: the model's dtype; scan / unrolled: the
    layer form)."""
    out: dict = {}
    for part in setup.split("+"):
        if part in ("fused", "unfused"):
            out["fuse_projections"] = part == "fused"
        elif part in ("scan", "unrolled"):
            out["scan_layers"] = part == "scan"
        elif part == "pallas":
            out["decode_attention"] = "pallas"
        elif part == "qpallas":
            out["quantized_matmul"] = "pallas"
        elif part == "floathead":
            out["float_head"] = True  # (not a PipelineConfig field: see main)
        elif part not in ("bf16", "float"):
            out["quantization_encoding"] = part
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--model-path", help="keep the random checkpoint here, and reuse it if it is there already")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--variants", nargs="+", default=["1:sync", "10:sync", "10:async"],
                    help="decode steps per host call : sync|async scheduling")
    ap.add_argument("--offline-requests", type=int, default=256, help="0 skips the offline throughput run")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--page-size", type=int, default=128)
    ap.add_argument("--hf-batch-sizes", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--hf-static-batch-sizes", type=int, nargs="*", default=[],
                    help="HF generate with its static cache (compiled) at these batch sizes")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--setups", nargs="+", default=["bf16"], help="maxlike configurations (see the docstring)")
    args = ap.parse_args()
    variants = [(int(v.split(":")[0]), v.split(":")[1] == "async") for v in args.variants]

    import jax
    import jax.numpy as jnp
    import torch

    from maxlike.entrypoints import roofline as rl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on {device}", flush=True)
    peaks = rl.measure_peaks(jax.devices()[0], jnp.bfloat16)
    print(f"copy bandwidth {peaks.bandwidth_gb_s:.1f} GB/s, bf16 matmul {peaks.matmul_tflop_s:.1f} TFLOP/s", flush=True)
    results: dict = {"shape": args.shape, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                     "peaks": vars(peaks), "maxlike": [], "hf": []}
    step_bytes: dict[int, int] = {}  # batch -> the bf16 setup's bytes a decode step reads (HF's rows)

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    with tempfile.TemporaryDirectory() as path:
        path = args.model_path or path
        t = time.perf_counter()
        if os.path.exists(os.path.join(path, "config.json")):
            import transformers as tf

            torch_model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
            print(f"loaded {path} in {time.perf_counter() - t:.1f}s", flush=True)
        else:
            torch_model = build_model(args.shape, path, device)
            print(f"built and saved random {args.shape} in {time.perf_counter() - t:.1f}s", flush=True)
        vocab = torch_model.config.vocab_size

        def run_hf(b: int, static: bool) -> None:
            t = time.perf_counter()
            h = measure(hf_generate(torch_model, static), b, args.prompt_tokens, args.new_tokens, vocab)
            h.update(cache="static" if static else "dynamic", wall_s=time.perf_counter() - t)
            results["hf"].append(h)
            save()
            print(f"HF generate, {h['cache']} cache, batch {b:3d}: decode {h['decode_tok_s']:8.1f} tok/s, "
                  f"prefill {h['prefill_tok_s']:8.0f} tok/s ({h['wall_s']:.0f}s incl. compiles)", flush=True)

        for b in args.hf_batch_sizes:  # first: a run stopped by its time limit keeps the peer's figures
            run_hf(b, False)
        for i, setup in enumerate(args.setups):
            if i:
                del llm, ours
            fields = setup_config(setup)
            float_head = fields.pop("float_head", False)
            config = PipelineConfig(model_path=path, max_length=args.max_length, max_batch_size=max(args.batch_sizes),
                                    dtype="bfloat16", kv_cache_page_size=args.page_size,
                                    max_num_steps=max(steps for steps, _ in variants), **fields)
            t = time.perf_counter()
            with mock.patch.object(layout, "quantized_head", lambda *a, **kw: None) if float_head else nullcontext():
                llm, ours = maxlike_generate(config)
            print(f"maxlike {setup} loaded in {time.perf_counter() - t:.1f}s", flush=True)
            for b in args.batch_sizes:
                for steps, overlap in variants if i == 0 else variants[-1:]:
                    llm.scheduler.max_num_steps = steps  # <= the loop's compiled length
                    llm.scheduler.async_scheduling = overlap
                    t = time.perf_counter()
                    m = measure(ours, b, args.prompt_tokens, args.new_tokens, vocab)
                    m.update(max_num_steps=steps, async_scheduling=overlap, wall_s=time.perf_counter() - t,
                             setup=setup)
                    m = rl.report(llm.pipeline.model, peaks, [m], args.prompt_tokens, args.new_tokens)[0]
                    del m["peaks"]
                    if llm.pipeline.model.encoding is None:  # float weights, as HF's
                        step_bytes.setdefault(b, m["step_bytes"])
                    results["maxlike"].append(m)
                    save()
                    print(f"maxlike {setup} batch {b:3d} steps/call {steps:2d} {'async' if overlap else 'sync '}: "
                          f"decode {m['decode_tok_s']:8.1f} tok/s ({100 * m['decode_roofline_share']:.1f}% of the "
                          f"roofline: {m['step_bytes'] / 1e6:.0f} MB a step), prefill {m['prefill_tok_s']:8.0f} tok/s "
                          f"({m['wall_s']:.0f}s incl. compiles)", flush=True)
        if args.offline_requests:  # (the last setup's model)
            llm.scheduler.max_num_steps, llm.scheduler.async_scheduling = variants[-1]
            results["offline"] = {"maxlike": offline_maxlike(llm, args), "requests": args.offline_requests}
        stats = llm.pipeline.model.session.stats
        results["compile"] = {"executables": stats.compiled, "seconds": stats.compile_seconds}
        print(f"maxlike compiled {stats.compiled} executables in {stats.compile_seconds:.1f}s", flush=True)
        del llm
        for b in args.hf_static_batch_sizes:  # last: each compiles for a while
            run_hf(b, True)
        if args.offline_requests:
            results["offline"]["hf"] = offline_hf(torch_model, args, max(args.batch_sizes))
            o = results["offline"]
            print(f"offline, {args.offline_requests} requests: maxlike {o['maxlike']:.0f} output tok/s, HF generate "
                  f"(batches of {max(args.batch_sizes)}) {o['hf']:.0f} tok/s: {o['maxlike'] / o['hf']:.2f}x", flush=True)
    for h in results["hf"]:  # HF reads the bf16 setup's weights and KV
        b = h["batch"]
        if b in step_bytes:
            achieved = step_bytes[b] * h["decode_tok_s"] / b / 1e9
            h["decode_roofline_share"] = achieved / peaks.bandwidth_gb_s
            print(f"HF generate, {h['cache']} cache, batch {b:3d}: {100 * h['decode_roofline_share']:.1f}% of the "
                  "roofline", flush=True)
    print("\nsetup             batch  steps  sched  maxlike tok/s  roofline  best HF tok/s  ratio")
    for m in results["maxlike"]:
        h = max((h for h in results["hf"] if h["batch"] == m["batch"]), key=lambda h: h["decode_tok_s"], default=None)
        hf = f"{h['decode_tok_s']:13.1f}  {m['decode_tok_s'] / h['decode_tok_s']:5.2f}x" if h else " " * 13 + "      -"
        sched = "async" if m["async_scheduling"] else "sync "
        print(f"{m['setup']:16s}  {m['batch']:5d}  {m['max_num_steps']:5d}  {sched}  {m['decode_tok_s']:13.1f}  "
              f"{100 * m['decode_roofline_share']:7.1f}%  {hf}")
    save()


if __name__ == "__main__":
    main()
