"""Decode and prefill tokens/s on SmolLM2-135M (CPU): maxlike vs HF transformers, same run.

    .venv/bin/python benchmarks/bench_decode.py [--batch-sizes 1 8] [--new-tokens 64] [--prompt-tokens 64]
        [--layer-forms unrolled scan] [--encodings float int8 q4_k ...] [--fusion unfused fused] [--roofline]
        [--max-length 512]

Both run the same GGUF file in fp32 on the same prompts (random token ids),
greedy, with EOS ignored so every run produces exactly N tokens.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from maxlike.entrypoints.bench import hf_generate, maxlike_generate, measure  # noqa: E402
from maxlike.entrypoints.llm import default_model_path  # noqa: E402
from maxlike.config import QUANTIZED_ENCODINGS  # noqa: E402
from maxlike.pipelines import PipelineConfig  # noqa: E402


def hf_gguf_generate(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return hf_generate(AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                            dtype=torch.float32).eval())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-num-steps", type=int, default=1)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--max-length", type=int, default=512, help="maxlike's max_length (the KV table's width)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--roofline", action="store_true",
                    help="also each batch's share of this machine's measured memory bandwidth (decode) and matmul "
                    "peak (prefill), for maxlike and HF alike (HF reads the same fp32 weights)")
    ap.add_argument("--layer-forms", nargs="+", choices=["unrolled", "scan"], default=["unrolled"],
                    help="maxlike's layers unrolled and/or as one loop over stacked weights (scan_layers)")
    ap.add_argument("--encodings", nargs="+", choices=["float", *QUANTIZED_ENCODINGS], default=["float"],
                    help="maxlike's weights as the model's dtype and/or kept quantized (quantization_encoding)")
    ap.add_argument("--fusion", nargs="+", choices=["unfused", "fused"], default=["unfused"],
                    help="maxlike's q/k/v and gate/up as five matmuls and/or two (fuse_projections)")
    args = ap.parse_args()
    path = default_model_path()
    forms, models = {}, {}
    for form, encoding, fusion in itertools.product(args.layer_forms, args.encodings, args.fusion):
        config = PipelineConfig(model_path=path, max_length=args.max_length, max_batch_size=max(args.batch_sizes),
                                max_num_steps=args.max_num_steps, scan_layers=form == "scan",
                                quantization_encoding=None if encoding == "float" else encoding,
                                fuse_projections=fusion == "fused")
        name = "_".join([form] + [part for part in (encoding, fusion) if part not in ("float", "unfused")])
        llm, forms[name] = maxlike_generate(config)
        models[f"maxlike_{name}"] = llm.pipeline.model
    vocab = llm.pipeline.model.config.vocab_size
    theirs = None if args.skip_hf else hf_gguf_generate(path)
    if args.roofline:  # at start: the device's peaks before either runs
        from maxlike.entrypoints import roofline as rl

        first = next(iter(models.values()))  # HF reads what the first (float) one does
        peaks = rl.measure_peaks(first.devices[0], first.dtype)
    results = []
    for b in args.batch_sizes:
        row = {f"maxlike_{form}": measure(ours, b, args.prompt_tokens, args.new_tokens, vocab)
               for form, ours in forms.items()}
        if theirs:
            row["hf"] = measure(theirs, b, args.prompt_tokens, args.new_tokens, vocab)
        results.append(row)
        for form in forms:
            m = row[f"maxlike_{form}"]
            line = (f"batch {b}: maxlike ({form}) decode {m['decode_tok_s']:.1f} tok/s, "
                    f"prefill {m['prefill_tok_s']:.0f} tok/s")
            if theirs:
                h = row["hf"]
                line += (f" | HF decode {h['decode_tok_s']:.1f} tok/s, prefill {h['prefill_tok_s']:.0f} tok/s"
                         f" | decode ratio {m['decode_tok_s'] / h['decode_tok_s']:.2f}x,"
                         f" prefill ratio {m['prefill_tok_s'] / h['prefill_tok_s']:.2f}x")
            print(line, flush=True)
    if args.roofline:
        for row in results:
            for name in list(row):
                row[name] = rl.report(models.get(name, first), peaks, [row[name]], args.prompt_tokens,
                                      args.new_tokens)[0]
            rl.print_report([row[name] for name in row])
            print("  (rows: " + ", ".join(row) + ")", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
