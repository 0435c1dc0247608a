"""Decode tokens/s by tensor-parallel degree on 8 fake CPU devices (one process).

    .venv/bin/python benchmarks/bench_sharding.py [--tensor 1 2 4 8] [--batch 8]

The 8 "devices" share this machine's cores, so the figures show what sharding
costs (collectives, smaller matmuls, more dispatch), not what it buys: on real
devices each shard gets its own compute and memory bandwidth. The model is a
random Llama with 8 query and 2 KV heads (SmolLM2's 9 heads split only 3 ways).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_gpu_decode import SHAPES, build_model  # noqa: E402
from maxlike.entrypoints.bench import maxlike_generate, measure  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402

SHAPES["llama-8h"] = dict(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                          max_position_embeddings=2048)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensor", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as path:
        build_model("llama-8h", path, "cpu")
        base = None
        for tp in args.tensor:
            config = PipelineConfig(model_path=path, max_length=256, max_batch_size=args.batch, dtype="float32",
                                    devices=str(tp), tensor_parallel_degree=tp)
            llm, generate = maxlike_generate(config)
            m = measure(generate, args.batch, 32, args.new_tokens, 49152)
            base = base or m["decode_tok_s"]
            print(f"tensor {tp}: decode {m['decode_tok_s']:6.1f} tok/s ({m['decode_tok_s'] / base:.2f}x tensor 1), "
                  f"prefill {m['prefill_tok_s']:6.0f} tok/s (batch {args.batch}, 8 fake CPU devices)", flush=True)
            del llm


if __name__ == "__main__":
    main()
