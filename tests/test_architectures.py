"""Architectures beyond the Llama basics against transformers (fp32, eager attention): Qwen3 (q/k
norms, explicit head_dim, sliding and full layers, YaRN), Mistral with its sliding window, Gemma 2
(soft-caps, pre/post norms, GeGLU), Gemma 3 (q/k norms, local and linear-scaled global RoPE), and
the text tower of a multimodal Gemma 3 checkpoint.

Windows are 8 tokens, so prompts and generations run several windows past them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ARCH_KINDS, WINDOW, build_model, held, random_prompt

# The fast suite runs each check on a few architectures; `make test-slow` runs the rest (each LLM
# build costs seconds, and the suite must stay under 15 minutes).
FULL = ("qwen3",)


def _kinds(fast: tuple[str, ...]) -> list:
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in ARCH_KINDS]
from maxlike.pipelines.context import TextContext

PROMPTS = [random_prompt(n, seed=n).tolist() for n in (5, 40, 13)]
NEW = 4 * WINDOW


def _llm(path: str, **kw):
    from maxlike.entrypoints import LLM
    from maxlike.pipelines import PipelineConfig

    kw = {"max_length": 96, "max_batch_size": 4, "dtype": "float32", **kw}
    return LLM(PipelineConfig(model_path=path, **kw), progress=False)


def _greedy(llm, prompts):
    """(tokens, each token's log-prob) per prompt: NEW greedy tokens, EOS masked until then."""
    from maxlike.interfaces import SamplingParams

    params = SamplingParams(top_k=1, max_new_tokens=NEW, min_new_tokens=NEW, logprobs=1)  # as HF min_new_tokens
    outs = llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
    return [(o.token_ids, np.array([lp.token_log_probabilities[0] for lp in o.log_probabilities])) for o in outs]


def prefill_logits(model, prompt: list[int]) -> np.ndarray:
    """Every position's logits from one prefill step of `prompt` (a model built with return_logits="all")."""
    ctx = held(model, TextContext("prefill", np.asarray(prompt, np.int32), max_length=len(prompt) + 1))
    got = np.asarray(model.execute(model.prepare_initial_token_inputs([[ctx]])).logits)[0, -len(prompt):]
    model.kv_manager.release("prefill")
    return got


def assert_prefill_matches(model, hf, prompt: list[int]) -> None:
    """One prefill step of `prompt`: every position's logits within 1e-4 of HF's."""
    got = prefill_logits(model, prompt)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].numpy()
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("name", ARCH_KINDS)
def test_prefill_logits_match_hf(arch_models, name):
    path, hf = arch_models[name]
    model = build_model(path, return_logits="all")
    assert_prefill_matches(model, hf, PROMPTS[1])


@pytest.mark.parametrize("name", _kinds(FULL))
def test_generation_matches_hf_in_every_layout(arch_models, name):
    """32 greedy tokens (4 windows) equal HF's generate; the same tokens and log-probs for each
    prompt alone, and batched again with chunked prefill, 4-token pages and the layers as one loop."""
    path, hf = arch_models[name]
    assert_generation_matches(hf, _llm(path), "chunked, 4-token pages, layers as one loop, fused projections", _llm(
        path, prefill_chunk_size=16, kv_cache_page_size=4, scan_layers=True, fuse_projections=True))


def assert_generation_matches(hf, llm, label: str, other) -> None:
    """NEW greedy tokens of `llm` equal HF's generate for each of PROMPTS, batched; each prompt
    alone, and the batch through `other` (another layout, named `label`), give the same tokens and
    log-probs."""
    batched = _greedy(llm, PROMPTS)
    for prompt, (tokens, _) in zip(PROMPTS, batched):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == ref
    layouts = {"alone": [_greedy(llm, [p])[0] for p in PROMPTS], label: _greedy(other, PROMPTS)}
    for name, got in layouts.items():
        for (tokens, lps), (want_tokens, want_lps) in zip(got, batched):
            assert tokens == want_tokens, name
            np.testing.assert_allclose(lps, want_lps, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name,scan", [("mistral_window", False), ("gemma3", True)])
def test_later_chunks_skip_the_key_blocks_before_their_windows(arch_models, name, scan, monkeypatch):
    """Key blocks of 8 keys, 16-token prefill chunks: a later chunk's sliding-window layers start
    their loop past the blocks no query's window reaches (graphs.attention._attend_blocks; with the
    layers as one loop, Gemma 3's window is an array). The greedy tokens stay HF's."""
    import graphs.attention

    monkeypatch.setattr(graphs.attention, "KEY_BLOCK", 8)
    path, hf = arch_models[name]
    llm = _llm(path, prefill_chunk_size=16, kv_cache_page_size=4, scan_layers=scan, executable_cache=False)
    for prompt, (tokens, _) in zip(PROMPTS, _greedy(llm, PROMPTS)):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == ref


@pytest.mark.parametrize("name", _kinds(()))  # all in `make test-slow` (tests/test_multidevice.py: Llama, Qwen2)
def test_tensor_parallel_equals_one_device(arch_models, name):
    """Tensor parallel 2 on fake devices (with the layers as one loop and q/k/v, gate/up fused)."""
    from test_multidevice import _run_meshes

    report = _run_meshes(arch_models[name][0], [[1, 1], [1, 2, 1, 1]])
    one = report.pop("1x1")
    for label, r in report.items():
        assert r["tokens"] == one["tokens"], label
        assert np.abs(np.asarray(r["logits"]) - np.asarray(one["logits"])).max() < 1e-5, label
        assert r["gathered_weights"] == [], label


def test_bad_configs_are_clear_errors(arch_models, tmp_path):
    """An unknown rope_type names the field; a Gemma 3 multimodal checkpoint without its language
    model (text_config removed, so transformers' defaults stand in) fails on the missing tensors
    before anything is allocated."""
    import json
    import shutil

    from graphs.base import UnsupportedConfigError
    from maxlike.weights.errors import WeightsError

    def edited(name: str, change) -> str:
        folder = tmp_path / name
        shutil.copytree(arch_models[name][0], folder)
        cfg = json.loads((folder / "config.json").read_text())
        change(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
        return str(folder)

    rope = edited("gemma2", lambda c: c.update(rope_parameters={"rope_type": "su-per", "rope_theta": 10000.0}))
    with pytest.raises(UnsupportedConfigError, match=r"rope_type='su-per' \(Gemma2ForCausalLM\) is not built: "
                                                     r"maxlike runs default, linear, dynamic, llama3, yarn, longrope"):
        build_model(rope)
    vision_only = edited("gemma3_mm", lambda c: c.pop("text_config"))
    with pytest.raises(WeightsError, match=r"lacks \d+ tensor\(s\) the model needs.*the checkpoint does not match "
                                           r"its config"):
        build_model(vision_only)


@pytest.mark.parametrize("name", ["mistral_window", pytest.param("phi3", marks=pytest.mark.slow),
                                  pytest.param("qwen3", marks=pytest.mark.slow)])
def test_pages_behind_the_window_are_returned(arch_models, name):
    """When every layer slides, a sequence holds at most window / page + 2 pages once its prompt is
    in, however long it grows; a model with a full-attention layer (Qwen3 here) keeps every page.
    The tokens stay HF's (checked for these prompts above)."""
    path, _ = arch_models[name]
    llm = _llm(path, kv_cache_page_size=4, prefill_chunk_size=16)
    kv = llm.pipeline.model.kv_manager
    held: list[tuple[int, int]] = []  # (tokens written, pages held) at each commit
    commit = kv.commit
    kv.commit = lambda rid, tokens, cache_length: (commit(rid, tokens, cache_length),
                                                   held.append((cache_length, kv.pages_held(rid))))[0]
    [(tokens, _)] = _greedy(llm, [PROMPTS[1]])
    assert len(tokens) == NEW and len(held) >= NEW
    page = 4
    if name == "qwen3":
        assert kv.window is None and all(h == -(-n // page) or h == -(-(n + 1) // page) for n, h in held)
    else:
        assert kv.window == WINDOW
        decode = [h for n, h in held if n >= len(PROMPTS[1])]
        assert max(decode) <= WINDOW // page + 2, held
        assert max(h for _, h in held) <= 16 // page + WINDOW // page + 2, "chunked prefill holds its window too"
    assert kv.free_pages == kv.num_pages - 1  # all returned at the end


# Each as llama.cpp runs it: Qwen3 without a window (as its released models) and without YaRN (a GGUF
# with RoPE scaling goes to transformers' reader), Gemma with query_pre_attn_scalar = head_dim (what
# llama.cpp assumes below 27B).
GGUF_KINDS = {"qwen3": dict(use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
              "gemma2": dict(query_pre_attn_scalar=16), "gemma3": dict(query_pre_attn_scalar=16), "phi3": {}}


@pytest.mark.parametrize("name", [n if n == "gemma2" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in GGUF_KINDS])
def test_gguf_equals_the_model_it_was_written_from(name, tmp_path):
    """A GGUF written with the `gguf` package in llama.cpp's layout (names, metadata, Gemma's
    norms + 1) loads through maxlike's own config conversion and gives HF's logits."""
    from conftest import tiny_arch_model
    from gguf_util import write_arch_gguf

    kw = dict(GGUF_KINDS[name])
    if name == "phi3":  # LongRoPE's factors travel as tensors: the plain-RoPE Phi-3 (mini 4k) here
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    hf = tiny_arch_model(name, seed=3, **kw)
    path = tmp_path / f"{name}.gguf"
    write_arch_gguf(path, name, hf)
    model = build_model(str(path), return_logits="all")
    assert model.config.sliding_window == (None if name == "qwen3" else WINDOW)
    assert_prefill_matches(model, hf, PROMPTS[1])


@pytest.mark.slow  # `make test-slow` (the fast suite must stay under 15 minutes)
def test_partial_rotary_phi_matches_hf(tmp_path):
    """Phi-4-mini's shape of Phi-3: RoPE on the leading half of each head (partial_rotary_factor 0.5)."""
    from conftest import save_tiny, tiny_arch_model

    hf = tiny_arch_model("phi3", seed=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5})
    model = build_model(save_tiny(hf, tmp_path / "phi"), return_logits="all")
    assert model.config.rope.rotary_dim == 8
    assert_prefill_matches(model, hf, PROMPTS[1])
