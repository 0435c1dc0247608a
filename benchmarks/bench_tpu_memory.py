"""Does a Llama-3.1-8B-shaped model fit one TPU v5e chip (16 GB), per weight encoding? Compiled here.

    .venv/bin/python benchmarks/bench_tpu_memory.py [--encodings bfloat16 int8 q4_k] [--out DIR]
        [--decode-attention xla pallas] [--quantized-matmul xla pallas] [--max-batch-size 1]
        [--tensor-parallel-degree 1]

For each encoding, `maxlike warm-cache --target tpu:v5e:2x2 --devices 1` (one chip of the slice, or
as many as `--tensor-parallel-degree` splits the model over, figures per chip; compile-only: no
weights are read) compiles the whole executable set of a batch-1, 2048-token
model, then reads XLA's `memory_analysis()` of every executable from the cache records: the peak
of a step is its arguments (weights, KV pool, inputs) + outputs - aliased (donated) + temporaries.
An encoding that does not fit stops with XLA's RESOURCE_EXHAUSTED, which is printed. Each
`--decode-attention` kernel and `--quantized-matmul` product is compiled in turn; `decode_temp_mib` is the
largest temporary buffer space of the decode steps and loops (one token a row), `largest_step_temp_mib`
that of any step (prefill's, mostly). Needs libtpu
(`make test` installs it in .venv/tpu-site). Results: README "Quantized weights on one TPU chip".
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def write_llama8b(folder: str) -> None:
    """A Llama-3.1-8B config (and a byte tokenizer) without weights: compile-only reads none."""
    import transformers as tf

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import byte_tokenizer

    big = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    big.architectures = ["LlamaForCausalLM"]
    big.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def peak(record: dict) -> int:
    m = record["memory"]
    return (m["argument_size_in_bytes"] + m["output_size_in_bytes"] - m["alias_size_in_bytes"]
            + m["temp_size_in_bytes"])


def decode_temps(records: list[dict]) -> dict[str, float]:
    """{"step 2": MiB, "decode_loop 8": ...}: the temporaries of each decode executable (one token a row)."""
    out = {}
    for r in records:
        rows = re.search(r"'tokens', \((\d+), 1\)", r["key"]["signature"])
        if r["key"]["name"] in ("step", "decode_loop") and rows:
            out[f"{r['key']['name']} {rows.group(1)}"] = round(r["memory"]["temp_size_in_bytes"] / 2**20, 1)
    return dict(sorted(out.items(), key=lambda kv: (kv[0].split()[0], int(kv[0].split()[1]))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encodings", nargs="+", default=["bfloat16", "int8", "q4_k"])
    ap.add_argument("--out", default="/tmp/tpu_memory")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--max-batch-size", type=int, default=1)
    ap.add_argument("--decode-attention", nargs="+", default=["xla"], choices=["xla", "pallas"])
    ap.add_argument("--quantized-matmul", nargs="+", default=["xla"], choices=["xla", "pallas"])
    ap.add_argument("--tensor-parallel-degree", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--write-config", metavar="DIR", help="only write the Llama-3.1-8B config folder to DIR")
    args = ap.parse_args()
    if args.write_config:
        write_llama8b(args.write_config)
        return
    model = os.path.join(args.out, "llama8b")
    write_llama8b(model)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, ".venv", "tpu-site"), ROOT]))
    results = []
    tp = args.tensor_parallel_degree
    runs = [(e, a, m) for e in args.encodings for a in args.decode_attention for m in args.quantized_matmul]
    for encoding, attention, matmul in runs:
        cache = os.path.join(args.out, f"cache_{encoding}_{attention}_{matmul}_b{args.max_batch_size}_tp{tp}")
        shutil.rmtree(cache, ignore_errors=True)  # this compile's records only (not an earlier code's)
        cmd = [sys.executable, "-m", "maxlike.entrypoints.cli", "warm-cache", "--target", "tpu:v5e:2x2", "--devices",
               str(tp), "--tensor-parallel-degree", str(tp), "--model-path", model,
               "--max-batch-size", str(args.max_batch_size), "--max-length", str(args.max_length),
               "--quantization-encoding", encoding, "--decode-attention", attention, "--quantized-matmul", matmul,
               "--no-convert-weights", "--jobs", "1", "--quiet", "--cache-dir", cache]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        records = [json.load(open(p)) for p in glob.glob(os.path.join(cache, "executables", "*.json"))]
        records = [r for r in records if r.get("memory")]
        top = max(records, key=peak) if records else None
        row = {"encoding": encoding, "decode_attention": attention, "quantized_matmul": matmul,
               "max_batch_size": args.max_batch_size, "tensor_parallel_degree": tp,
               "fits": run.returncode == 0, "executables": len(records),
               "step_arguments_gib": None, "peak_gib": round(peak(top) / 2**30, 2) if top else None,
               "decode_temp_mib": None, "error": None if run.returncode == 0 else run.stderr.strip().splitlines()[-1]}
        steps = [r["memory"]["argument_size_in_bytes"] for r in records if r["key"]["name"] == "step"]
        if steps:
            row["step_arguments_gib"] = round(min(steps) / 2**30, 2)
        row["largest_step_temp_mib"] = round(max((r["memory"]["temp_size_in_bytes"] for r in records
                                                  if r["key"]["name"] == "step"), default=0) / 2**20, 1)
        row["decode_temp_mib_by_rows"] = decode_temps(records)
        if row["decode_temp_mib_by_rows"]:
            row["decode_temp_mib"] = max(row["decode_temp_mib_by_rows"].values())
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
