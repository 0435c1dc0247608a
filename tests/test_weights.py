"""Checkpoint reading: safetensors (single, sharded), GGUF (every supported type), bad files."""

from __future__ import annotations

import gc
import json
import os
import shutil

import gguf
import jax
import numpy as np
import pytest
import torch

from conftest import build_model, held, random_prompt, tiny_hf_model
from ggml_reference import REFERENCE
from gguf_util import write_llama_gguf
from maxlike.weights import WeightsError, read_weights
from maxlike.weights.gguf_file import SUPPORTED
from maxlike.pipelines.context import TextContext


def _plain_llama():
    return tiny_hf_model("llama", seed=5, llama3_rope=False)  # our GGUF writer carries plain RoPE


def _logits(model, prompt):
    ctx = held(model, TextContext("w", prompt, len(prompt) + 1))
    out = model.execute(model.prepare_initial_token_inputs([[ctx]]))
    model.kv_manager.release("w")
    return np.asarray(out.next_token_logits)[0]


def _specs(path):
    m = build_model(path)
    return m, m.arch.weight_specs(m.config), m.arch.checkpoint_names(m.config)


def test_sharded_safetensors_with_index_equal_single_file(tiny_models, tmp_path):
    path, hf = tiny_models["llama"]
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    for f in os.listdir(path):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(path, f), tmp_path)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    prompt = random_prompt(6, seed=2)
    np.testing.assert_array_equal(_logits(build_model(path), prompt), _logits(build_model(str(tmp_path)), prompt))


def test_truncated_safetensors_fails_before_allocating(tiny_models, tmp_path):
    path, _ = tiny_models["llama"]
    shutil.copytree(path, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    before = len(jax.live_arrays())
    with pytest.raises(WeightsError, match="is truncated: tensor .* ends at byte .* Re-download it"):
        build_model(str(tmp_path / "m"))
    assert len(jax.live_arrays()) == before, "nothing was placed on the device"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightsError, match="is corrupt: unreadable header"):
        build_model(str(tmp_path / "m"))


def test_gguf_f32_model_matches_hf(tmp_path):
    hf = _plain_llama()
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    model = build_model(str(path))
    prompt = random_prompt(9, seed=4)
    with torch.no_grad():
        ref = hf(torch.tensor(prompt[None], dtype=torch.long)).logits[0, -1].numpy()
    err = np.abs(_logits(model, prompt) - ref).max()
    print(f"tiny GGUF F32 vs HF: max abs error {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("qtype, tol", [("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 0.02), ("Q4_0", 0.3), ("Q4_1", 0.3)])
def test_gguf_quantized_weights_dequantize(tmp_path, qtype, tol):
    hf = _plain_llama()
    path = tmp_path / f"tiny-{qtype}.gguf"
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    write_llama_gguf(path, hf.config, state, qtype=qtype)
    model, specs, names = _specs(str(path))
    weights = read_weights(str(path), specs, names, np.float32, progress=False)
    for name in specs:
        expected = names[name].convert(state[names[name].hf_name])
        scale = np.abs(expected).max()
        assert np.abs(weights[name] - expected).max() <= tol * scale + 1e-6, name


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_quant_blocks_match_ggml_reference(tmp_path, qtype):
    """Random quantized blocks read by our GGUF reader equal llama.cpp's dequantization.

    The reference (tests/ggml_reference.py) is ggml's block layouts and dequantize_row_*
    written out in numpy, independent of the `gguf` package our reader uses. It follows the
    C code's float32 operation order, so we ask for bit-exact equality.
    """
    values, nbytes, fp16_offsets, dequantize = REFERENCE[qtype]
    kind = gguf.GGMLQuantizationType[qtype]
    assert gguf.GGML_QUANT_SIZES[kind] == (values, nbytes)  # our layout agrees with the file's block size
    rows, cols = 8, 512  # several blocks per row, and rows != cols so a transposed read is caught
    rng = np.random.RandomState(0)
    raw = rng.randint(0, 256, size=(rows, cols // values, nbytes)).astype(np.uint8)
    # Random bits in the fp16 fields may be inf/NaN: write sane values instead, different per
    # field (d vs dmin/m) and per block, so a reader swapping or sharing them is caught.
    for i, off in enumerate(fp16_offsets):
        sane = (rng.uniform(0.002, 0.02, size=raw.shape[:2]) * (-1) ** rng.randint(0, 2, raw.shape[:2]) / (i + 1))
        raw[..., off : off + 2] = sane.astype("<f2")[..., None].view(np.uint8)
    expected = dequantize(raw.reshape(-1, nbytes)).reshape(rows, cols)
    hf = _plain_llama()
    path = tmp_path / f"blocks-{qtype}.gguf"
    write_llama_gguf(path, hf.config, {k: v.numpy() for k, v in hf.state_dict().items()},
                     extra_tensors={"extra.weight": (raw.reshape(rows, -1), kind)})
    from maxlike.weights.gguf_file import open_checked

    got = open_checked(str(path)).read("extra.weight")
    assert got.shape == (rows, cols)  # ggml lists dims fastest-first; we read [rows, cols]
    assert got.dtype == np.float32
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, expected)


def test_gguf_unsupported_quant_type_is_named(tmp_path):
    hf = _plain_llama()
    kind = gguf.GGMLQuantizationType.Q2_K
    raw = np.zeros((2, gguf.GGML_QUANT_SIZES[kind][1]), np.uint8)
    path = tmp_path / "q2k.gguf"
    write_llama_gguf(path, hf.config, {k: v.numpy() for k, v in hf.state_dict().items()},
                     extra_tensors={"extra.weight": (raw, kind)})
    with pytest.raises(WeightsError, match=r"quantized as Q2_K, which maxlike does not read\. Supported types: "
                                           + ", ".join(SUPPORTED)):
        build_model(str(path))


def test_truncated_gguf_fails_before_allocating(tmp_path, smollm2_path):
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(os.path.getsize(smollm2_path) // 2))
    gc.collect()  # earlier tests' models: freed now, not while this one counts
    before = len(jax.live_arrays())
    with pytest.raises(WeightsError, match="GGUF file .* is truncated"):
        build_model(str(path))
    assert len(jax.live_arrays()) == before
    path.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(WeightsError, match="GGUF file .* is truncated or corrupt"):
        build_model(str(path))


def test_checkpoint_missing_tensors_is_named(tiny_models, tmp_path):
    path, hf = tiny_models["llama"]
    shutil.copytree(path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the file holds 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"lacks 9 tensor\(s\) the model needs"):
        build_model(str(tmp_path / "m"))


def test_weight_path_names_the_files(tiny_models, tmp_path):
    path, hf = tiny_models["llama"]
    shutil.copytree(path, tmp_path / "m")
    os.rename(tmp_path / "m" / "model.safetensors", tmp_path / "m" / "renamed.weights")
    prompt = random_prompt(5, seed=9)
    model = build_model(str(tmp_path / "m"), weight_path=("renamed.weights",))
    np.testing.assert_array_equal(_logits(model, prompt), _logits(build_model(path), prompt))
    with pytest.raises(WeightsError, match="weight file '.*/nope.safetensors' .* is missing"):
        build_model(str(tmp_path / "m"), weight_path=("nope.safetensors",))


def test_gguf_config_and_tokenizer_are_cached_in_hf_format(tmp_path, smollm2_path):
    from maxlike.weights import cache_root, load_hf_config, load_tokenizer
    from maxlike.weights.loader import _hf_files

    copy = tmp_path / "model.gguf"
    shutil.copy(smollm2_path, copy)
    first = load_tokenizer(str(copy)).encode("Hello there")
    folders = os.listdir(os.path.join(cache_root(), "gguf-hf"))
    _hf_files.cache_clear()  # a new process would find the cached copy on disk
    assert load_tokenizer(str(copy)).encode("Hello there") == first
    assert load_hf_config(str(copy)).num_hidden_layers == 30
    assert os.listdir(os.path.join(cache_root(), "gguf-hf")) == folders, "the copy was reused"


def test_gguf_without_tokenizer_runs_but_has_no_tokenizer(tmp_path):
    from maxlike.weights import load_tokenizer

    hf = _plain_llama()
    path = tmp_path / "notok.gguf"
    write_llama_gguf(path, hf.config, {k: v.numpy() for k, v in hf.state_dict().items()})
    build_model(str(path))
    with pytest.raises(WeightsError, match="(?s)could not load a tokenizer .* a GGUF file needs tokenizer.ggml"):
        load_tokenizer(str(path))
