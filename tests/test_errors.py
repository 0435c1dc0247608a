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
                                          r"Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, "
                                          r"LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Phi3ForCausalLM, "
                                          r"Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM\."):
        build_model(str(tmp_path))


def test_max_length_above_the_model_limit(tiny_llama):
    with pytest.raises(ConfigError, match=r"max_length \(1000\) exceeds the model's limit "
                                          r"\(max_position_embeddings=256\): pass max_length <= 256"):
        build_model(tiny_llama[0], max_length=1000)


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"seed": -1}, r"seed must be an integer in \[0, 4294967295\]"),
    ({"seed": 2**32}, r"seed must be an integer in \[0, 4294967295\]"),
    ({"logprobs": 10**6}, r"logprobs must be an integer in \[0, 20\]"),
    ({"logprobs": -1}, r"logprobs must be an integer in \[0, 20\]"),
    ({"echo": "yes"}, "echo must be True or False"),
    ({"stop_token_ids": (3, -2)}, r"stop_token_ids must be token ids \(integers >= 0\)"),
    ({"stop_token_ids": "abc"}, r"stop_token_ids must be token ids"),
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


def test_a_chat_template_error_fails_the_request_alone(tiny_llama, tmp_path):
    from maxlike.entrypoints import LLM
    from maxlike.interfaces import TextGenerationRequest
    from maxlike.pipelines import PipelineConfig

    shutil.copytree(tiny_llama[0], tmp_path / "m")
    settings = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    settings["chat_template"] = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must "
                                 "start with a user message') }}{% endif %}{% for m in messages %}{{ m['content'] }}"
                                 "{% endfor %}")
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(settings))
    llm = LLM(PipelineConfig(model_path=str(tmp_path / "m"), max_length=64, max_batch_size=2), progress=False)
    bad = TextGenerationRequest("bad", messages=[{"role": "assistant", "content": "hi"}],
                                sampling_params=SamplingParams(top_k=1, max_new_tokens=3))
    with pytest.raises(RequestError, match="request bad: the model's chat template refused these messages: "
                                           ".*Conversations must start with a user message"):
        llm.scheduler.add(bad)
    assert llm.generate(["hi"], max_new_tokens=3, chat=True, use_tqdm=False)[0] is not None
    with pytest.raises(RequestError, match="message 0 must be a dict with a 'role' string and a 'content' string"):
        TextGenerationRequest("worse", messages=[{"role": "user"}])


def test_a_config_missing_a_field_names_it(tiny_llama):
    from graphs import UnsupportedConfigError
    from graphs.llama import config_from_hf
    from maxlike.weights import load_hf_config
    from maxlike.weights.lean import HFConfigView

    values = load_hf_config(tiny_llama[0]).to_dict()
    del values["rms_norm_eps"]
    with pytest.raises(UnsupportedConfigError, match="the model config has no 'rms_norm_eps', which "
                                                     "LlamaForCausalLM needs"):
        config_from_hf(HFConfigView(values))
    values = load_hf_config(tiny_llama[0]).to_dict()
    del values["max_position_embeddings"]
    from maxlike.pipelines import DecoderPipelineModel, PipelineConfig

    with pytest.raises(ConfigError, match="the model config has no 'max_position_embeddings'"):
        DecoderPipelineModel.calculate_max_seq_len(PipelineConfig(model_path=tiny_llama[0]), HFConfigView(values))


def test_request_fields_are_checked_at_construction():
    from maxlike.interfaces import TextGenerationRequest

    with pytest.raises(RequestError, match="request_id must be a non-empty string"):
        TextGenerationRequest("", prompt="x")
    with pytest.raises(RequestError, match="a prompt is a string or a sequence of token ids"):
        TextGenerationRequest("r", prompt=[1, "two"])
    with pytest.raises(RequestError, match="sampling_params must be a SamplingParams, got dict"):
        TextGenerationRequest("r", prompt="x", sampling_params={"top_k": 1})


def test_out_of_vocabulary_stop_ids_fail_at_admission(tiny_llm):
    with pytest.raises(RequestError, match=r"stop_token_ids \[400\] are outside the vocabulary \[0, 320\)"):
        tiny_llm.generate(["abc"], max_new_tokens=3, sampling_params=SamplingParams(stop_token_ids=(5, 400)))


def test_duplicate_request_ids_in_one_run_are_refused(tiny_llm):
    from maxlike.interfaces import TextGenerationRequest

    reqs = [TextGenerationRequest("same", prompt="a"), TextGenerationRequest("same", prompt="b")]
    with pytest.raises(RequestError, match=r"request ids \['same'\] appear more than once in one run"):
        tiny_llm.scheduler.run(reqs)
    assert not tiny_llm.scheduler.has_work
