"""Bad requests and configs: each fails alone with a message naming the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import build_model
from maxlike.config import ConfigError
from maxlike.interfaces import RequestError, SamplingParams


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"unsupported architecture GPT2LMHeadModel: maxlike supports "
                                          r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        build_model(str(tmp_path))


def test_max_length_above_the_model_limit(tiny_llama):
    with pytest.raises(ConfigError, match=r"max_length \(1000\) exceeds the model's limit "
                                          r"\(max_position_embeddings=256\): pass max_length <= 256"):
        build_model(tiny_llama[0], max_length=1000)


def test_sliding_window_is_not_built_yet(tiny_models, tmp_path):
    path = tiny_models["mistral"][0]
    shutil.copytree(path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["sliding_window"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"sliding-window attention \(window 64\).*pass max_length <= 64"):
        build_model(str(tmp_path / "m"), max_length=128)
    assert build_model(str(tmp_path / "m"), max_length=64).max_length == 64  # full attention is exact there


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_rejected_requests_leave_the_llm_working(tiny_llm):
    before = tiny_llm.generate(["abc"], max_new_tokens=5, use_tqdm=False)
    with pytest.raises(RequestError, match="max_new_tokens must be an integer >= 1, got 0"):
        tiny_llm.generate(["abc"], max_new_tokens=0)
    with pytest.raises(RequestError, match="prompt 1 is empty"):
        tiny_llm.generate(["abc", ""], max_new_tokens=5)
    with pytest.raises(RequestError, match=r"the prompt has 200 tokens but max_length is 128.*shorten the prompt"):
        tiny_llm.generate(["x" * 200], max_new_tokens=5)
    with pytest.raises(RequestError, match=r"prompt \(3 tokens\) \+ max_new_tokens \(200\) exceeds max_length \(128\)"):
        tiny_llm.generate(["abc"], max_new_tokens=200)
    with pytest.raises(RequestError, match=r"token ids \[999\] are outside the vocabulary \[0, 320\)"):
        tiny_llm.generate([[5, 999]], max_new_tokens=2)
    assert tiny_llm.generate(["abc"], max_new_tokens=5, use_tqdm=False) == before
    assert tiny_llm.pipeline.model.kv_manager.free_pages == tiny_llm.pipeline.model.kv_manager.num_pages - 1, "no pages leaked"
