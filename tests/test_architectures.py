"""Architectures beyond the Llama basics against transformers (fp32, eager attention): Qwen3 (q/k
norms, explicit head_dim, sliding and full layers, YaRN), Mistral with its sliding window.

Windows are 8 tokens, so prompts and generations run several windows past them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ARCH_KINDS, WINDOW, build_model, held, random_prompt
from maxlike.pipelines.context import TextContext

PROMPTS = [random_prompt(n, seed=n).tolist() for n in (5, 40, 13)]
NEW = 4 * WINDOW


def _llm(path: str, **kw):
    from maxlike.entrypoints import LLM
    from maxlike.pipelines import PipelineConfig

    kw = {"max_length": 96, "max_batch_size": 4, "dtype": "float32", **kw}
    return LLM(PipelineConfig(model_path=path, **kw), progress=False)


def _greedy(llm, prompts):
    """(tokens, each token's log-prob) per prompt: NEW greedy tokens, EOS ignored."""
    from maxlike.interfaces import SamplingParams

    params = SamplingParams(top_k=1, max_new_tokens=NEW, ignore_eos=True, logprobs=1)
    outs = llm.generate_outputs(prompts, sampling_params=params, use_tqdm=False)
    return [(o.token_ids, np.array([lp.token_log_probabilities[0] for lp in o.log_probabilities])) for o in outs]


@pytest.mark.parametrize("name", ARCH_KINDS)
def test_prefill_logits_match_hf(arch_models, name):
    path, hf = arch_models[name]
    model = build_model(path, return_logits="all")
    prompt = PROMPTS[1]
    ctx = held(model, TextContext("r", np.asarray(prompt, np.int32), max_length=len(prompt) + 1))
    got = np.asarray(model.execute(model.prepare_initial_token_inputs([[ctx]])).logits)[0, -len(prompt):]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].numpy()
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("name", ARCH_KINDS)
def test_generation_matches_hf_in_every_layout(arch_models, name):
    """32 greedy tokens (4 windows) equal HF's generate; the same tokens and log-probs alone and
    batched, with chunked prefill and 4-token pages, and with the layers as one loop."""
    path, hf = arch_models[name]
    batched = _greedy(_llm(path), PROMPTS)
    for prompt, (tokens, _) in zip(PROMPTS, batched):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == ref
    layouts = {"alone": None, "chunked, 4-token pages": dict(prefill_chunk_size=16, kv_cache_page_size=4),
               "layers as one loop": dict(scan_layers=True)}
    for label, kw in layouts.items():
        llm = _llm(path, **(kw or {}))
        got = [_greedy(llm, [p])[0] for p in PROMPTS] if kw is None else _greedy(llm, PROMPTS)
        for (tokens, lps), (want_tokens, want_lps) in zip(got, batched):
            assert tokens == want_tokens, label
            np.testing.assert_allclose(lps, want_lps, atol=1e-5, err_msg=label)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "mistral_window" else n
                                  for n in ARCH_KINDS])  # the slow ones (about 20 s each): `make test-slow`
def test_tensor_parallel_equals_one_device(arch_models, name):
    """Tensor parallel 2 on fake devices, unrolled and with the layers as one loop."""
    from test_multidevice import _run_meshes

    report = _run_meshes(arch_models[name][0], [[1, 1], [1, 2], [1, 2, 1]])
    one = report.pop("1x1")
    for label, r in report.items():
        assert r["tokens"] == one["tokens"], label
        assert np.abs(np.asarray(r["logits"]) - np.asarray(one["logits"])).max() < 1e-5, label
        assert r["gathered_weights"] == [], label
