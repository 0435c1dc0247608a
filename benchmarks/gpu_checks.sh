#!/bin/bash
# One device session's GPU checks (issues 12, 16, 17), results under $OUT:
#     OUT=/some/folder PARTS="probe compile tests" bash benchmarks/gpu_checks.sh
# probe:   batch-1 and batch-8 decode of a Llama-3.2-1B-shaped model, layers unrolled vs one scan
#          (unroll 1 and 2), with the copies XLA left in the decode loop: decides SCAN_LAYERS_DEFAULT["gpu"].
# compile: warm-cache (compile only, 8 worker processes, $COMPILE_LIMIT s each at most) of the 1B shape at
#          batch 4 / length 256, scan vs unrolled: compile seconds summed over the records written, and bytes.
# tests:   parity tests on this GPU (tiny models against HF on torch CPU, attention against numpy).
# kernels: the Pallas decode-attention kernel against the XLA attention (agreement, ms per call), issue 16.
# quant:   decode tok/s of the 1B shape per weight encoding, fused projections and the Pallas attention
#          (bench_gpu_decode.py --setups), each with its share of the memory roofline, with HF in the same run
#          (dynamic cache; static cache, compiled, at batch 1), issue 16. The random checkpoint stays in
#          /tmp/llama1b for the parts after it.
# qmatmul: decode's products with int8 / q8_0 / q4_k weights, graphs.pallas_gpu_matmul against XLA's and bf16
#          (probe_gpu_quant_matmul.py, 1B and 8B layer shapes), then the 1B's decode at batch 1 and 8: bf16, int8
#          with quantized_matmul=pallas (which also holds the LM head in q8_0: 1,254 against 1,500 MB a step), the
#          same with a float head, XLA's int8 and q4_k with the kernel, in one run (about 60 s a setup), then the
#          kernel's tilings at batch 1 (--sweep), issue 16.
# big:     the Llama-3.1-8B shape (random bf16, built on the GPU and saved to /tmp/llama8b: 16 GB) at batch 1 and 8:
#          bf16 and int8 with quantized_matmul=pallas (q8_0 head), with HF's dynamic and compiled static cache at
#          batch 1 in the same run, issue 16. $BIG_LIMIT s at most (default 420); rows are written as they come.
# flags:   bf16 decode at batch 1 and 8 under XLA:GPU command-buffer settings (XLA_FLAGS), issue 16.
# moe:     one MoE layer per expert kernel (grouped = ragged_dot, dense, gather, loop) in bf16 at Mixtral's width
#          (8 experts, hidden 4096, 14336 wide) for 1..256 tokens, then a random 8-layer MoE's decode per
#          kernel against HF eager: decides MOE_KERNEL_DEFAULT["gpu"], issue 17.
# prefill: prefill attention of the 8B's shape over page tables of 2k to 128k keys, one whole-table product
#          against key blocks (probe_prefill_blocks.py): ms and temporaries, for GPU_WHOLE_TABLE_SCORE_BYTES,
#          issue 16.
# profile: a jax.profiler trace of the 1B shape's decode steps (bf16 at batch 1 and 8, q4_k at 1), 10 steps a call:
#          kernels per step, the time in them and above the bytes' floor, the top kernels, issue 16.
#
# Durations seen on an H200 (2026-11-29), to fit a lease of 15 device minutes (a start took about 30 s):
# kernels 30 s; quant 400 s for HF and 3.5 of its 7 setups (per setup at batch 1, 8 and 64: about 10-25 s to load,
# 15-20 s, 20 s and 40-47 s to compile and time); profile about 60 s per setup. So one lease holds about:
#     OUT=$OUT PARTS="qmatmul" bash benchmarks/gpu_checks.sh                  (the open question of issue 16)
# then, warm, a second call with what is left (e.g. PARTS="prefill profile", or quant with QUANT_LIMIT set).
# The 8B shape is PARTS=big, best alone in a second call (its build and save are not timed yet).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
PARTS=${PARTS:-probe compile tests}
PY=${PY:-python3}
COMPILE_LIMIT=${COMPILE_LIMIT:-80}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
if [[ " $PARTS " == *" tests "* ]]; then
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_parity.py tests/test_scan_layers.py \
      tests/test_kv_cache.py -k "not smollm2" 2>&1 | tail -25 | tee "$OUT/pytest.log"
fi
if [[ " $PARTS " == *" kernels "* ]]; then
  timeout 75 $PY benchmarks/probe_gpu_kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
fi
if [[ " $PARTS " == *" quant "* ]]; then
  timeout "${QUANT_LIMIT:-400}" $PY benchmarks/bench_gpu_decode.py --model-path /tmp/llama1b --batch-sizes 1 8 64 \
      --variants 10:sync --offline-requests 0 --setups bf16 int8 q4_k fused pallas q8_0 float8_e4m3fn \
      --hf-batch-sizes 1 8 64 --hf-static-batch-sizes 1 --json "$OUT/quant.json" 2>&1 | grep -v "it/s]" \
      | tee "$OUT/quant.log"
fi
if [[ " $PARTS " == *" qmatmul "* ]]; then
  timeout 120 $PY benchmarks/probe_gpu_quant_matmul.py --json "$OUT/qmatmul.json" 2>&1 | tee "$OUT/qmatmul.log"
  timeout 300 $PY benchmarks/bench_gpu_decode.py --model-path /tmp/llama1b --batch-sizes 1 8 \
      --variants 10:sync --offline-requests 0 --setups bf16 int8+qpallas int8+qpallas+floathead int8 q4_k+qpallas \
      --hf-batch-sizes --json "$OUT/qmatmul_decode.json" 2>&1 | grep -v "it/s]" | tee "$OUT/qmatmul_decode.log"
  timeout 100 $PY benchmarks/probe_gpu_quant_matmul.py --sweep --rows 1 --json "$OUT/qmatmul_sweep.json" 2>&1 \
      | tee "$OUT/qmatmul_sweep.log"
fi
if [[ " $PARTS " == *" big "* ]]; then
  timeout "${BIG_LIMIT:-420}" $PY benchmarks/bench_gpu_decode.py --shape llama-8b --model-path /tmp/llama8b \
      --batch-sizes 1 8 --variants 10:sync --offline-requests 0 --setups bf16 int8+qpallas --hf-batch-sizes 1 \
      --hf-static-batch-sizes 1 --json "$OUT/big.json" 2>&1 | grep -v "it/s]" | tee "$OUT/big.log"
fi
if [[ " $PARTS " == *" flags "* ]]; then
  # XLA:GPU command buffers (CUDA graphs): the default set, none, and with the decode loop's while/conditional
  i=0
  for flags in "" "--xla_gpu_enable_command_buffer=" "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"; do
    i=$((i + 1))
    echo "== XLA_FLAGS='$flags'" | tee -a "$OUT/flags.log"
    XLA_FLAGS="$flags" timeout 75 $PY benchmarks/bench_gpu_decode.py --model-path /tmp/llama1b --batch-sizes 1 8 \
        --variants 10:sync --offline-requests 0 --setups bf16 --hf-batch-sizes --json "$OUT/flags_$i.json" 2>&1 \
        | grep -v "it/s]" | tee -a "$OUT/flags.log"
  done
fi
if [[ " $PARTS " == *" moe "* ]]; then
  timeout 180 $PY benchmarks/probe_moe_kernels.py --experts 8 --hidden 4096 --width 14336 --dtype bfloat16 \
      --tokens 1 2 4 8 32 128 256 2>&1 | tee "$OUT/moe_kernels.log"
  timeout 420 $PY benchmarks/bench_moe.py --kernels default grouped dense gather loop --batch-sizes 1 8 32 \
      --json "$OUT/moe_decode.json" 2>&1 | grep -v "it/s]" | tee "$OUT/moe_decode.log"
fi
if [[ " $PARTS " == *" prefill "* ]]; then
  timeout 150 $PY benchmarks/probe_prefill_blocks.py --json "$OUT/prefill.json" 2>&1 | tee "$OUT/prefill.log"
fi
if [[ " $PARTS " == *" profile "* ]]; then
  for run in "bf16 1 8" "q4_k 1"; do
    set -- $run
    setup=$1; shift
    timeout 70 $PY benchmarks/profile_step.py --model-path /tmp/llama1b --setup $setup --batch-sizes "$@" \
        --new-tokens 41 --max-num-steps 10 --json "$OUT/profile_$setup.json" 2>&1 | grep -v "it/s]" \
        | tee -a "$OUT/profile.log"
  done
fi
if [[ " $PARTS " == *" probe "* ]]; then
  timeout 240 $PY benchmarks/probe_gpu_step.py --groups layers --unrolls 1 2 --json "$OUT/probe_layers.json" \
      2>&1 | grep -v "it/s]" | tee "$OUT/probe_layers.log"
fi
if [[ " $PARTS " == *" compile "* ]]; then
  $PY - /tmp/shapes <<'PY'
import sys
import transformers as tf
sys.path[:0] = ["benchmarks", "."]
from bench_gpu_decode import SHAPES
from tests.conftest import byte_tokenizer
cfg = tf.LlamaConfig(bos_token_id=1, eos_token_id=2, **SHAPES["llama-1b"])
cfg.architectures = ["LlamaForCausalLM"]
cfg.save_pretrained(f"{sys.argv[1]}/llama1b")
byte_tokenizer().save_pretrained(f"{sys.argv[1]}/llama1b")  # compile-only reads no weights
PY
  for form in scan-layers no-scan-layers; do
    cache=/tmp/c_$form
    echo "== llama1b --$form, batch 4 len 256" | tee -a "$OUT/compile.log"
    start=$(date +%s)
    timeout "$COMPILE_LIMIT" $PY -m maxlike.entrypoints.cli warm-cache --quiet --no-convert-weights --jobs 8 \
        --max-batch-size 4 --max-length 256 --model-path /tmp/shapes/llama1b --cache-dir $cache --$form 2>&1 \
        | grep "^warm-cache" | tee -a "$OUT/compile.log"
    echo "wall $(( $(date +%s) - start )) s" | tee -a "$OUT/compile.log"
    $PY - $cache/executables <<'PY' | tee -a "$OUT/compile.log"
import glob, json, os, sys
records = [json.load(open(p)) for p in glob.glob(os.path.join(sys.argv[1], "*.json"))]
by = {}
for r in records:
    by.setdefault(r["key"]["name"], []).append(r["compile_seconds"])
print(f"{len(records)} executables written, {sum(r['bytes'] for r in records) / 2**20:.1f} MiB, compile seconds "
      f"summed {sum(r['compile_seconds'] for r in records):.1f}: "
      + ", ".join(f"{k} {len(v)} x {sum(v) / len(v):.2f} s" for k, v in sorted(by.items())))
PY
  done
fi
