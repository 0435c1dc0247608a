"""Decode tokens/s of a mixture-of-experts model: maxlike's expert kernels (the backend's default,
grouped = ragged_dot, dense, gather, loop) against HF transformers eager, in the same run.

    .venv/bin/python benchmarks/bench_moe.py [--kinds mixtral qwen3_moe] [--experts 16] [--layers 8]
        [--batch-sizes 1 8 32] [--kernels default grouped dense gather loop] [--skip-hf] [--json out.json]

A random model (the test suite's builder, scaled up: hidden 512, 8 heads / 4 KV heads of 64, each
expert's MLP 1024 wide, --experts experts of which 2 per token, vocabulary 32000) saved as an HF
checkpoint. maxlike runs it in fp32 (max_length 256) once per kernel ("default": moe_kernel
unset, the backend's choice per step); then `maxlike.entrypoints.bench.measure` (best of 3, after
a warm-up run that compiles) for each batch size, 16-token prompts, 64 new tokens, greedy, EOS
ignored, on each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import conftest  # noqa: E402  (the tiny-model builders; it points MAXLIKE_CACHE_DIR at a fresh folder)
from maxlike.entrypoints.bench import hf_generate, maxlike_generate, measure  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", choices=conftest.MOE_KINDS, default=["mixtral"])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--kernels", nargs="+", choices=("default", "grouped", "dense", "gather", "loop"),
                    default=["default", "grouped", "dense"])
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    vocab = 32000
    shape = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=vocab,
                 max_position_embeddings=512, num_hidden_layers=args.layers)
    folder = tempfile.mkdtemp(prefix="maxlike-bench-moe-")
    results = []
    try:
        for kind in args.kinds:
            experts = ({"num_local_experts": args.experts, "intermediate_size": 1024} if kind == "mixtral" else
                       {"num_experts": args.experts, "moe_intermediate_size": 1024, "mlp_only_layers": []})
            hf = conftest.tiny_moe_model(kind, **shape, **experts)
            path = conftest.save_tiny(hf, os.path.join(folder, kind))
            row = {"kind": kind, "experts": args.experts, "top_k": 2, "layers": args.layers}
            runs = {}
            for kernel in args.kernels:
                config = PipelineConfig(model_path=path, max_length=256, max_batch_size=max(args.batch_sizes),
                                        dtype="float32", moe_kernel=None if kernel == "default" else kernel)
                _, runs[kernel] = maxlike_generate(config)
            if not args.skip_hf:
                runs["hf"] = hf_generate(hf)
            for b in args.batch_sizes:
                for name, run in runs.items():
                    row[f"{name}_b{b}"] = measure(run, b, 16, 64, vocab)["decode_tok_s"]
                print(f"{kind} b{b}: " + ", ".join(f"{name} {row[f'{name}_b{b}']:.1f}" for name in runs)
                      + " tok/s", flush=True)
            results.append(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(conftest.TEST_CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
