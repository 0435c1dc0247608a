#!/bin/bash
# One device session's GPU checks (issue 12: layers as one loop on GPU), results under $OUT.
#     OUT=/some/folder bash benchmarks/gpu_checks.sh
# 1. Batch-1 and batch-8 decode of a Llama-3.2-1B-shaped model, layers unrolled vs one scan
#    (unroll 1 and 2), with the copies XLA left in the decode loop: decides SCAN_LAYERS_DEFAULT["gpu"].
# 2. warm-cache (compile only, 8 worker processes, 80 s each at most) of the 1B shape at batch 4 / length 256, scan vs
#    unrolled, and of a Llama-3.1-8B shape with scan: compile seconds summed over executables, and bytes.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
${PY:-python3} -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
timeout 240 ${PY:-python3} benchmarks/probe_gpu_step.py --groups layers --unrolls 1 2 --json "$OUT/probe_layers.json" \
    2>&1 | grep -v "it/s]" | tee "$OUT/probe_layers.log"
${PY:-python3} - /tmp/shapes <<'PY'
import sys
import transformers as tf
sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from bench_gpu_decode import SHAPES
from tests.conftest import byte_tokenizer
out = sys.argv[1]
for name, kw in {"llama1b": SHAPES["llama-1b"],
                 "llama8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=131072, rope_theta=500000.0)}.items():
    cfg = tf.LlamaConfig(bos_token_id=1, eos_token_id=2, **kw)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(f"{out}/{name}")
    byte_tokenizer().save_pretrained(f"{out}/{name}")  # compile-only reads no weights
PY
W="${PY:-python3} -m maxlike.entrypoints.cli warm-cache --quiet --no-convert-weights --jobs 8 --max-batch-size 4 --max-length 256"
for run in "llama1b scan --scan-layers" "llama1b unrolled --no-scan-layers" "llama8b scan --scan-layers"; do
  set -- $run
  echo "== $1 $2, batch 4 len 256" | tee -a "$OUT/compile.log"
  start=$(date +%s.%N)
  timeout 80 $W --model-path /tmp/shapes/$1 --cache-dir /tmp/c_$1_$2 $3 2>&1 | tee -a "$OUT/compile.log"
  echo "wall $(echo "$(date +%s.%N) - $start" | bc) s; on disk $(du -sm /tmp/c_$1_$2/executables | cut -f1) MiB" \
    | tee -a "$OUT/compile.log"
done
# 3. The scan-vs-unrolled parity tests on this GPU (tiny models against HF on torch CPU), as far as time allows.
timeout 90 ${PY:-python3} -m pytest -q -p no:cacheprovider tests/test_scan_layers.py -k "not smollm2" 2>&1 \
    | tail -25 | tee "$OUT/pytest_scan_layers.log"
