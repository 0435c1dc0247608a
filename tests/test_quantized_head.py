"""The LM head kept quantized (q8_0, [D, V]) where a Pallas matmul runs it, and the embedding table
then in q8_0 by rows ([V, D / 4] int32 words): the tables' q8_0 written out here (llama.cpp's Q8_0
rule), the logits as the final hidden states times that table, the embedding rows as the table's
rows dequantized, and the places both stay float."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import build_model, counted_calls, held, random_prompt, save_tiny, tiny_hf_model
from maxlike.pipelines.context import TextContext


def q8_0(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A [V, D] table's head [D, V] as llama.cpp's Q8_0 stores it: per 32 consecutive inputs of an
    output, a float16 scale of the largest magnitude / 127 and int8 values rounded to nearest."""
    w = np.asarray(table, np.float32).T  # [D, V]
    groups = w.reshape(w.shape[0] // 32, 32, w.shape[1])
    scale = (np.abs(groups).max(axis=1) / 127).astype(np.float16)
    scale = np.where(scale == 0, np.float16(1), scale)
    values = np.clip(np.rint(groups / scale[:, None].astype(np.float32)), -127, 127).astype(np.int8)
    return values.reshape(w.shape), scale


def dequantized(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[D, V] from q8_0 values and float16 scales (or their uint16 bit patterns)."""
    scale = scale.view(np.float16) if scale.dtype == np.uint16 else scale
    return (values.reshape(scale.shape[0], -1, values.shape[1]) * scale[:, None].astype(np.float32)).reshape(
        values.shape)


def packed_rows(values: np.ndarray) -> np.ndarray:
    """Int8 rows [V, D] as four to an int32 word, written out: byte i of word j (bits 8i..8i+7) is
    value 4j + i, two's complement."""
    b = values.astype(np.int64).reshape(values.shape[0], -1, 4) & 0xFF
    words = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24
    return np.where(words >= 2**31, words - 2**32, words).astype(np.int32)


def check_rows(model, table: np.ndarray) -> None:
    """The model's embedding table is the q8_0 of `table` [V, D] by rows, packed."""
    values, scale = q8_0(table)  # [D, V], [D / 32, V]: the same groups as rows
    np.testing.assert_array_equal(np.asarray(model.params["embed"]), packed_rows(values.T))
    np.testing.assert_array_equal(np.asarray(model.params["embed_scale"]), scale.T)


def test_embedding_rows_unpack_and_dequantize_a_q8_0_table():
    """graphs.layers.embed_rows on a q8_0 table by rows: each token's row is its 32-value groups'
    int8 values times their scale, against numpy on a random table."""
    import jax.numpy as jnp

    from graphs.layers import embed_rows

    table = np.random.default_rng(0).normal(size=(50, 96)).astype(np.float32)
    values, scale = q8_0(table)
    tokens = np.array([[3, 0, 49], [7, 7, 12]], np.int32)
    rows = embed_rows({"embed": jnp.asarray(packed_rows(values.T)), "embed_scale": jnp.asarray(scale.T)},
                      jnp.asarray(tokens), jnp.float32)
    expected = dequantized(values, scale).T[tokens]  # [2, 3, 96]
    np.testing.assert_allclose(np.asarray(rows), expected, rtol=1e-6)
    assert np.abs(expected - table[tokens]).max() <= np.abs(table).max() / 127  # q8_0's step, no more


def _run(model, prompts):
    """Each prompt's next-token logits [B, V] and the final hidden states they come from [B, D]."""
    ctxs = [held(model, TextContext(f"q{i}", p, 32)) for i, p in enumerate(prompts)]
    out = model.execute(model.prepare_initial_token_inputs([ctxs]))
    return np.asarray(out.next_token_logits), np.asarray(out.hidden_states)


@pytest.fixture(scope="module")
def tiny_head_models(tmp_path_factory):
    """tie -> (path, HF model): Llama with a tied and an untied table (vocabulary 320)."""
    return {tie: (save_tiny(m := tiny_hf_model("llama", tie=tie), tmp_path_factory.mktemp(f"tie{tie}")), m)
            for tie in (True, False)}


@pytest.mark.parametrize("tie", [True, False])
def test_the_gpu_kernel_runs_a_q8_0_head(tiny_head_models, monkeypatch, tie):
    """int8 projections with quantized_matmul="pallas" and the GPU kernel (interpreted): the
    head is held as the table's q8_0 [D, V] (the untied lm_head replaced), the embedding table in
    q8_0 by rows, the kernel runs the head once per layer's five products plus one, the logits are
    the final hidden states times the dequantized table, and greedy tokens equal the float head's."""
    import graphs.pallas_gpu_matmul as gm
    from maxlike.pipelines import layout

    monkeypatch.setitem(layout.PALLAS_MATMUL, "cpu", "gpu")
    calls = counted_calls(monkeypatch, gm, "grouped_matmul")
    path, hf = tiny_head_models[tie]
    table = (hf.model.embed_tokens.weight if tie else hf.lm_head.weight).detach().numpy()
    values, scale = q8_0(table)
    prompts = [random_prompt(n, seed=n) for n in (11, 5, 8, 3)]
    kw = dict(quantization_encoding="int8", return_hidden_states="last", fuse_projections=False, scan_layers=False)
    model = build_model(path, quantized_matmul="pallas", **kw)
    np.testing.assert_array_equal(np.asarray(model.params["head"]), values)
    np.testing.assert_array_equal(np.asarray(model.params["head_scale"]), scale)
    assert "lm_head" not in model.params
    check_rows(model, hf.model.embed_tokens.weight.detach().numpy())  # its own numbers, tied or not
    assert model.encoding == "int8 (down, gate, k, o, q, up, v), q8_0 (embed, head)"
    logits, hidden = _run(model, prompts)
    assert len(calls) == 5 * model.config.num_layers + 1 and calls[-1] == (64, 320)
    np.testing.assert_allclose(logits, hidden @ dequantized(values, scale), atol=1e-5 * np.abs(logits).max())
    float_head, _ = _run(build_model(path, quantized_matmul="xla", **kw), prompts)
    assert (logits.argmax(-1) == float_head.argmax(-1)).all()
    assert np.abs(logits - float_head).max() < 0.02 * np.abs(float_head).max()  # q8_0's rounding, no more


@pytest.mark.parametrize("scan", [False, True])
def test_the_tpu_kernel_runs_a_q8_0_head(tiny_head_models, monkeypatch, scan):
    """The TPU kernel (interpreted) takes the head with layers unrolled or as one loop (the head is
    no layer's): its scale held as float16 bit patterns, the logits the hidden states times the
    dequantized table. int8 projections stay XLA's (per channel)."""
    import graphs.pallas_tpu_matmul as kernel

    calls = counted_calls(monkeypatch, kernel, "grouped_matmul")
    path, hf = tiny_head_models[True]
    values, scale = q8_0(hf.model.embed_tokens.weight.detach().numpy())
    model = build_model(path, quantization_encoding="int8", quantized_matmul="pallas", return_hidden_states="last",
                        fuse_projections=False, scan_layers=scan)
    assert model.matmul.kernel == "pallas" and str(model.params["head_scale"].dtype) == "uint16"
    np.testing.assert_array_equal(np.asarray(model.params["head"]), values)
    np.testing.assert_array_equal(np.asarray(model.params["head_scale"]).view(np.float16), scale)
    check_rows(model, hf.model.embed_tokens.weight.detach().numpy())
    logits, hidden = _run(model, [random_prompt(n, seed=n) for n in (11, 6)])
    assert calls == [(64, 320)]
    np.testing.assert_allclose(logits, hidden @ dequantized(values, scale), atol=1e-5 * np.abs(logits).max())


def test_the_head_stays_float_where_no_kernel_runs_it(tiny_head_models):
    """XLA's products (the default) or a float model: the table stays float, as the checkpoint has
    it. Nor is the head quantized where the kernel would not take it: a hidden size of 48 (not in
    groups of 32), a vocabulary of 4,160 for the TPU kernel (over 4,096 and no multiple of 128:
    Phi-3's 32,064 is another), several devices for the GPU one, an architecture whose graphs do
    not read the table through graphs.layers."""
    import dataclasses
    import types

    from graphs.base import WeightSpec
    from graphs import ARCHITECTURES
    from maxlike.pipelines import PipelineConfig, layout
    from maxlike.weights import quantize

    path = tiny_head_models[True][0]
    for kw in (dict(quantization_encoding="int8"), dict(quantized_matmul="pallas")):
        model = build_model(path, **kw)
        assert "head" not in model.params and str(model.params["embed"].dtype) == "float32", kw
    config = PipelineConfig(model_path=path, quantized_matmul="pallas")
    arch = next(a for a in ARCHITECTURES if a.name == "LlamaForCausalLM")
    encs = {"q": quantize.ENCODINGS["int8"]}

    def table(platform, vocab=320, d=64, mesh=None, arch=arch, tie=True):
        specs = {("embed" if tie else "lm_head"): WeightSpec((vocab, d), ("vocab", "embed"))}
        return layout.quantized_head(config, platform, mesh, arch, specs, encs, np.float32, stacked=False)

    assert table("tpu") == table("gpu") == "embed" and table("tpu", tie=False) == "lm_head"
    assert table("tpu", d=48) is table("gpu", d=48) is None
    assert table("tpu", vocab=4160) is None and table("gpu", vocab=4160) == "embed"
    assert table("gpu", mesh=types.SimpleNamespace(size=2)) is None
    assert table("tpu", arch=dataclasses.replace(arch, quantized_head=False)) is None


def test_weights_are_sized_with_the_quantized_head(tiny_head_models, monkeypatch):
    """estimate_weights_size and the roofline's bytes a step reads follow the head: the bytes the
    model holds (a float32 table of V x D becomes the head and the embedding table in q8_0, each V x D
    int8 and V x D / 32 float16 scales); the head read whole, the embedding table a row per token."""
    from maxlike.entrypoints import roofline
    from maxlike.pipelines import PipelineConfig, layout
    from maxlike.pipelines.decoder import DecoderPipelineModel

    monkeypatch.setitem(layout.PALLAS_MATMUL, "cpu", "gpu")
    path = tiny_head_models[True][0]
    sizes = {}
    for matmul in ("xla", "pallas"):
        config = PipelineConfig(model_path=path, dtype="float32", quantization_encoding="int8", quantized_matmul=matmul)
        sizes[matmul] = DecoderPipelineModel.estimate_weights_size(config)
        model = build_model(path, quantization_encoding="int8", quantized_matmul=matmul)
        assert sizes[matmul] == sum(a.nbytes for a in model.params.values())
    v, d = 320, 64
    q8_0_table = v * d + 2 * v * d // 32  # int8 values, a float16 scale per 32
    assert sizes["pallas"] - sizes["xla"] == 2 * q8_0_table - 4 * v * d  # tied: both tables from one
    for tie in (True, False):
        model = build_model(tiny_head_models[tie][0], quantization_encoding="int8", quantized_matmul="pallas")
        held = sum(a.nbytes for a in model.params.values())
        assert DecoderPipelineModel.estimate_weights_size(model.pipeline_config) == held
        # the q8_0 head is read whole, the q8_0 embedding table a row per token
        assert roofline.weight_bytes(model, 2) == held - q8_0_table + 2 * (d + 2 * d // 32)


def test_a_gguf_q8_0_table_is_kept_exactly(tmp_path, monkeypatch):
    """A Q8_0 GGUF whose tied token_embd is Q8_0: the quantized head holds the file's own blocks
    (read as floats, quantized again to the same values and scales), transposed to [D, V], and the
    embedding table the same blocks as rows."""
    import gguf

    from gguf_util import write_llama_gguf
    from maxlike.pipelines import layout

    monkeypatch.setitem(layout.PALLAS_MATMUL, "cpu", "gpu")
    hf = tiny_hf_model("llama", tie=True)
    path = str(tmp_path / "tiny-Q8_0.gguf")
    write_llama_gguf(path, hf.config, {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"},
                     qtype="Q8_0")
    raw = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert raw.tensor_type == gguf.GGMLQuantizationType.Q8_0
    blocks = np.asarray(raw.data).reshape(-1, 34)  # per block of 32: a float16 scale, then 32 int8 values
    file_scale = blocks[:, :2].copy().view(np.float16).reshape(320, 2).T  # [D / 32, V]
    file_values = blocks[:, 2:].copy().view(np.int8).reshape(320, 64).T  # [D, V]
    model = build_model(path, quantization_encoding="q8_0", quantized_matmul="pallas")
    np.testing.assert_array_equal(np.asarray(model.params["head"]), file_values)
    zero = file_scale == 0  # the padding token's row: a scale of 1 over zeros here, 0 in the file
    assert zero.sum() == 2 and (file_values.reshape(2, 32, 320)[zero.nonzero()[0], :, zero.nonzero()[1]] == 0).all()
    np.testing.assert_array_equal(np.where(zero, 0, np.asarray(model.params["head_scale"])), file_scale)
    np.testing.assert_array_equal(np.asarray(model.params["embed"]), packed_rows(file_values.T))
    np.testing.assert_array_equal(np.where(zero.T, 0, np.asarray(model.params["embed_scale"])), file_scale.T)


def test_gemma2_soft_caps_the_q8_0_heads_logits(arch_models, monkeypatch):
    """Gemma 2 (tied table, final soft-cap 3.0) with the q8_0 head: the logits are
    3 tanh(hidden @ dequantized table / 3), and greedy tokens equal the float head's."""
    from maxlike.pipelines import layout

    monkeypatch.setitem(layout.PALLAS_MATMUL, "cpu", "gpu")
    path, hf = arch_models["gemma2"]
    values, scale = q8_0(hf.model.embed_tokens.weight.detach().numpy())
    prompts = [random_prompt(n, seed=n) for n in (9, 4)]
    kw = dict(quantization_encoding="int8", return_hidden_states="last", fuse_projections=False, scan_layers=False)
    model = build_model(path, quantized_matmul="pallas", **kw)
    assert "head" in model.params
    check_rows(model, hf.model.embed_tokens.weight.detach().numpy())
    logits, hidden = _run(model, prompts)
    np.testing.assert_allclose(logits, 3.0 * np.tanh(hidden @ dequantized(values, scale) / 3.0), atol=1e-5)
    float_head, _ = _run(build_model(path, quantized_matmul="xla", **kw), prompts)
    assert (logits.argmax(-1) == float_head.argmax(-1)).all()
