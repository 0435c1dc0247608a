"""The TPU decode-attention kernel (graphs.pallas_tpu_attention) against the plain-XLA reference
graphs.attention._attend in Pallas's TPU interpret mode on CPU (DMAs and VMEM simulated); the kernel
and a whole model compiled for a TPU v5e slice (Mosaic, compile-only, libtpu from
MAXLIKE_TPU_SITE); and the Pallas path under a mesh (`shard_map`) on fake CPU devices."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from graphs.pallas_tpu_attention import paged_decode_attention, supported
from test_pallas_attention import BF16_TOL, _attend, check, make_case, poison_unattended
from test_tpu_target import _tpu_env, warm_cache

D = 128  # the kernel's head dim (a multiple of the TPU's 128 lanes)


# Pallas's TPU interpret mode: the grid's DMAs, VMEM and SMEM simulated on CPU, with uninitialized
# VMEM filled with NaN, reads out of bounds failing, and a check for data races.
TPU_INTERPRET = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan")


def kernel(q, k, v, table, q_pos, layer=0, **kw):
    return paged_decode_attention(q, k, v, table, q_pos, layer, interpret=TPU_INTERPRET, **kw)


@pytest.mark.parametrize(
    "h,kv,s,lengths,window",
    [
        (4, 2, 4, [6, 8, 1], None),  # GQA 2: ends mid-page, at a page's end, a single key
        (8, 2, 16, [17, 32, 1, 9], 5),  # GQA 4, 16-token pages, a window inside the first page
        (6, 2, 16, [150, 64, 65], 40),  # GQA 3; several 128-key blocks; a window across blocks
        pytest.param(2, 2, 8, [300], None, marks=pytest.mark.slow),  # MHA, one long row (38 pages)
        pytest.param(8, 1, 32, [33, 100], 70, marks=pytest.mark.slow),  # one KV head, 32-token pages
    ],
)
def test_matches_reference(h, kv, s, lengths, window):
    q, k, v, table, q_pos = make_case(len(lengths) * 7 + s, lengths=lengths, h=h, kv=kv, d=D, s=s)
    check(kernel(q, k, v, table, q_pos, window=window), _attend(q, k, v, table, q_pos, 0, window))


def test_reads_only_the_rows_keys():
    """Every pool slot that is no row's attended key (past a row's end, before its window, the
    null page, pages nobody owns) set to NaN, with tables full of the rows' own pages past their
    ends: the output is still the reference's over the clean pool."""
    window, lengths = 6, [7, 12, 1, 20]
    q, k, v, table, q_pos = make_case(41, lengths=lengths, h=4, kv=2, d=D, s=4, r=2, p=6, full_table=True)
    poison = poison_unattended(table, lengths, window, k.shape)
    check(kernel(q, poison(k), poison(v), table, q_pos, window=window), _attend(q, k, v, table, q_pos, 0, window))


def test_large_tables_split_the_rows_over_calls(monkeypatch):
    """A step whose page tables exceed the SMEM budget runs as several calls over runs of rows
    (here 2 table entries' budget: one row of 2 pages a call, across two replicas' rows)."""
    import graphs.pallas_tpu_attention as tpu_attention

    monkeypatch.setattr(tpu_attention, "_MAX_TABLE_ENTRIES", 2)
    q, k, v, table, q_pos = make_case(17, lengths=[5, 8, 3, 7, 6, 2], h=4, kv=2, d=D, s=4, r=2)
    check(kernel(q, k, v, table, q_pos, window=6), _attend(q, k, v, table, q_pos, 0, 6))
    with pytest.raises(ValueError, match="does not fit the kernel's SMEM budget"):
        kernel(*make_case(18, lengths=[9, 1], h=4, kv=2, d=D, s=4))


def test_layers_windows_scale_and_softcap_traced_under_jit():
    """A stacked pool of 3 layers read at a traced layer, a traced window (0: full), two
    replicas, Gemma's scale and soft cap."""
    q, k, v, table, q_pos = make_case(5, lengths=[9, 3, 14, 1], h=4, kv=2, d=D, s=4, r=2, layers=3)

    @jax.jit
    def both(layer, window):
        kw = dict(scale=0.3, softcap=2.0)
        return (kernel(q, k, v, table, q_pos, layer, window=window, **kw),
                _attend(q, k, v, table, q_pos, layer, window, **kw))

    for layer, window in ((2, 0), (1, 4)):
        check(*both(jnp.int32(layer), jnp.int32(window)))


def test_bfloat16():
    q, k, v, table, q_pos = make_case(31, lengths=[10, 16, 1], h=8, kv=2, d=D, s=16, dtype=jnp.bfloat16)
    check(kernel(q, k, v, table, q_pos), _attend(q, k, v, table, q_pos, 0), tol=BF16_TOL)


def test_supported():
    q = jax.ShapeDtypeStruct((2, 1, 8, 128), jnp.bfloat16)
    pool = jax.ShapeDtypeStruct((1, 1, 9, 16, 2, 128), jnp.bfloat16)
    assert supported(q, pool)
    assert supported(jax.ShapeDtypeStruct((2, 1, 6, 256), jnp.float32),
                     jax.ShapeDtypeStruct((1, 4, 9, 8, 3, 256), jnp.float32))  # Gemma's 256, 3 KV heads
    assert not supported(jax.ShapeDtypeStruct((2, 3, 8, 128), jnp.bfloat16), pool)  # a prefill
    assert not supported(q, jax.ShapeDtypeStruct((1, 1, 9, 16, 2, 128), jnp.float32))  # mixed dtypes
    assert not supported(jax.ShapeDtypeStruct((2, 1, 8, 64), jnp.bfloat16),
                         jax.ShapeDtypeStruct((1, 1, 9, 16, 2, 64), jnp.bfloat16))  # D = 64 (see supported)
    assert not supported(jax.ShapeDtypeStruct((2, 1, 6, 128), jnp.float32),
                         jax.ShapeDtypeStruct((1, 1, 9, 16, 4, 128), jnp.float32))  # H % KV
    assert not supported(jax.ShapeDtypeStruct((3, 1, 8, 128), jnp.float32),
                         jax.ShapeDtypeStruct((2, 1, 9, 16, 2, 128), jnp.float32))  # B % R
    with pytest.raises(ValueError, match="does not handle q"):
        pool = jnp.zeros((1, 1, 9, 16, 2, 64))
        paged_decode_attention(jnp.zeros((2, 1, 8, 64)), pool, pool, jnp.zeros((2, 4), jnp.int32),
                               jnp.zeros((2, 1), jnp.int32), interpret=True)


@pytest.fixture(scope="module")
def llama_128(tmp_path_factory):
    """A tiny Llama with 128-wide heads (the kernel's), 4 query and 2 KV heads."""
    import torch
    import transformers as tf

    from conftest import save_tiny

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return save_tiny(tf.LlamaForCausalLM(cfg).eval(), tmp_path_factory.mktemp("llama128"))


@pytest.mark.slow  # about 30 s: `make test-slow` (the fast suite runs the same path with the Triton kernel)
def test_a_model_decodes_the_same_with_the_kernel(llama_128, monkeypatch):
    """decode_attention="pallas" with the TPU kernel (interpret mode on CPU) through a whole model:
    a batch's greedy tokens and log-probs equal the plain-XLA attention's, with decode rows beside
    a prompt chunk in one step (in-flight batching)."""
    from graphs import attention, pallas_tpu_attention
    from maxlike.entrypoints import LLM
    from maxlike.interfaces import SamplingParams
    from maxlike.pipelines import PipelineConfig
    from test_architectures import PROMPTS

    calls = []

    def tpu_kernel(backend):
        calls.append(backend)
        return pallas_tpu_attention, True  # (plain interpret mode: the TPU one triples this test)

    monkeypatch.setattr(attention, "decode_kernel", tpu_kernel)
    runs = {}
    for kernel in ("xla", "pallas"):
        llm = LLM(PipelineConfig(model_path=llama_128, max_length=96, max_batch_size=4, executable_cache=False,
                                 enable_in_flight_batching=True, decode_attention=kernel), progress=False)
        outs = llm.generate_outputs([p[:20] for p in PROMPTS], sampling_params=SamplingParams(
            top_k=1, max_new_tokens=12, ignore_eos=True, logprobs=1), use_tqdm=False)
        runs[kernel] = [(o.token_ids, [s.token_log_probabilities[0] for s in o.log_probabilities]) for o in outs]
    assert calls  # the decode steps traced the TPU kernel
    for (tokens, lps), (want, want_lps) in zip(runs["pallas"], runs["xla"]):
        assert tokens == want
        np.testing.assert_allclose(lps, want_lps, atol=1e-5)


MESH_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from graphs.attention import AttentionRun, paged_attention
    from test_pallas_attention import make_case, _attend

    mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 2), ("data", "expert", "tensor"))
    q, k, v, table, q_pos = make_case(3, lengths=[9, 20, 4, 13], h=8, kv=2, d=16, s=4, r=2, layers=2)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    pool = ("data", None, None, None, "tensor")
    args = (put(q, "data", None, "tensor"), put(k, *pool), put(v, *pool), put(table, "data"), put(q_pos, "data"))
    step = jax.jit(lambda q, k, v, t, pos, layer: paged_attention(
        q, k, v, t, pos, layer, backend="cpu", window=6, kernel=AttentionRun("pallas", mesh)))
    hlo = step.lower(*args, jnp.int32(1)).compile().as_text()
    out = step(*args, jnp.int32(1))
    ref = _attend(q, k, v, table, q_pos, 1, 6)
    print(json.dumps({"err": float(np.abs(np.asarray(out) - np.asarray(ref)).max()),
                      "gathers": hlo.count(" all-gather("), "sharding": str(out.sharding.spec),
                      "kernel_loops": hlo.count("paged_decode_attention")}))
""")


def test_the_kernel_runs_per_shard_under_a_mesh():
    """data 2 x tensor 2 on fake CPU devices: each device runs the kernel (here the interpret-mode
    one) over its own replica's pool and heads (shard_map), and the result equals one device's
    reference; nothing is all-gathered."""
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", MESH_SCRIPT, here], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["err"] < 1e-5 and report["gathers"] == 0, report
    assert report["sharding"] == str(jax.sharding.PartitionSpec("data", None, "tensor")), report


TPU_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from graphs.attention import AttentionRun, paged_attention
    from maxlike.engine.mesh import target_devices

    devices = target_devices("tpu:v5e:2x2")
    out = {}
    # One chip, a Llama-3.1-8B layer's pool (32 layers of 1,100 16-token pages, 8 KV heads of 128, bf16).
    one = Mesh(np.array(devices[:1]).reshape(1, 1, 1), ("data", "expert", "tensor"))
    mesh = Mesh(np.array(devices).reshape(2, 1, 2), ("data", "expert", "tensor"))
    # A step of 128 rows of 2,048 pages: a 1 MiB page table, beyond the v5e's SMEM, split over calls.
    for name, m, (b, h, kv, p, r, l, n) in (("one_chip", one, (8, 32, 8, 128, 1, 32, 1100)),
                                             ("data2_tensor2", mesh, (8, 32, 8, 64, 2, 32, 600)),
                                             ("large_table", one, (128, 32, 8, 2048, 1, 1, 2000))):
        s = lambda shape, dt, *spec: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(m, P(*spec)))
        pool = s((r, l, n, 16, kv, 128), jnp.bfloat16, "data", None, None, None, "tensor")
        args = (s((b, 1, h, 128), jnp.bfloat16, "data", None, "tensor"), pool, pool, s((b, p), jnp.int32, "data"),
                s((b, 1), jnp.int32, "data"), s((), jnp.int32))
        step = jax.jit(lambda q, k, v, t, pos, layer: paged_attention(
            q, k, v, t, pos, layer, backend="tpu", kernel=AttentionRun("pallas", m)))
        compiled = step.lower(*args).compile()
        hlo = compiled.as_text()
        mem = compiled.memory_analysis()
        out[name] = {"custom_calls": hlo.count("custom_call_target=\\"tpu_custom_call\\""),
                     "gathers": hlo.count(" all-gather("), "temp": mem.temp_size_in_bytes,
                     "arguments": mem.argument_size_in_bytes}
    print(json.dumps(out))
""")


@pytest.mark.tpu_target
def test_compiles_for_tpu_without_copying_the_pool():
    """Mosaic compiles the kernel for TPU v5e (here, compile-only): on one chip over an 8B-shaped
    pool, on data 2 x tensor 2 chips per shard, and for page tables larger than SMEM. No temporary
    as large as a pool (XLA would copy one to give the kernel another layout), no all-gather."""
    env = _tpu_env()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", TPU_SCRIPT, root], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    for name, got in report.items():
        assert got["custom_calls"] >= 1 and got["gathers"] == 0, (name, got)
        assert got["temp"] < 2**20, (name, got)  # KBs of outputs and scalars; one pool is GiBs
    assert report["one_chip"]["arguments"] > 2 * 2**30  # the two pools are arguments, as the model holds them
    assert report["large_table"]["custom_calls"] == 4  # 128 rows of 2,048 pages: 32 rows a call


@pytest.mark.slow  # about 35 s: `make test-slow` (the kernel's own TPU compile is in the fast suite)
@pytest.mark.tpu_target
def test_a_model_compiles_for_tpu_with_the_kernel(llama_128, tmp_path):
    """warm-cache --decode-attention pallas for a v5e slice (tensor 2 x data 2) with a tiny Llama
    of 128-wide heads: every bucket's step compiles, with the Mosaic kernel in the decode steps."""
    result = warm_cache(tmp_path / "cache", "--model-path", llama_128, "--tensor-parallel-degree", "2",
                        "--data-parallel-degree", "2", "--max-batch-size", "2", "--max-length", "64",
                        "--kv-cache-page-size", "16", "--decode-attention", "pallas", "--no-convert-weights")
    assert result.returncode == 0, result.stderr[-3000:]
    kernel_in = {}  # (name, tokens a row) -> {whether the serialized executable holds the kernel}
    for record_path in glob.glob(str(tmp_path / "cache" / "executables" / "*.json")):
        with open(record_path) as f:
            key = json.load(f)["key"]
        if key["name"] in ("step", "decode_loop"):
            tokens = int(re.search(r"'tokens', \(\d+, (\d+)\)", key["signature"]).group(1))
            with open(record_path[: -len(".json")] + ".exe", "rb") as f:
                kernel_in.setdefault((key["name"], tokens), set()).add(b"paged_decode_attention_tpu" in f.read())
    assert kernel_in[("step", 1)] == {True} and kernel_in[("decode_loop", 1)] == {True}  # decode: the kernel
    prefill = [found for (name, tokens), found in kernel_in.items() if tokens > 1]
    assert prefill and all(found == {False} for found in prefill)  # prefill: XLA's attention
