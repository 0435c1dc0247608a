"""Weights kept quantized on the device (quantization_encoding int8, float8_e4m3fn, q8_0, q4_0, q4_k, q5_k, q6_k):
the stored values against the checkpoint's own weights (each encoding's definition written out
here) and the logits against HF run with those values; GGUF blocks kept as the file holds them
(against the gguf package's dequantization); SmolLM2's tokens and perplexity against the float
model (HF's greedy tokens, and the float run's log-probabilities of the same text)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import build_model, held, random_prompt
from maxlike.pipelines.context import TextContext


# encoding -> (scale per group of this many inputs, 0: per output channel; bits per value)
ENCODINGS = {"int8": (0, 8), "float8_e4m3fn": (0, 8), "q8_0": (32, 8), "q4_0": (32, 4), "q4_k": (32, 4),
             "q5_k": (32, 5), "q6_k": (16, 6)}


def _stored_weight(params: dict, name: str, n_in: int, shape: tuple, encoding: str) -> tuple[np.ndarray, np.ndarray]:
    """(the weight the stored values stand for, the bound on |it - source| per value), written out
    from the encodings' definitions (maxlike.weights.quantize's module docstring), not its code."""
    group, bits = ENCODINGS[encoding]
    values, scale = np.asarray(params[name]), np.asarray(params[name + "_scale"]).astype(np.float32)
    out = shape[n_in:]
    if bits == 4:  # byte j of a 32-input group: value j in the low nibble, j + 16 in the high one, plus 8
        b = values.reshape(-1, 16, *out).astype(np.int16)
        values = np.concatenate([b & 15, b >> 4], axis=1) - 8
    elif bits in (5, 6):  # per group, value j + 16 (+ 32)'s low 4 bits in byte j % (group / 2) (the low nibble
        # in the group's first half), the rest at bit (bits - 4) * (j // 4) of byte group / 2 + j % 4
        half, j = group // 2, np.arange(group)
        at = j.reshape(1, group, *[1] * len(out))  # j, broadcast over the outputs
        b = values.reshape(-1, group * bits // 8, *out).astype(np.int16)
        low = np.where(at < half, b[:, j % half] & 15, b[:, j % half] >> 4)
        top = (b[:, half + j % 4] >> ((bits - 4) * (at // 4))) & ((1 << (bits - 4)) - 1)
        values = low + 16 * top - (1 << (bits - 1))
    values = values.astype(np.float32).reshape(shape)
    if not group:
        return values * scale, np.abs(scale) / 2
    g = values.reshape(-1, group, *out) * scale[:, None]
    if name + "_offset" in params:
        g = g + np.asarray(params[name + "_offset"]).astype(np.float32)[:, None]
    bound = np.broadcast_to(np.abs(scale)[:, None] / 2, g.shape)
    return g.reshape(shape), bound.reshape(shape)


def _check_searched(source, got, scale, offset, n_in: int, group: int, bits: int) -> tuple[float, float]:
    """A 4-, 5- or 6-bit weight whose grid was searched (maxlike.weights.quantize.GRIDS): each
    stored value is its source's nearest level under the stored scale (and offset), within the
    range. Returns the squared errors of it and of the reference quantizers' rounding to nearest
    (llama.cpp's Q4_0 and Q6_K: the group's value of largest magnitude maps to -8 (-32); q4_k
    and q5_k: the group's range spans the levels)."""
    out, mid = source.shape[n_in:], 1 << (bits - 1)
    g = source.reshape(-1, group, *out).astype(np.float64)
    s = scale.astype(np.float64)[:, None]
    o = 0.0 if offset is None else np.asarray(offset).astype(np.float64)[:, None]
    nearest = np.clip(np.rint((g - o) / s), -mid, mid - 1) * s + o
    np.testing.assert_allclose(got.reshape(g.shape), nearest, atol=1e-6 * np.abs(g).max())
    if offset is None:
        plain = np.take_along_axis(g, np.abs(g).argmax(axis=1)[:, None], axis=1) / -mid
        plain = np.where(plain == 0, 1, plain)
        rounded = np.clip(np.rint(g / plain), -mid, mid - 1) * plain
    else:
        lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
        plain = np.where(hi > lo, (hi - lo) / (2 * mid - 1), 1)
        rounded = np.clip(np.rint((g - lo) / plain), 0, 2 * mid - 1) * plain + lo
    return float(((nearest - g) ** 2).sum()), float(((rounded - g) ** 2).sum())


def _hf_with(hf, weights: dict[str, np.ndarray]):
    """A copy of HF's model with these HF-named [out, in] weights swapped in."""
    import copy

    import torch

    clone = copy.deepcopy(hf)
    state = clone.state_dict()
    with torch.no_grad():
        for name, w in weights.items():
            state[name].copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return clone


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_quantized_weights_are_the_checkpoint_within_a_step_and_compute_like_hf(tiny_models, encoding):
    """Each projection's stored values stand for HF's weight within the encoding's step (scales as
    each encoding defines them), and the model's logits equal HF's run with those same weights."""
    import torch

    path, hf = tiny_models["llama"]
    model = build_model(path, quantization_encoding=encoding, return_logits="all", fuse_projections=False)
    names = model.arch.checkpoint_names(model.config)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    inputs = {kind: n_in for kind, n_in in model.arch.lora_targets.values()}
    group, bits = ENCODINGS[encoding]
    swapped, searched = {}, {encoding: []}
    for name, arr in model.params.items():
        kind = name.rsplit(".", 1)[-1]
        if kind not in inputs:
            assert arr.dtype == np.float32 or kind.endswith(("_scale", "_offset")), name
            continue
        n_in, hf_name = inputs[kind], names[name].hf_name
        source = names[name].convert(state[hf_name])  # HF's weight in our layout
        got, bound = _stored_weight(model.params, name, n_in, source.shape, encoding)
        amax = np.abs(source).max(axis=tuple(range(n_in)))
        scale = np.asarray(model.params[name + "_scale"]).astype(np.float32)
        if encoding == "int8":
            np.testing.assert_allclose(scale, amax / 127, rtol=1e-6)
        elif encoding == "float8_e4m3fn":  # 3 mantissa bits: within 1/16 of the value, or a subnormal step
            np.testing.assert_allclose(scale, amax / 448, rtol=1e-6)
            bound = np.abs(source) / 16 + scale * 2.0**-9
        elif encoding == "q8_0":  # the group's largest magnitude maps to 127
            g = source.reshape(-1, group, *source.shape[n_in:])
            np.testing.assert_allclose(scale, np.abs(g).max(axis=1) / 127, rtol=1e-3)  # float16 scales
            bound = bound * 1.002  # the float16 scale's rounding (2^-11 of it) times up to 127 steps
        else:
            searched[encoding].append(_check_searched(source, got, scale, model.params.get(name + "_offset"),
                                                      n_in, group, bits))
            bound = np.inf  # (a searched grid may clip a group's extreme: checked as the nearest level above)
        assert np.all(np.abs(got - source) <= bound + 1e-7), name
        swapped[hf_name] = got.reshape(-1, int(np.prod(got.shape[n_in:]))).T  # back to HF's [out, in]
    assert len(swapped) == 7 * hf.config.num_hidden_layers
    if searched[encoding]:  # least squares over a few grids fits better than rounding to nearest (written out below)
        errors = np.asarray(searched[encoding]).sum(axis=0)  # (searched, rounded to nearest) squared errors
        assert errors[0] < 0.95 * errors[1], errors
    prompt = random_prompt(11, seed=1)
    ctx = held(model, TextContext("q", prompt, 32))
    logits = np.asarray(model.execute(model.prepare_initial_token_inputs([[ctx]])).logits)[0, -len(prompt):]
    with torch.no_grad():
        expected = _hf_with(hf, swapped)(torch.tensor(prompt[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=2e-4)
    if encoding in ("int8", "q4_k", "q6_k"):  # the layer loop, with q/k/v and gate/up fused (graphs.fused), holds the
        # same values stacked and fused, and computes the same logits
        scan = build_model(path, quantization_encoding=encoding, return_logits="all", scan_layers=True,
                           fuse_projections=True)
        assert scan.params["layers.qkv"].dtype == model.params["layers.0.q"].dtype
        assert scan.params["layers.qkv_scale"].shape[0] == 2 and "layers.gate_up_scale" in scan.params
        ctx = held(scan, TextContext("q", prompt, 32))
        got = np.asarray(scan.execute(scan.prepare_initial_token_inputs([[ctx]])).logits)[0, -len(prompt):]
        np.testing.assert_allclose(got, logits, atol=1e-5)


def test_groups_that_do_not_divide_the_inputs_are_named(tmp_path):
    """A grouped encoding on a model whose projections' inputs are not whole groups fails before
    any weight is read, naming the weight and the encodings that work."""
    import transformers as tf

    from maxlike.config import ConfigError

    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"quantization_encoding='q4_k' quantizes 32 input values at a time, and "
                                          r"layers.0.q has 48 inputs: use int8 or float8_e4m3fn"):
        build_model(str(tmp_path), quantization_encoding="q4_k")


# (GGUF block type, the encoding that keeps it, how close the kept weights are to the file's own
# dequantization, relative to the largest weight): Q8_0 and Q4_0 exactly (their float16 scales are
# stored as they are; q6_k gives each of Q4_0's scales to two groups of 16); Q4_1's offsets and the
# K-quants' products of two scales round to float16.
KEPT = [("Q8_0", "q8_0", 0.0), ("Q4_0", "q4_0", 0.0), ("Q4_1", "q4_k", 2e-3), ("Q4_K", "q4_k", 2e-3),
        ("Q5_K", "q5_k", 2e-3), ("Q4_K", "q5_k", 2e-3), ("Q6_K", "q6_k", 2e-3), ("Q4_0", "q6_k", 0.0)]


@pytest.mark.parametrize("qtype, encoding, tol", KEPT)
def test_gguf_blocks_are_kept_and_equal_the_file_dequantized(tmp_path, monkeypatch, qtype, encoding, tol):
    """A GGUF's quantized projections stay in their blocks (never read as floats, so never
    requantized): the weights they stand for equal the file read as floats (the gguf package's
    dequantization), within float16 rounding of the scales, and so do the logits."""
    import torch
    import transformers as tf

    from gguf_util import write_llama_gguf
    from maxlike.weights.gguf_file import GGUFTensors

    read_as_float = []
    float_read = GGUFTensors.read
    monkeypatch.setattr(GGUFTensors, "read", lambda self, name: read_as_float.append(name) or float_read(self, name))

    torch.manual_seed(0)  # hidden 256: Q4_K's blocks are 256 values
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256)).eval()
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    write_llama_gguf(path, hf.config, {k: v.numpy() for k, v in hf.state_dict().items()}, qtype=qtype)
    plain = build_model(path, return_logits="all", fuse_projections=False)  # dequantized to float32 on read
    read_as_float.clear()
    kept = build_model(path, quantization_encoding=encoding, return_logits="all", fuse_projections=False)
    assert sorted(read_as_float) == sorted(["output.weight", "output_norm.weight", "token_embd.weight"] + [
        f"blk.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "ffn")])
    inputs = {kind: n_in for kind, n_in in kept.arch.lora_targets.values()}
    checked = 0
    for name, ref in plain.params.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in inputs:
            ref = np.asarray(ref)
            got, _ = _stored_weight(kept.params, name, inputs[kind], ref.shape, encoding)
            assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), name
            checked += 1
    assert checked == 7 * 2
    prompt = random_prompt(11, seed=1)
    logits = []
    for m in (plain, kept):
        ctx = held(m, TextContext("q", prompt, 32))
        logits.append(np.asarray(m.execute(m.prepare_initial_token_inputs([[ctx]])).logits)[0, -len(prompt):])
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4 + 20 * tol * np.abs(logits[0]).max())


def test_a_mixed_gguf_keeps_each_kinds_blocks(tmp_path, monkeypatch):
    """A file mixing block types as llama.cpp's Q4_K_M does (Q6_K for some layers' attn_v and every
    ffn_down, Q4_K elsewhere), quantization_encoding unset on an accelerator: each projection kind
    runs in the most precise encoding among its layers' blocks. down keeps its Q6_K blocks as q6_k;
    v is q6_k too, its Q4_K layer requantized; q/k/o/gate/up keep Q4_K as q4_k. q/k/v then differ
    and stay apart, gate/up fuse. Weights and logits against the file read as floats."""
    import torch
    import transformers as tf

    from gguf_util import write_llama_gguf
    from maxlike.pipelines import PipelineConfig
    from maxlike.pipelines.decoder import DecoderPipelineModel
    from maxlike.weights import quantize
    from maxlike.weights.gguf_file import GGUFTensors

    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256)).eval()
    path = str(tmp_path / "tiny-Q4_K_M.gguf")
    qtypes = {"blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K", "blk.1.ffn_down.weight": "Q6_K"}
    write_llama_gguf(path, hf.config, {k: v.numpy() for k, v in hf.state_dict().items()}, qtype="Q4_K",
                     qtypes=qtypes)
    plain = build_model(path, return_logits="all", quantization_encoding="float32", fuse_projections=False)
    read_as_float = []
    float_read = GGUFTensors.read
    monkeypatch.setattr(GGUFTensors, "read", lambda self, name: read_as_float.append(name) or float_read(self, name))
    monkeypatch.setitem(quantize.KEEP_GGUF_BLOCKS, "cpu", True)  # this CPU as an accelerator
    mixed = build_model(path, return_logits="all", fuse_projections=True)
    assert mixed.encoding == "q4_k (gate, k, o, q, up), q6_k (down, v)"
    assert [n for n in read_as_float if n.startswith("blk.") and not n.endswith("norm.weight")] == [
        "blk.1.attn_v.weight"]
    assert "layers.0.gate_up" in mixed.params and "layers.0.qkv" not in mixed.params
    assert mixed.params["layers.1.v"].shape[0] == 256 * 3 // 4  # 6 bits per input
    assert mixed.params["layers.1.down"].shape[0] == 512 * 3 // 4
    # sized (memory planning) as the per-kind encodings store it
    assert DecoderPipelineModel.estimate_weights_size(PipelineConfig(model_path=path, dtype="float32")) == sum(
        a.nbytes for a in mixed.params.values())
    for name, ref in plain.params.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in ("q", "k", "v", "o", "down"):
            ref = np.asarray(ref)
            encoding = "q6_k" if kind in ("v", "down") else "q4_k"
            got, bound = _stored_weight(mixed.params, name, 2 if kind == "o" else 1, ref.shape, encoding)
            if name == "layers.1.v":  # quantized again from the file's Q4_K values: within a q6_k step
                assert np.all(np.abs(got - ref) <= 2.02 * bound + 1e-7), name
            else:
                assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max(), name
    prompt = random_prompt(11, seed=1)
    logits = []
    for m in (plain, mixed):
        ctx = held(m, TextContext("q", prompt, 32))
        logits.append(np.asarray(m.execute(m.prepare_initial_token_inputs([[ctx]])).logits)[0, -len(prompt):])
    # (measured: 0.015 of a largest logit of 1.12, most of it from layer 1's v quantized again)
    np.testing.assert_allclose(logits[1], logits[0], atol=0.02 * np.abs(logits[0]).max())


# encoding -> how far its perplexity may be from the float model's (the bounds: 8-bit 1%, 4-bit 5%).
# SmolLM2's file is Q4_1: q4_k and q5_k keep its blocks; q4_0 quantizes those 4-bit values again onto a symmetric
# grid, which measured 1.57x the float perplexity (1.66x rounding to nearest), so q4_0's ratio is printed, not
# bounded. q6_k quantizes them again onto a 6-bit grid: measured 1.0170 (1.0136 rounding to nearest; the grid
# search lowers the weights' squared error, and this text cannot tell the two apart), bounded at 2% (between the 8
# and 4 bits' bounds).
PERPLEXITY_BOUND = {"int8": 0.01, "float8_e4m3fn": 0.01, "q8_0": 0.01, "q4_k": 0.05, "q5_k": 0.05, "q6_k": 0.02,
                    "int8+head": 0.01}
PRINTED_ONLY = ("q4_0",)
# label -> PipelineConfig fields ("int8+head": int8 projections, the q8_0 LM head the Pallas matmul reads and the
# embedding table in q8_0 by rows)
SMOLLM2_RUNS = {None: {}, **{e: dict(quantization_encoding=e) for e in (*PERPLEXITY_BOUND, *PRINTED_ONLY)},
                "int8+head": dict(quantization_encoding="int8", quantized_matmul="pallas")}


def test_a_gguf_keeps_its_blocks_by_default_on_accelerators_only(tmp_path, caplog):
    """quantization_encoding unset: a Q8_0 GGUF runs as q8_0 on GPU and TPU (its weights sized so),
    as float on CPU; an explicit choice wins; safetensors stay float."""
    import transformers as tf

    from gguf_util import write_llama_gguf
    from maxlike.pipelines import PipelineConfig
    from maxlike.pipelines.decoder import DecoderPipelineModel
    from maxlike.weights.loader import resolve_encoding

    hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()
    path = str(tmp_path / "tiny-Q8_0.gguf")
    write_llama_gguf(path, hf.config, {k: v.numpy() for k, v in hf.state_dict().items()}, qtype="Q8_0")
    model = PipelineConfig(model_path=path).model
    assert [resolve_encoding(model, p) for p in ("gpu", "tpu", "cpu")] == ["q8_0", "q8_0", None]
    # on GPU, where XLA decodes kept blocks slower than bfloat16 (measured), a warning names both ways out
    from graphs import ARCHITECTURES
    from maxlike.pipelines import layout
    from maxlike.weights import quantize

    arch = next(a for a in ARCHITECTURES if a.name == "LlamaForCausalLM")
    cfg = arch.config_from_hf(hf.config)
    for platform in ("tpu", "gpu"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="maxlike"):
            encs, _, _ = layout.quantization(PipelineConfig(model_path=path), platform, arch, arch.weight_specs(cfg),
                                             cfg)
        assert quantize.describe(encs) == "q8_0"
        warned = "quantization_encoding='bfloat16'" in caplog.text and "quantized_matmul='pallas'" in caplog.text
        assert warned == (platform == "gpu"), caplog.text
    assert resolve_encoding(PipelineConfig(model_path=path, quantization_encoding="int8").model, "gpu") == "int8"
    hf.save_pretrained(tmp_path / "st")
    assert resolve_encoding(PipelineConfig(model_path=str(tmp_path / "st")).model, "gpu") is None
    # Q6_K blocks (256 values: a 256-wide model) run as q6_k; a file mixing types runs in the one most of its
    # projection weights are in (here, as llama.cpp's Q4_K_M, Q6_K for attn_v and ffn_down, Q4_K for the rest)
    wide = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512,
                                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    state = {k: v.numpy() for k, v in wide.state_dict().items()}
    mixed = {"blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K"}
    for name, qtype, qtypes, expected in (("q6", "Q6_K", None, "q6_k"), ("q5", "Q5_K", mixed, "q5_k"),
                                          ("km", "Q4_K", mixed, "q4_k")):
        write_llama_gguf(str(tmp_path / f"{name}.gguf"), wide.config, state, qtype=qtype, qtypes=qtypes)
        assert resolve_encoding(PipelineConfig(model_path=str(tmp_path / f"{name}.gguf")).model, "tpu") == expected
    # sized for the TPU it compiles for: 1 byte per projection weight and a float16 scale per 32, against 4 on CPU
    on_cpu = DecoderPipelineModel.estimate_weights_size(PipelineConfig(model_path=path, dtype="float32"))
    on_tpu = DecoderPipelineModel.estimate_weights_size(PipelineConfig(
        model_path=path, dtype="float32", compile_only=True, compile_target="tpu:v5e:2x2"))
    projections = sum(p.numel() for n, p in hf.named_parameters() if n.endswith("proj.weight"))
    assert on_cpu - on_tpu == 4 * projections - (projections + 2 * projections // 32)


@pytest.mark.xdist_group("hf_smollm2")
@pytest.mark.slow  # about 6 minutes (nine SmolLM2 pipelines, echo over every prompt): `make test-slow`
def test_quantized_smollm2_keeps_the_tokens_and_the_perplexity(smollm2_path, hf_smollm2):
    """int8's greedy tokens equal HF's float ones for the chat prompts, with the LM head float or
    q8_0 (test_quantized_head.py; SmolLM2's file holds its table in Q8_0, which the q8_0 head
    keeps exactly); over every prompt and HF's continuations, each encoding's perplexity is within
    its bound of the float model's."""
    import torch

    from maxlike.entrypoints import LLM
    from maxlike.interfaces import SamplingParams
    from maxlike.pipelines import PipelineConfig
    from test_smollm2 import PROMPTS

    tok, hf = hf_smollm2
    texts = []
    for prompt, chat in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"] if chat else tok.encode(prompt)
        with torch.no_grad():
            texts.append((list(ids), hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0].tolist()))
    nll = {}
    for encoding, fields in SMOLLM2_RUNS.items():
        llm = LLM(PipelineConfig(model_path=smollm2_path, max_length=256, max_batch_size=8, enable_echo=True,
                                 **fields), progress=False)
        params = llm.pipeline.model.params
        assert ("head" in params) == ("embed_scale" in params) == (encoding == "int8+head")  # both tables q8_0
        if encoding in ("int8", "int8+head"):
            outs = llm.generate_outputs([p for p, _ in texts], sampling_params=SamplingParams(
                top_k=1, max_new_tokens=32), use_tqdm=False)
            for (prompt, full), out, (_, chat) in zip(texts, outs, PROMPTS):
                if chat:  # the README's kind of prompt (`make run` asks the first); "The quick brown fox"
                    # continued differently from its third token on in the run written down in the README
                    assert out.token_ids == full[len(prompt):], "int8 greedy tokens differ from the float ones"
        echoed = llm.generate_outputs([full for _, full in texts], sampling_params=SamplingParams(
            top_k=1, max_new_tokens=1, logprobs=1, echo=True), use_tqdm=False)
        nll[encoding] = -np.mean([lp for (prompt, full), out in zip(texts, echoed) for lp in
                                  [v for step in out.log_probabilities for v in step.token_log_probabilities]
                                  [len(prompt) - 1: len(full) - 1]])  # the continuation's tokens
        del llm
    ratios = {encoding: float(np.exp(nll[encoding] - nll[None])) for encoding in (*PERPLEXITY_BOUND, *PRINTED_ONLY)}
    print(f"perplexity float {np.exp(nll[None]):.4f}; ratio to it: " + ", ".join(
        f"{encoding} {np.exp(nll[encoding]):.4f} ({ratio:.4f})" for encoding, ratio in ratios.items()))
    assert all(abs(ratios[e] - 1) < bound for e, bound in PERPLEXITY_BOUND.items()), ratios


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
def test_products_per_output_channel_equal_the_formula(backend):
    """graphs.layers.projection's float and per-output-channel products, x @ (values x scale),
    against numpy in float64 for every projection shape of the graphs (q [D, heads, head dim], the
    fused qkv and gate_up, o over two input axes). On "tpu" a weight of several output axes is
    multiplied as one [D, out] matrix behind an optimization barrier (XLA:TPU otherwise copies the
    stack before a decode loop: test_tpu_target); the values must be the same."""
    import jax
    import jax.numpy as jnp

    from graphs.layers import projection

    rng = np.random.default_rng(0)
    cases = [("btd,dhk->bthk", (2, 3, 16), (16, 4, 8), (4, 8), 1),
             ("btd,dkgh->btkgh", (2, 3, 16), (16, 2, 3, 8), None, 1),
             ("btd,dcf->btcf", (2, 1, 16), (16, 2, 24), (2, 24), 1),
             ("bthk,hkd->btd", (2, 3, 4, 8), (4, 8, 16), (16,), 2),
             ("btf,fd->btd", (2, 3, 24), (24, 16), None, 1)]
    proj = projection(None, "xla", backend)
    for eq, x_shape, w_shape, scale_shape, n_in in cases:
        x = rng.standard_normal(x_shape).astype(np.float32)
        if scale_shape is None:
            lw = {"w": rng.standard_normal(w_shape).astype(np.float32)}
            weight = lw["w"].astype(np.float64)
        else:
            values = rng.integers(-127, 128, w_shape).astype(np.int8)
            scale = rng.uniform(0.001, 0.02, scale_shape).astype(np.float32)
            lw, weight = {"w": values, "w_scale": scale}, values.astype(np.float64) * scale
        got = np.asarray(jax.jit(lambda x, lw: proj(eq, x, lw, "w", n_in))(jnp.asarray(x), lw))
        want = np.einsum(eq, x.astype(np.float64), weight)
        assert got.shape == want.shape, eq
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), eq
        barrier = "optimization_barrier" in str(jax.make_jaxpr(lambda x, lw: proj(eq, x, lw, "w", n_in))(x, lw))
        assert barrier == (backend == "tpu" and len(w_shape) - n_in > 1), eq
