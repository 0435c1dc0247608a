#!/bin/bash
# The executable set at model scale: warm-cache for a TPU v5e 2x2 slice from this CPU machine,
# layers as one loop (scan, the TPU default) vs unrolled. Needs libtpu (`make test` installs it
# in .venv/tpu-site). Figures: README "Compile set (TPU v5e 2x2, compiled on this CPU)".
#     bash benchmarks/bench_compile_set.sh [OUT_FOLDER]
set -e
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/compile_set}
mkdir -p "$OUT"
SMOL=$(.venv/bin/python -c "from maxlike.entrypoints.llm import default_model_path; print(default_model_path())")
# Tiny Llamas of 2, 8 and 32 layers (hidden 64, 8 query / 2 KV heads), and a Llama-3.1-8B config (no weights:
# compile-only reads none).
.venv/bin/python - "$OUT" <<'PY'
import sys
import torch, transformers as tf
sys.path.insert(0, "tests")
from conftest import save_tiny
out = sys.argv[1]
common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
for n in (2, 8, 32):
    torch.manual_seed(0)
    save_tiny(tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=n, **common)).eval(), f"{out}/tiny_{n}")
PY
.venv/bin/python benchmarks/bench_tpu_memory.py --write-config "$OUT/llama8b"
W="env PYTHONPATH=.venv/tpu-site:. .venv/bin/python -m maxlike.entrypoints.cli warm-cache --target tpu:v5e:2x2 --quiet --no-convert-weights --jobs 1"
run() { label=$1; dir=$OUT/cache_$2; shift 2; rm -rf "$dir"; echo "== $label"
  $W --cache-dir "$dir" "$@" 2>&1 | grep "^warm-cache\|^maxlike\|^  "; du -sm "$dir/executables" 2>/dev/null | awk '{print "on disk " $1 " MiB"}'; }
run "SmolLM2 DP4 scan" smol_scan --model-path "$SMOL" --max-batch-size 4 --max-length 256
run "SmolLM2 DP4 unrolled" smol_unrolled --model-path "$SMOL" --max-batch-size 4 --max-length 256 --no-scan-layers
for n in 2 8 32; do
  run "tiny $n layers TP4 scan, batch 1 len 32" l$n --model-path "$OUT/tiny_$n" --tensor-parallel-degree 4 --max-batch-size 1 --max-length 32
done
run "tiny 2 layers TP4 scan, batch 4 len 256" tiny_scan --model-path "$OUT/tiny_2" --tensor-parallel-degree 4 --max-batch-size 4 --max-length 256
run "tiny 2 layers TP4 unrolled, batch 4 len 256" tiny_unrolled --model-path "$OUT/tiny_2" --tensor-parallel-degree 4 --max-batch-size 4 --max-length 256 --no-scan-layers
run "Llama-3.1-8B shape TP4, batch 64 len 8192 (refused: the KV pool alone fills a chip)" big_dry --model-path "$OUT/llama8b" --tensor-parallel-degree 4 --max-batch-size 64 --max-length 8192 --dry-run
run "Llama-3.1-8B shape TP4 scan, batch 1 len 16" big_scan --model-path "$OUT/llama8b" --tensor-parallel-degree 4 --max-batch-size 1 --max-length 16
run "Llama-3.1-8B shape TP4 unrolled, batch 1 len 16" big_unrolled --model-path "$OUT/llama8b" --tensor-parallel-degree 4 --max-batch-size 1 --max-length 16 --no-scan-layers
# The whole set of a serving configuration that fits the slice, in 2 worker processes (about 10 minutes here).
W="$W --jobs 2" run "Llama-3.1-8B shape TP4 scan, batch 16 len 8192, 2 jobs" big_full --model-path "$OUT/llama8b" --tensor-parallel-degree 4 --max-batch-size 16 --max-length 8192
