"""Decode tokens/s per architecture, maxlike against HF transformers eager in the same run, and
what each costs to compile.

    .venv/bin/python benchmarks/bench_architectures.py [--kinds llama qwen3 ...] [--layers 8] [--json out.json]

For each architecture a random model (the test suite's builder, scaled up: --layers layers, hidden
512, 8 heads / 4 KV heads of 64, MLP 1536, vocabulary 32000; windows of 128 where the architecture
has them, so the mask is computed but cuts nothing here) saved as an HF checkpoint. maxlike runs it
in fp32 with the bucket set compiled at load (warmup=True, max_batch_size 8, max_length 256): the
compile time and executable count are that warm-up's. Then `maxlike.entrypoints.bench.measure`
(best of 3) for batch 1 and 8, 16-token prompts, 64 new tokens, greedy, EOS ignored, on both.
--max-length, --prompt-tokens and --window change those (long contexts in a window: --max-length 4096
--prompt-tokens 3000).
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

KINDS = ("llama", "mistral_window", "qwen3", "gemma2", "gemma3", "phi3")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--layers", type=int, nargs="+", default=[8])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--window", type=int, default=128, help="the sliding window of the architectures that have one")
    ap.add_argument("--json")
    args = ap.parse_args()
    shape = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                 vocab_size=32000, max_position_embeddings=max(512, args.max_length), sliding_window=args.window,
                 initializer_range=0.02)
    folder = tempfile.mkdtemp(prefix="maxlike-bench-arch-")
    results = []
    try:
        for layers in args.layers:
            for kind in args.kinds:
                extra = {}
                if kind == "gemma3":  # Gemma 3's 5 sliding layers to 1 global
                    extra["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                            for i in range(layers)]
                if kind == "phi3":  # LongRoPE factors for head_dim 64
                    extra["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0,
                                                "short_factor": [1.0] * 32,
                                                "long_factor": [1.0 + i / 8 for i in range(32)]}
                hf = conftest.tiny_arch_model(kind, num_hidden_layers=layers, **shape, **extra)
                path = conftest.save_tiny(hf, os.path.join(folder, f"{kind}-{layers}"))
                config = PipelineConfig(model_path=path, max_length=args.max_length, dtype="float32", warmup=True,
                                        max_batch_size=max(args.batch_sizes))
                llm, ours = maxlike_generate(config)
                stats = llm.pipeline.model.session.stats
                row = {"kind": kind, "layers": layers, "compile_s": stats.compile_seconds,
                       "executables": stats.compiled + stats.loaded}
                theirs = None if args.skip_hf else hf_generate(hf)
                for b in args.batch_sizes:
                    m = measure(ours, b, args.prompt_tokens, 64, shape["vocab_size"])
                    row[f"maxlike_b{b}"] = m["decode_tok_s"]
                    if theirs:
                        hf_m = measure(theirs, b, args.prompt_tokens, 64, shape["vocab_size"])
                        row[f"hf_b{b}"] = hf_m["decode_tok_s"]
                results.append(row)
                if args.json:  # after every row: a later failure keeps the rows measured so far
                    with open(args.json, "w") as f:
                        json.dump(results, f, indent=1)
                line = (f"{kind:15s} {layers:2d} layers: compile {row['compile_s']:5.1f} s, "
                        f"{row['executables']} executables")
                for b in args.batch_sizes:
                    line += f" | b{b} maxlike {row[f'maxlike_b{b}']:6.1f} tok/s"
                    if theirs:
                        line += f", HF {row[f'hf_b{b}']:6.1f} ({row[f'maxlike_b{b}'] / row[f'hf_b{b}']:.2f}x)"
                print(line, flush=True)
                del llm, ours, hf
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(conftest.TEST_CACHE, ignore_errors=True)


if __name__ == "__main__":
    main()
