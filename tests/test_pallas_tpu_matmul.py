"""The grouped matmul kernel (graphs.pallas_tpu_matmul: 4, 5 and 6 bits) in Pallas's TPU interpret
mode on CPU, against the product written out here from the values; a model that runs its products
through it against the same model with XLA's; and its compile for a TPU v5e."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import build_model, counted_calls, held, random_prompt
from graphs.pallas_tpu_matmul import grouped_matmul, kernel_layout, supported
from maxlike.pipelines.context import TextContext
from maxlike.weights.quantize import ENCODINGS, pack


def _weight(rng, k: int, n: int, lead: tuple = ()):
    """Random 4-bit values (0..15 stored, value - 8 meant), packed as maxlike.weights.quantize
    defines q4_k: per group of 32 inputs, value j in the low nibble of byte j, value j + 16 in the
    high nibble. Returns (packed, the values, float16 scales, float16 offsets)."""
    q = rng.integers(0, 16, size=(*lead, k, n)).astype(np.uint8)
    g = q.reshape(*lead, k // 32, 32, n)
    packed = (g[..., :16, :] | (g[..., 16:, :] << 4)).reshape(*lead, k // 2, n)
    scale = (rng.random((*lead, k // 32, n)) * 0.1 + 0.01).astype(np.float16)
    offset = (rng.normal(size=(*lead, k // 32, n)) * 0.05).astype(np.float16)
    return packed, q, scale, offset


def _expected(x, q, scale, offset):
    """x @ ((q - 8) * scale + offset), each scale and offset over its 32 inputs, in float64."""
    w = (q.astype(np.float64) - 8) * np.repeat(scale.astype(np.float64), 32, axis=0)
    if offset is not None:
        w = w + np.repeat(offset.astype(np.float64), 32, axis=0)
    return x.astype(np.float64) @ w


@pytest.mark.parametrize("k, n, m, with_offset, layers, dtype", [
    (1024, 256, 1, True, None, jnp.float32),  # two steps over the inputs, one tile of outputs
    (576, 640, 3, False, 3, jnp.float32),  # inputs taken whole, five tiles of 128 outputs; layer 2 of a stack
    (512, 1536, 9, True, 2, jnp.bfloat16),  # 16 rows (9 padded); bfloat16 input and output
])
def test_matches_the_product_written_out(k, n, m, with_offset, layers, dtype):
    rng = np.random.default_rng(k + n + m)
    lead = () if layers is None else (layers,)
    packed, q, scale, offset = _weight(rng, k, n, lead)
    x = rng.normal(size=(m, k)).astype(np.float32)
    layer = None if layers is None else layers - 1
    pick = (lambda a: a) if layers is None else (lambda a: a[layer])
    got = grouped_matmul(jnp.asarray(x, dtype), jnp.asarray(packed), jnp.asarray(scale),
                         jnp.asarray(offset) if with_offset else None,
                         None if layer is None else jnp.int32(layer), interpret=True)
    assert got.shape == (m, n) and got.dtype == dtype
    xs = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # the input as the kernel saw it
    want = _expected(xs, pick(q), pick(scale), pick(offset) if with_offset else None)
    # float32: 1e-5 of the largest output; bfloat16: the weight tile is rounded to bfloat16 (2^-8)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("encoding, k, n, m, layers", [
    ("q6_k", 1024, 256, 3, None),  # two steps over the inputs
    ("q5_k", 576, 384, 5, 2),  # inputs taken whole, three tiles of outputs; layer 1 of a stack
    ("q6_k", 576, 128, 1, None),
    ("q8_0", 1024, 384, 2, 2),
])
def test_five_six_and_eight_bits_match_the_product_written_out(encoding, k, n, m, layers):
    """q5_k (affine, groups of 32) and q6_k (groups of 16): values packed as the model stores them
    (maxlike.weights.quantize.pack), then laid out for the kernel (kernel_layout); q8_0 (int8,
    groups of 32) as they are. Against x @ (q * scale (+ offset)) from the values themselves,
    in float64."""
    enc = ENCODINGS[encoding]
    rng = np.random.default_rng(k + n)
    lead = () if layers is None else (layers,)
    mid = 1 << (enc.bits - 1)
    q = rng.integers(-mid, mid, size=(*lead, k, n)).astype(np.int8)  # every value the bits hold
    if enc.bits == 8:
        packed = q
    else:
        packed = np.stack([pack(a, 1, enc) for a in q.reshape(-1, k, n)]).reshape(*lead, k * enc.bits // 8, n)
    scale = (rng.random((*lead, k // enc.group, n)) * 0.1 + 0.01).astype(np.float16)
    offset = (rng.normal(size=scale.shape) * 0.05).astype(np.float16) if enc.offset else None
    x = rng.normal(size=(m, k)).astype(np.float32)
    layer = None if layers is None else layers - 1
    pick = (lambda a: a) if layers is None else (lambda a: a[layer])
    got = grouped_matmul(jnp.asarray(x), jnp.asarray(kernel_layout(packed, enc.bits, enc.group)), jnp.asarray(scale),
                         None if offset is None else jnp.asarray(offset),
                         None if layer is None else jnp.int32(layer), interpret=True)
    w = pick(q).astype(np.float64) * np.repeat(pick(scale).astype(np.float64), enc.group, axis=0)
    if offset is not None:
        w = w + np.repeat(pick(offset).astype(np.float64), enc.group, axis=0)
    want = x.astype(np.float64) @ w
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5 * np.abs(want).max())


def test_a_layout_in_parts_serves_each_part_alone():
    """kernel_layout(parts=2), as a device holding half the inputs of o or down under a mesh reads
    it: each half of the rows, through the kernel with its half of the inputs, sums to the whole
    product."""
    enc = ENCODINGS["q6_k"]
    rng = np.random.default_rng(5)
    k, n = 1024, 128
    q = rng.integers(-32, 32, size=(k, n)).astype(np.int8)
    scale = (rng.random((k // 16, n)) * 0.1 + 0.01).astype(np.float16)
    laid = kernel_layout(pack(q, 1, enc), 6, 16, parts=2)
    x = rng.normal(size=(2, k)).astype(np.float32)
    rows, groups = k * 6 // 8 // 2, k // 16 // 2  # each half's
    halves = [grouped_matmul(jnp.asarray(x[:, i * k // 2:(i + 1) * k // 2]), jnp.asarray(laid[i * rows:(i + 1) * rows]),
                             jnp.asarray(scale[i * groups:(i + 1) * groups]), interpret=True) for i in (0, 1)]
    want = x.astype(np.float64) @ (q.astype(np.float64) * np.repeat(scale.astype(np.float64), 16, axis=0))
    np.testing.assert_allclose(np.asarray(halves[0] + halves[1], np.float64), want, atol=1e-5 * np.abs(want).max())


def test_supported_shapes():
    u8 = np.uint8
    assert supported((512, 4096), u8, (32, 4096))  # q4_k / q4_0: 16 bytes a scale
    assert supported((4, 2048, 14336), u8, (4, 128, 14336), stacked=True)
    assert supported((640, 4096), u8, (32, 4096))  # q5_k: 20 bytes a scale (32 inputs)
    assert supported((768, 4096), u8, (64, 4096))  # q6_k: 12 bytes a scale (16 inputs)
    assert not supported((340, 4096), u8, (17, 4096))  # q5_k over 544 inputs: its top bits do not tile
    assert not supported((384, 4096), u8, (64, 4096))  # 6 bytes a scale: no form the kernel reads
    assert supported((2048, 32, 128), u8, (128, 32, 128))  # q [K, heads, head dim]: heads of 128, taken whole
    assert not supported((2048, 32, 64), u8, (128, 32, 64))  # heads of 64 (SmolLM2's)
    assert not supported((2048, 64, 128), u8, (128, 64, 128))  # 8,192 outputs: too many to take whole
    assert not supported((2048, 2, 16, 128), u8, (128, 2, 16, 128))  # three output axes (fused qkv)
    assert supported((1024, 4096), np.int8, (32, 4096))  # q8_0: int8, 32 bytes a scale
    assert not supported((1024, 4096), np.int8, (64, 4096))  # int8 in groups of 16: no form the kernel reads
    assert not supported((512, 5000), u8, (32, 5000))  # 5,000 outputs: no tile of 128 divides them
    assert not supported((2320, 512), u8, (145, 512))  # 4,640 inputs: no tile of 512, too many to take whole


@pytest.fixture(scope="module")
def wide_head_llama(tmp_path_factory):
    """A tiny Llama with heads of 128 (2 query heads, 1 KV head), whose q, k and v the kernel takes."""
    import torch
    import transformers as tf

    from conftest import save_tiny

    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, rope_theta=10000.0)
    torch.manual_seed(0)
    return save_tiny(tf.LlamaForCausalLM(cfg).eval(), tmp_path_factory.mktemp("wide_llama"))


@pytest.mark.parametrize("encoding, scan, wide", [
    ("q4_k", False, False), ("q4_k", True, False), ("q6_k", True, True),
    pytest.param("q8_0", True, True, marks=pytest.mark.slow), pytest.param("q5_k", False, True, marks=pytest.mark.slow),
])  # (q5_k and q8_0 in make test-slow: the fast suite must stay under 15 minutes)
def test_a_model_computes_the_same_through_the_kernel(tiny_models, wide_head_llama, monkeypatch, encoding, scan, wide):
    """A model quantized on load with quantized_matmul="pallas": o, gate, up and down (one output
    axis) go through the kernel, and so do q, k and v [D, heads, head dim] where the heads are of
    128 (`wide`; else XLA's product), and the logits of a prompt equal those of the same model
    with XLA's products. Under the layer loop the kernel reads each layer from the whole stack
    (graphs.base.LayerOf). Their scales and offsets are held as float16 bit patterns, 5- and
    6-bit values in the kernel's layout."""
    import graphs.pallas_tpu_matmul as kernel
    from maxlike.pipelines import layout

    calls = counted_calls(monkeypatch, kernel, "grouped_matmul")
    monkeypatch.setattr(layout, "quantized_head", lambda *args, **kw: None)  # (the head: test_quantized_head.py)
    path = wide_head_llama if wide else tiny_models["llama"][0]
    kw = dict(quantization_encoding=encoding, return_logits="all", fuse_projections=False, scan_layers=scan)
    prompt = random_prompt(11, seed=3)
    logits = {}
    for matmul in ("xla", "pallas"):
        model = build_model(path, quantized_matmul=matmul, **kw)
        assert model.matmul.kernel == matmul
        scales = {str(a.dtype) for name, a in model.params.items() if name.endswith(("o_scale", "v_scale")[:1 + wide])}
        assert scales == {"uint16" if matmul == "pallas" else "float16"}  # the kernel's: float16 bit patterns
        ctx = held(model, TextContext("q", prompt, 32))
        logits[matmul] = np.asarray(model.execute(model.prepare_initial_token_inputs([[ctx]])).logits)
    layers, kinds = model.config.num_layers, 7 if wide else 4
    assert len(calls) == kinds * (1 if scan else layers)  # traced once: per layer kind under the loop
    assert sum(len(shape) == (4 if scan else 3) for shape in calls) == (3 if wide else 0) * (1 if scan else layers)
    np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=1e-5 * max(1.0, np.abs(logits["xla"]).max()))


def test_pallas_is_not_taken_where_it_cannot_run(tiny_models, caplog, monkeypatch):
    """int8 weights have nothing the kernel takes but the q8_0 LM head (test_quantized_head.py);
    without that either, the model says so and runs XLA's products."""
    from maxlike.pipelines import layout

    path, _ = tiny_models["llama"]
    model = build_model(path, quantization_encoding="int8", quantized_matmul="pallas")
    assert model.matmul.kernel == "pallas" and [kind for kind, *_ in model.matmul.splits] == ["head"]
    monkeypatch.setattr(layout, "quantized_head", lambda *args, **kw: None)
    with caplog.at_level("WARNING", logger="maxlike"):
        model = build_model(path, quantization_encoding="int8", quantized_matmul="pallas")
    assert model.matmul.kernel == "xla"
    assert "no weight of this model is grouped in 4, 5, 6 or 8 bits" in caplog.text


MESH_SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, sys.argv[1])
import numpy as np
from conftest import random_prompt
from maxlike.entrypoints import LLM
from maxlike.pipelines import PipelineConfig, TextContext

prompts = [random_prompt(n, seed=n).tolist() for n in (5, 17, 9, 30)]
out = {}
mesh = dict(devices="4", data_parallel_degree=2, tensor_parallel_degree=2, scan_layers=True, quantized_matmul="pallas")
for name, kw in (("one", dict(devices="1", quantized_matmul="pallas")), ("mesh", mesh)):
    model = LLM(PipelineConfig(model_path=sys.argv[2], max_length=128, max_batch_size=4,
                               quantization_encoding=sys.argv[3], fuse_projections=False, **kw),
                progress=False).pipeline.model
    dp = model.replicas
    ctxs = [TextContext(f"x{i}", p, 40) for i, p in enumerate(prompts)]
    batches = [ctxs[r::dp] for r in range(dp)]
    for r, b in enumerate(batches):
        for c in b:
            model.kv_manager.claim(c.request_id, replica=r, total_tokens=c.max_length)
    logits = np.asarray(model.execute(model.prepare_initial_token_inputs(batches)).next_token_logits)
    per = logits.shape[0] // dp
    rows = {c.request_id: r * per + j for r, b in enumerate(batches) for j, c in enumerate(b)}
    hlo = model.session.executables("step")[0].as_text()
    out[name] = dict(logits=logits[[rows[c.request_id] for c in ctxs]].tolist(), matmul=model.matmul.kernel,
                     splits=[list(s) for s in model.matmul.splits],
                     gathers=[line.split("=")[1].split()[0] for line in hlo.splitlines() if " all-gather(" in line],
                     bits=sorted({str(a.dtype) for n, a in model.params.items() if n.endswith("_scale")}))
print(json.dumps(out))
"""


@pytest.mark.slow  # about 25-40 s each: `make test-slow` (the fast suite must stay under 15 minutes)
@pytest.mark.parametrize("encoding", ["q4_k", "q6_k", "q8_0"])
def test_the_kernel_runs_per_device_under_a_mesh(eight_head_models, wide_head_llama, encoding):
    """data 2 x tensor 2 (fake CPU devices, layers as one loop) with the kernel: o and down split
    over their inputs (partial products summed; q6_k's laid out per device's half, q8_0's o
    [heads, head dim] taken as one axis), gate and up over their outputs, rows over the replicas;
    in q6_k and q8_0, on heads of 128, q, k and v too, split over their heads; the q8_0 LM head
    over its vocabulary (tied in q4_k's model, whose float table stays for the embeddings).
    A prefill's logits equal one device's through the kernel (itself equal
    to XLA's products: test_a_model_computes_the_same_through_the_kernel, and the head's to its
    table: test_quantized_head.py); nothing gathered."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = eight_head_models["qwen2"] if encoding == "q4_k" else wide_head_llama  # (qwen2's table is tied)
    r = subprocess.run([sys.executable, "-c", MESH_SCRIPT, here, path, encoding],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    one, mesh = report["one"], report["mesh"]
    assert one["matmul"] == mesh["matmul"] == "pallas"
    splits = {kind: tuple(axes) for kind, *axes in mesh["splits"]}
    assert splits["o"] == splits["down"] == ("tensor", None) and splits["gate"] == splits["up"] == (None, "tensor")
    assert splits["head"] == (None, "tensor")
    if encoding != "q4_k":
        assert splits["q"] == splits["k"] == splits["v"] == (None, "tensor")
    assert float(np.abs(np.asarray(mesh["logits"]) - np.asarray(one["logits"])).max()) < 1e-5
    assert mesh["gathers"] == [], mesh["gathers"]  # (activations are not gathered either)
    assert "uint16" in mesh["bits"] and mesh["bits"] == one["bits"]


TPU_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
from maxlike.engine.mesh import target_devices
from graphs.layers import dequantize_grouped
from graphs.pallas_tpu_matmul import grouped_matmul

one = jax.sharding.SingleDeviceSharding(target_devices("tpu:v5e:2x2")[0])
out = {}
for name, k, n, bits, group, hows in (("mlp_in", 4096, (14336,), 4, 32, ("kernel", "xla")),
                                      ("down_q6_k", 14336, (4096,), 6, 16, ("kernel",)),
                                      ("o_q8_0", 4096, (4096,), 8, 32, ("kernel",)),
                                      ("q_q4_k", 4096, (32, 128), 4, 32, ("kernel",))):
    if name not in sys.argv[2].split(","):
        continue
    values = jnp.int8 if bits == 8 else jnp.uint8
    args = [jax.ShapeDtypeStruct(s, d, sharding=one) for s, d in (
        ((8, k), jnp.bfloat16), ((4, k * bits // 8, *n), values), ((4, k // group, *n), jnp.float16),
        ((4, k // group, *n), jnp.float16), ((), jnp.int32))]
    kernel = jax.jit(lambda x, v, s, o, layer, affine=bits == 4: grouped_matmul(x, v, s, o if affine else None, layer))
    xla = jax.jit(lambda x, v, s, o, layer: x @ dequantize_grouped(v[layer], s[layer], o[layer], (k,), x.dtype))
    for how in hows:
        compiled = dict(kernel=kernel, xla=xla)[how].trace(*args).lower().compile()
        out[f"{name}_{how}"] = {"custom_calls": compiled.as_text().count("tpu_custom_call"),
                                "temp": compiled.memory_analysis().temp_size_in_bytes}
print(json.dumps(out))
"""


@pytest.mark.tpu_target
@pytest.mark.parametrize("shapes", ["mlp_in", pytest.param("down_q6_k,o_q8_0,q_q4_k", marks=pytest.mark.slow)])
def test_compiles_for_tpu_without_a_dequantized_copy(shapes):
    """Mosaic compiles the kernel for a TPU v5e (here, compile-only) over a stack of 8B-MLP-shaped
    weights read by a traced layer index, at batch 8: no temporary buffer, where XLA's own
    dequantization builds the float weight (112 MiB) in one. Likewise (`make test-slow`: the fast
    suite must stay under 15 minutes) in q6_k (down's shape), q8_0 (o's) and for q [D, heads, head
    dim] in q4_k."""
    from test_tpu_target import _tpu_env

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", TPU_SCRIPT, root, shapes], capture_output=True, text=True,
                       timeout=600, env=_tpu_env())
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    if shapes == "mlp_in":
        kernel, xla = report["mlp_in_kernel"], report["mlp_in_xla"]
        assert kernel["custom_calls"] >= 1 and xla["custom_calls"] == 0, report
        assert kernel["temp"] < 2**20, report  # x's halves and the output: KBs
        assert xla["temp"] >= 4096 * 14336 * 2 * 0.9, report  # the bfloat16 weight, rebuilt in HBM
        return
    assert sorted(report) == sorted(f"{name}_kernel" for name in shapes.split(",")), report
    for other in report.values():
        assert other["custom_calls"] >= 1 and other["temp"] < 2**20, report
