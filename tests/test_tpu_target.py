"""Compiling for a TPU slice on this CPU machine (`warm-cache --target tpu:<topology>`).

libtpu lives in its own path (MAXLIKE_TPU_SITE; `make test` installs it there), put on
PYTHONPATH for these subprocesses only: the main test environment never imports it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import dry_run_counts, kinds_written

pytestmark = pytest.mark.tpu_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "tpu:v5e:2x2"


def _tpu_env() -> dict:
    """`make test` installs libtpu and names it (MAXLIKE_TPU_SITE): there its absence is a failure.
    Elsewhere (a bare `pytest`) these tests skip, saying how to run them."""
    named = os.environ.get("MAXLIKE_TPU_SITE")
    if not named:
        pytest.skip("compiling for a TPU slice needs libtpu in its own folder: `make test` installs it and "
                    "sets MAXLIKE_TPU_SITE (or point MAXLIKE_TPU_SITE at a folder holding the libtpu that matches jax)")
    site = os.path.abspath(named)
    if not os.path.isdir(os.path.join(site, "libtpu")):
        pytest.fail(f"libtpu is not installed at MAXLIKE_TPU_SITE={site}: run `make test` (it installs it there).")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([site, ROOT]))


def warm_cache(cache, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maxlike.entrypoints.cli", "warm-cache", "--quiet", "--target",
                           TOPOLOGY, "--cache-dir", str(cache), *args],
                          capture_output=True, text=True, timeout=600, env=_tpu_env())


def _records(cache) -> list[dict]:
    out = []
    for path in glob.glob(os.path.join(str(cache), "executables", "*.json")):
        with open(path) as f:
            record = json.load(f)
        out.append(record)
    return out


def _check_one_step_per_bucket(result, cache, mesh: str) -> list[dict]:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TPU_WORKER_HOSTNAMES" not in result.stderr  # libtpu kept from probing for a local TPU
    buckets = int(re.search(r"for (\d+) buckets", result.stdout).group(1))
    records = _records(cache)
    steps = [r for r in records if r["key"]["name"] == "step"]
    assert len(steps) == buckets and len({r["key"]["signature"] for r in steps}) == buckets
    for r in records:
        assert r["target"] == TOPOLOGY  # the record names the topology
        key = r["key"]
        assert (key["backend"], key["device_kind"], key["mesh"], key["devices"], key["dtype"]) == (
            "tpu", "TPU v5 lite", mesh, "(0, 1, 2, 3)", "bfloat16")
        assert r["memory"]["generated_code_size_in_bytes"] > 0
    return records


@pytest.mark.slow  # `make test-slow` (the fast suite must stay under 15 minutes)
def test_tiny_llama_tensor_parallel_4(eight_head_models, tmp_path):
    result = warm_cache(tmp_path, "--model-path", eight_head_models["llama"], "--tensor-parallel-degree", "4",
                        "--max-batch-size", "1", "--max-length", "32", "--kv-cache-page-size", "16")
    records = _check_one_step_per_bucket(result, tmp_path, "(('data', 1), ('expert', 1), ('tensor', 4))")
    assert {"step", "decode_loop", "unpack_inputs", "sample", "sample_greedy"} <= {r["key"]["name"] for r in records}
    assert kinds_written(tmp_path) == dry_run_counts(result.stdout)  # the closed form, for a TPU mesh too
    profile = glob.glob(str(tmp_path / "executables" / "activations" / "*.json"))
    assert len(profile) == 1 and json.load(open(profile[0]))["temp_bytes"] > 0

    again = warm_cache(tmp_path, "--model-path", eight_head_models["llama"], "--tensor-parallel-degree", "4",
                       "--max-batch-size", "1", "--max-length", "32", "--kv-cache-page-size", "16")
    assert again.returncode == 0 and len(_records(tmp_path)) == len(records)  # same keys: replaced, not added


@pytest.mark.slow  # about 2 minutes here: `make test-slow`
def test_smollm2_data_parallel_4(smollm2_path, tmp_path):
    """9 query and 3 KV heads do not split four ways: the four chips are four replicas."""
    result = warm_cache(tmp_path, "--model-path", smollm2_path, "--max-batch-size", "1", "--max-length", "16",
                        "--kv-cache-page-size", "16")
    _check_one_step_per_bucket(result, tmp_path, "(('data', 4), ('expert', 1), ('tensor', 1))")


def test_bad_targets_are_named(tiny_llama, tmp_path):
    result = warm_cache(tmp_path, "--model-path", tiny_llama[0], "--target", "tpu:v9z:2x2")
    assert result.returncode == 1
    assert "libtpu does not know that topology" in result.stderr and "'v5e:2x2'" in result.stderr
    result = warm_cache(tmp_path, "--model-path", tiny_llama[0], "--target", "tpu:v5e:2x2",
                        "--tensor-parallel-degree", "3")
    assert result.returncode == 1 and "does not divide the 4 selected devices" in result.stderr


@pytest.mark.slow  # `make test-slow` (the fast suite must stay under 15 minutes)
def test_devices_takes_the_first_chips_of_the_target(tiny_llama, tmp_path):
    """devices=N compiles for the first N chips of the slice (one v5e chip: does a model fit one?);
    ids are refused with the reason."""
    result = warm_cache(tmp_path, "--model-path", tiny_llama[0], "--devices", "1", "--max-batch-size", "1",
                        "--max-length", "16", "--kv-cache-page-size", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {(r["key"]["mesh"], r["key"]["devices"]) for r in _records(tmp_path)} == {
        ("(('data', 1), ('expert', 1), ('tensor', 1))", "(0,)")}
    result = warm_cache(tmp_path, "--model-path", tiny_llama[0], "--devices", "0,1", "--dry-run")
    assert result.returncode == 1 and "compile_target and devices='0,1' exclude each other" in result.stderr
    assert "a count such as devices='1' takes that many of them" in result.stderr


def test_groups_larger_than_a_devices_share_are_refused(eight_head_models, tmp_path):
    """q4_k groups 32 inputs; tensor 4 leaves each chip 16 of the tiny model's o inputs (2 of 8 heads
    of 8): refused before anything is read or compiled, naming the weight and what to change."""
    result = warm_cache(tmp_path, "--model-path", eight_head_models["llama"], "--tensor-parallel-degree", "4",
                        "--quantization-encoding", "q4_k", "--dry-run")
    assert result.returncode == 1
    assert "tensor_parallel_degree=4 cannot split 2 weight(s) evenly" in result.stderr  # o's scales and offsets
    assert "layers.o_scale: axis 1 (q_heads) of size 2 over 4 devices" in result.stderr  # (stacked: the TPU loop)
    assert "use a smaller degree or quantization_encoding int8" in result.stderr


def test_a_pool_larger_than_the_chips_fails_before_compiling(tmp_path):
    """A target's KV pool is sized for max_batch_size x max_length: a Llama-3.1-8B shape at 64 x 8192
    needs 16 GiB of it per v5e chip (16 GiB) on tensor 4, which is refused with what to lower."""
    import transformers as tf

    from conftest import byte_tokenizer

    cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp_path / "llama8b")  # compile-only reads no weights
    byte_tokenizer().save_pretrained(tmp_path / "llama8b")
    common = ["--model-path", str(tmp_path / "llama8b"), "--tensor-parallel-degree", "4", "--max-length", "8192",
              "--dry-run"]
    result = warm_cache(tmp_path, *common, "--max-batch-size", "64")
    assert result.returncode == 1, result.stdout
    assert "does not fit a TPU v5 lite chip (16 GiB)" in result.stderr and "16.0 GiB per chip" in result.stderr
    assert "Lower --max-batch-size or --max-length" in result.stderr
    fits = warm_cache(tmp_path, *common, "--max-batch-size", "16")
    assert fits.returncode == 0 and "45 buckets, 120 executables" in fits.stdout, fits.stderr[-2000:]


DECODE_SCRIPT = """
import glob, json, re, sys
sys.path.insert(0, sys.argv[1])
from maxlike.config import PipelineConfig
from maxlike.pipelines.registry import PIPELINE_REGISTRY

encoding, chips, max_length, max_batch = sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
config = PipelineConfig(model_path=sys.argv[2], max_length=max_length, max_batch_size=max_batch, kv_cache_page_size=16,
                        quantization_encoding=None if encoding == "bfloat16" else encoding, compile_only=True,
                        compile_target="tpu:v5e:2x2", devices=str(chips), tensor_parallel_degree=chips,
                        warmup=False, executable_cache=True, cache_dir=sys.argv[3], max_num_steps=4)
model = PIPELINE_REGISTRY.retrieve(config, progress=False)[1].model
prefill = int(sys.argv[8])  # also the prefill steps of this many tokens (0: none)
for bucket in model.step_buckets():
    if bucket.tokens in (1, prefill) and bucket.rows <= 2 and not bucket.mixed:
        model.compile_bucket(bucket.rows, bucket.tokens, bucket.width, 4, per_rows=False)
out = {}
for path in glob.glob(sys.argv[3] + "/executables/*.json"):
    with open(path) as f:
        record = json.load(f)
    if record["key"]["name"] not in ("step", "decode_loop"):
        continue
    rows, tokens = re.search(r"'tokens', \\((\\d+), (\\d+)\\)", record["key"]["signature"]).groups()
    name = record["key"]["name"] if tokens == "1" else "prefill"
    out[name + " " + rows] = record["memory"]
print(json.dumps(out))
"""


def _decode_memory(tmp_path, layers: int, vocab: int, encoding: str, chips: int, max_length: int,
                   max_batch: int = 2, prefill: int = 0) -> dict:
    """memory_analysis() of the 1- and 2-row decode steps and loops ("step 2", ...), and of the
    prefill steps of `prefill` tokens ("prefill 2"), of a Llama of Llama-3.1-8B's width, compiled
    alone for `chips` v5e chips (tensor parallel)."""
    import transformers as tf

    from conftest import byte_tokenizer

    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp_path / "wide")  # compile-only reads no weights
    byte_tokenizer().save_pretrained(tmp_path / "wide")
    args = [ROOT, str(tmp_path / "wide"), str(tmp_path / "c"), encoding, str(chips), str(max_length), str(max_batch),
            str(prefill)]
    r = subprocess.run([sys.executable, "-c", DECODE_SCRIPT, *args], capture_output=True, text=True, timeout=600,
                       env=_tpu_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # about 30 s (`make test-slow`); test_quantization checks the products' barrier on "tpu"
def test_the_decode_loop_keeps_the_q_k_v_stacks_as_stored(tmp_path):
    """Compiled for one v5e chip, a 2-row decode loop over two int8 layers of Llama-3.1-8B's width
    holds no copy of the q, k and v stacks (32 + 8 + 8 MiB): XLA:TPU laid them out head by head
    for its products, a copy made before the loop, until graphs.layers multiplied them as
    [D, heads x head dim] matrices behind an optimization barrier (780 MiB for the whole 8B)."""
    memory = _decode_memory(tmp_path, 2, 512, "int8", 1, 64)
    assert memory["decode_loop 2"]["argument_size_in_bytes"] > 2 * 48 * 2**20  # the weights: q, k, v, o, MLP
    for loop in ("decode_loop 1", "decode_loop 2"):
        assert memory[loop]["temp_size_in_bytes"] < 8 * 2**20, memory  # below one layer's k: no copy


@pytest.mark.slow  # about 50 s (`make test-slow`); test_kv_cache checks the attention's barrier on "tpu"
def test_a_decode_step_on_four_chips_gathers_pages_without_copying_the_pool(tmp_path):
    """The Llama-3.1-8B shape in bfloat16 on 4 v5e chips (2 KV heads a chip), decode steps and loops
    of 1 and 2 rows of 2,048 tokens (the pool sized for 8), and prefill steps of 16 tokens: no copy
    of a layer's KV pool (257 MiB a chip), which XLA:TPU made in every layer of every step of 2 rows
    to gather the pages head by head, until graphs.attention kept the gathered pages [rows, keys,
    KV x D] behind an optimization barrier (of 2 rows or more: for one row the barrier made the
    copy, in decode's whole-table attention and in prefill's loop over key blocks alike)."""
    memory = _decode_memory(tmp_path, 32, 128256, "bfloat16", 4, 2048, max_batch=8, prefill=16)
    assert sorted(memory) == ["decode_loop 1", "decode_loop 2", "prefill 1", "prefill 2", "step 1", "step 2"], memory
    for name, got in memory.items():
        assert got["temp_size_in_bytes"] < 16 * 2**20, (name, memory)  # 257 MiB with the copy


TABLE_ROWS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from graphs.base import WeightSpec
from graphs.layers import embed_rows
from maxlike.engine.mesh import target_devices
from maxlike.weights import quantize

vocab, d = 128256, 1024
specs, encs, _ = quantize.with_head({"embed": WeightSpec((vocab, d), ("vocab", "embed"))}, {}, {}, "embed")
on = jax.sharding.SingleDeviceSharding(target_devices("tpu:v5e:2x2")[0])
w = {n: jax.ShapeDtypeStruct(specs[n].shape, quantize.dtype_of(n, encs, np.float32), sharding=on)
     for n in ("embed", "embed_scale")}
out = {}
for rows in (1, 8):
    tokens = jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=on)
    compiled = jax.jit(lambda w, t: embed_rows(w, t, jnp.bfloat16)).lower(w, tokens).compile()
    out[rows] = compiled.memory_analysis().temp_size_in_bytes
print(json.dumps(out))
"""


def test_a_q8_0_embedding_table_gives_up_rows_without_a_copy():
    """The embedding table held beside a q8_0 head (maxlike.weights.quantize.ROWS), 128,256 rows of
    1,024, compiled for one v5e chip: gathering the rows of 1 or 8 tokens copies nothing of it. Held
    as int8 [V, D], XLA:TPU re-tiles the whole table to gather one row (125 MiB here, 501 MiB at the
    8B's width; benchmarks/probe_tpu_table_rows.py), hence the int32 words."""
    r = subprocess.run([sys.executable, "-c", TABLE_ROWS_SCRIPT, ROOT], capture_output=True, text=True, timeout=300,
                       env=_tpu_env())
    assert r.returncode == 0, r.stderr[-3000:]
    temps = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(temps) == ["1", "8"] and max(temps.values()) < 2**20, temps  # the table is 125 MiB


def test_outside_make_test_these_skip_and_the_suite_cleans_its_cache(tmp_path):
    """Without MAXLIKE_TPU_SITE (a bare pytest) the TPU-target tests skip with the reason; the
    suite's temporary cache folder is removed when the run ends."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAXLIKE_TPU_SITE", "MAXLIKE_CACHE_DIR")}
    env["TMPDIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        os.path.join(ROOT, "tests", "test_tpu_target.py"), "-k", "bad_targets"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert "1 skipped" in r.stdout and "make test` installs it" in r.stdout, r.stdout[-2000:]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("maxlike-test-cache-")]
