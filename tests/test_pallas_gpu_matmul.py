"""graphs.pallas_gpu_matmul (the GPU dequantizing matmul) in Pallas interpret mode on CPU: against
the product written out in float64 from the values, scales and offsets, for every form it takes;
what it refuses; its Triton lowering for a CUDA target; and a whole model with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphs import pallas_gpu_matmul as gm
from maxlike.weights import quantize


def written_out(x, weight):
    return np.asarray(x, np.float64) @ weight


def case(rng, form: str, k: int, n: int):
    """(values, scale, offset, the float64 weight they stand for), built by hand from the module
    doc's layouts (not through maxlike.weights.quantize)."""
    if form == "int8":
        v = rng.integers(-127, 128, (k, n)).astype(np.int8)
        s = rng.uniform(0.001, 0.02, n).astype(np.float32)
        return v, s, None, v.astype(np.float64) * s
    g = k // 32
    s = rng.uniform(0.001, 0.02, (g, n)).astype(np.float16)
    per_input = np.repeat(s.astype(np.float64), 32, axis=0)
    if form == "q8_0":
        v = rng.integers(-127, 128, (k, n)).astype(np.int8)
        return v, s, None, v.astype(np.float64) * per_input
    levels = rng.integers(0, 16, (k, n))  # stored nibbles: value + 8
    grouped = levels.reshape(g, 32, n)
    packed = (grouped[:, :16] | (grouped[:, 16:] << 4)).astype(np.uint8).reshape(k // 2, n)
    weight = (levels - 8) * per_input
    if form == "q4_0":
        return packed, s, None, weight
    o = rng.uniform(-0.05, 0.05, (g, n)).astype(np.float16)
    return packed, s, o, weight + np.repeat(o.astype(np.float64), 32, axis=0)


@pytest.mark.parametrize("form,m,k,n", [("int8", 1, 256, 128), ("int8", 5, 1024, 64), ("q8_0", 3, 2048, 128),
                                        ("q4_0", 1, 512, 192), ("q4_k", 16, 2048, 64), ("q4_k", 40, 96, 64)])
def test_matches_the_product_written_out(form, m, k, n):
    rng = np.random.default_rng([m, k, n])
    v, s, o, weight = case(rng, form, k, n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = np.asarray(gm.grouped_matmul(jnp.asarray(x), jnp.asarray(v), jnp.asarray(s),
                                       None if o is None else jnp.asarray(o), interpret=True))
    want = written_out(x, weight)
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_splits_k_for_few_output_blocks():
    """Few outputs, long K: the grid splits K (here 32 ways: 128 groups, one output block) and the
    partial products add up."""
    assert gm._splits(steps=128, blocks=1) == 32 and gm._splits(steps=64, blocks=2) == 16
    assert gm._splits(steps=64, blocks=512) == 1
    assert gm._splits(steps=6, blocks=1) == 1  # no split below _MIN_STEPS steps each
    rng = np.random.default_rng(1)
    v, s, o, weight = case(rng, "q4_k", 4096, 64)
    x = rng.standard_normal((2, 4096)).astype(np.float32)
    got = gm.grouped_matmul(jnp.asarray(x), jnp.asarray(v), jnp.asarray(s), jnp.asarray(o), interpret=True)
    want = written_out(x, weight)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())
    # another tiling (32 outputs a program, 8 programs: 4 splits of K), as the probe's --sweep tries
    got = gm.grouped_matmul(jnp.asarray(x), jnp.asarray(v), jnp.asarray(s), jnp.asarray(o), interpret=True,
                            tuning=(32, 8, 2, 2))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())


def test_the_weights_maxlike_stores_match_xlas_product():
    """Weights as maxlike.weights.quantize stores them (the layout contract with
    graphs.layers.dequantize_grouped), in bf16 as models on a GPU run."""
    from graphs.layers import dequantize_grouped

    rng = np.random.default_rng(2)
    w = rng.standard_normal((512, 128)).astype(np.float32) * 0.05
    x = jnp.asarray(rng.standard_normal((4, 512)), jnp.bfloat16)
    for name in ("int8", "q8_0", "q4_0", "q4_k"):
        enc = quantize.ENCODINGS[name]
        parts = quantize.quantize_host({"w": w}, {"w": 1}, {"w": enc})
        v, s, o = (jnp.asarray(parts[key]) if key in parts else None for key in ("w", "w_scale", "w_offset"))
        if enc.group:
            ref = x.astype(jnp.float32) @ dequantize_grouped(v, s, o, (512,), jnp.float32)
        else:
            ref = (x.astype(jnp.float32) @ v.astype(jnp.float32)) * s
        got = gm.grouped_matmul(x, v, s, o, interpret=True)
        assert got.dtype == jnp.bfloat16
        err = float(jnp.abs(got.astype(jnp.float32) - ref).max())
        assert err <= 1e-2 * float(jnp.abs(ref).max()), (name, err)


def test_supported():
    i8, u8 = np.int8, np.uint8
    assert gm.supported((2048, 512), i8, (512,), 1, jnp.bfloat16)  # int8, per channel
    assert gm.supported((2048, 512), i8, (64, 512), 64, jnp.bfloat16)  # q8_0
    assert gm.supported((1024, 8192), u8, (64, 8192), 8, jnp.float32)  # q4_0 / q4_k
    assert not gm.supported((2048, 512), i8, (512,), 65, jnp.bfloat16)  # prefill: XLA's matmul
    assert gm.supported((2048, 576), i8, (576,), 1, jnp.bfloat16)  # SmolLM2 width: 9 x 64
    assert not gm.supported((2048, 560), i8, (560,), 1, jnp.bfloat16)  # N not a multiple of 64
    assert not gm.supported((2048, 512), i8, (128, 512), 1, jnp.bfloat16)  # groups of 16
    assert not gm.supported((1280, 512), u8, (64, 512), 1, jnp.bfloat16)  # 5 bits a value (q5_k)
    assert not gm.supported((2048, 8, 64), i8, (8, 64), 1, jnp.bfloat16)  # [K, heads, head dim]: flatten first
    assert not gm.supported((2048, 512), i8, (512,), 1, jnp.int8)
    with pytest.raises(ValueError, match="does not take 65 rows"):
        gm.grouped_matmul(jnp.zeros((65, 256)), jnp.zeros((256, 64), jnp.int8), jnp.ones((64,)), interpret=True)


@pytest.mark.parametrize("form", ["int8", "q8_0", "q4_k"])
def test_lowers_for_triton(form):
    """Through Pallas's Triton lowering for a CUDA target on this CPU-only machine (block shapes,
    the loop, the nibble split); compiling it needs a GPU."""
    from jax import export

    v, s, o, _ = case(np.random.default_rng(3), form, 2048, 256)
    args = [jax.ShapeDtypeStruct((8, 2048), jnp.bfloat16)] + [jax.ShapeDtypeStruct(a.shape, a.dtype)
                                                             for a in (v, s, o) if a is not None]
    try:
        exported = export.export(jax.jit(gm.grouped_matmul), platforms=["cuda"],
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            *args)
    except NotImplementedError as e:  # pragma: no cover - a jaxlib without the Triton dialect
        pytest.skip(f"no Triton lowering here: {e}")
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()


@pytest.mark.parametrize("encoding", ["int8", pytest.param("q4_k", marks=pytest.mark.slow)])
def test_a_model_decodes_the_same_with_the_kernel(tiny_models, monkeypatch, encoding):
    """quantized_matmul="pallas" with the GPU kernel (interpreted here): the products it takes (q,
    o, gate, up, down: k and v are 32 wide) go through it, the rest through XLA, and the logits
    equal XLA's for the whole prompt."""
    from conftest import build_model, counted_calls, held, random_prompt
    from maxlike.pipelines import layout
    from maxlike.pipelines.context import TextContext

    calls = counted_calls(monkeypatch, gm, "grouped_matmul")
    monkeypatch.setitem(layout.PALLAS_MATMUL, "cpu", "gpu")
    monkeypatch.setattr(layout, "quantized_head", lambda *args, **kw: None)  # (the head: test_quantized_head.py)
    path = tiny_models["llama"][0]
    prompt = random_prompt(11, seed=4)
    logits = {}
    for matmul in ("xla", "pallas"):
        model = build_model(path, quantization_encoding=encoding, quantized_matmul=matmul, return_logits="all",
                            fuse_projections=False, scan_layers=False)
        assert (model.matmul.kernel, model.matmul.target) == ((matmul, "gpu") if matmul == "pallas" else ("xla", "tpu"))
        ctx = held(model, TextContext("q", prompt, 32))
        logits[matmul] = np.asarray(model.execute(model.prepare_initial_token_inputs([[ctx]])).logits)
    assert len(calls) == 5 * model.config.num_layers
    np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=1e-5 * max(1.0, np.abs(logits["xla"]).max()))


def test_where_the_gpu_kernel_cannot_run_the_model_says_so(tiny_models, caplog):
    """Layers as one loop (stacked weights), float weights or several devices: a warning naming
    the fix, and XLA's product; one quantized device with layers unrolled: the kernel."""
    import types

    from maxlike.pipelines import PipelineConfig, layout

    config = PipelineConfig(model_path=tiny_models["llama"][0], quantized_matmul="pallas")
    encs = {"q": quantize.ENCODINGS["int8"]}
    two_devices = types.SimpleNamespace(size=2)
    for mesh, e, stacked in ((None, encs, True), (None, {}, False), (two_devices, encs, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="maxlike"):
            run, held = layout.quantized_matmul(config, "gpu", mesh, {}, e, stacked=stacked)
        assert (run.kernel, held) == ("xla", {})
        assert "graphs.pallas_gpu_matmul runs on one device" in caplog.text and "scan_layers=False" in caplog.text
    run, held = layout.quantized_matmul(config, "gpu", None, {}, encs, stacked=False)
    assert (run.kernel, run.target, held) == ("pallas", "gpu", {})
