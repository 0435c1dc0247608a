"""Warm loads read config and tokenizer without transformers, with transformers' results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from maxlike.weights.lean import HFConfigView, LeanTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello. How can I help?"}, {"role": "user", "content": "Count: 1, 2, 3 ..."}],
]
TEXTS = ["Hello there", "  leading spaces, trailing ", "naïve café – ünïcödé ✓ 你好", "don't stop . , ! ?", "a\nb\tc"]


def _hf_folder(model_path: str) -> str:
    """The HF-format folder maxlike reads (the cached conversion, for a GGUF)."""
    from maxlike.weights.loader import _gguf_as_hf_dir, _identity

    return _gguf_as_hf_dir(*_identity(model_path)) if model_path.endswith(".gguf") else model_path


@pytest.mark.parametrize("which", ["smollm2", "tiny"])
def test_lean_tokenizer_matches_transformers(which, smollm2_path, tiny_llama):
    from transformers import AutoTokenizer

    folder = _hf_folder(smollm2_path if which == "smollm2" else tiny_llama[0])
    lean, ref = LeanTokenizer.load(folder), AutoTokenizer.from_pretrained(folder)
    assert lean is not None and lean.eos_token_id == ref.eos_token_id
    for text in TEXTS:
        ids = lean.encode(text)
        assert ids == ref.encode(text)
        assert lean.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            got = lean.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            want = ref.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            assert got == list(want["input_ids"] if hasattr(want, "keys") else want)
            ids = got + [lean.eos_token_id]
            for skip in (True, False):
                assert lean.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_tokenizer_settings_beyond_the_plain_one_fall_back_to_transformers(tiny_llama, tmp_path):
    from maxlike.weights import load_tokenizer

    folder = shutil.copytree(tiny_llama[0], tmp_path / "m")
    with open(folder / "tokenizer_config.json") as f:
        settings = json.load(f)
    for extra in ({"add_bos_token": True}, {"clean_up_tokenization_spaces": True}):
        with open(folder / "tokenizer_config.json", "w") as f:
            json.dump({**settings, **extra}, f)
        assert LeanTokenizer.load(str(folder)) is None, extra
    assert not isinstance(load_tokenizer(str(folder)), LeanTokenizer)
    assert load_tokenizer(str(folder)).encode("hi") == LeanTokenizer.load(tiny_llama[0]).encode("hi")
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump({**settings, "chat_template": "{% generation %}{{ messages[0]['content'] }}{% endgeneration %}"}, f)
    assert LeanTokenizer.load(str(folder)) is None  # transformers' own template tag


def test_config_view_holds_every_field_transformers_gives(tiny_models, smollm2_path):
    from transformers import AutoConfig

    from graphs import llama
    from maxlike.weights import load_hf_config

    for path in [smollm2_path] + [p for p, _ in tiny_models.values()]:
        view, ref = load_hf_config(path), AutoConfig.from_pretrained(_hf_folder(path))
        assert isinstance(view, HFConfigView)
        assert view.to_dict() == json.loads(json.dumps(ref.to_dict()))  # as JSON: id2label's keys are strings
        assert llama.config_from_hf(view) == llama.config_from_hf(ref)
    with pytest.raises(AttributeError):
        view.no_such_field


WARM_LOAD = """
import sys
from maxlike.weights import load_hf_config, load_tokenizer
config, tok = load_hf_config(sys.argv[1]), load_tokenizer(sys.argv[1])
tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
print(config.num_hidden_layers, type(tok).__name__, "transformers" in sys.modules)
"""


def test_a_warm_load_does_not_import_transformers(smollm2_path, tmp_path):
    env = dict(os.environ, MAXLIKE_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", WARM_LOAD, smollm2_path], capture_output=True, text=True, env=env,
                           timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert runs[0].stdout.split() == ["30", "LeanTokenizer", "True"]  # the first load parses the GGUF
    assert runs[1].stdout.split() == ["30", "LeanTokenizer", "False"]


def test_gguf_conversion_matches_transformers_reader(smollm2_path, tmp_path):
    """maxlike's own GGUF -> HF folder (no torch) against transformers' GGUF reader."""
    from transformers import AutoConfig, AutoTokenizer

    from graphs import llama
    from maxlike.weights import gguf_file, gguf_hf

    ours = tmp_path / "ours"
    assert gguf_hf.write_hf_folder(gguf_file.check_file(smollm2_path), str(ours))
    where, name = os.path.dirname(smollm2_path), os.path.basename(smollm2_path)
    ref_config, ref = AutoConfig.from_pretrained(where, gguf_file=name), AutoTokenizer.from_pretrained(where, gguf_file=name)
    config = AutoConfig.from_pretrained(ours)
    assert llama.config_from_hf(config) == llama.config_from_hf(ref_config)
    for field in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "max_position_embeddings",
                  "vocab_size", "model_type", "tie_word_embeddings"):
        assert getattr(config, field) == getattr(ref_config, field), field
    for tok in (LeanTokenizer.load(str(ours)), AutoTokenizer.from_pretrained(ours)):
        assert tok.eos_token_id == ref.eos_token_id
        for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>", "<|endoftext|>x"]:
            assert tok.encode(text) == ref.encode(text), text
            ids = ref.encode(text)
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        for messages in CONVERSATIONS:
            got = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            assert list(got["input_ids"] if hasattr(got, "keys") else got) == list(
                want["input_ids"] if hasattr(want, "keys") else want)


def test_a_gguf_loads_without_torch_and_others_name_the_fix(smollm2_path, tmp_path, monkeypatch):
    """transformers' GGUF reader imports torch: SmolLM2-like files never reach it; a file maxlike
    does not convert itself (here: llama3 RoPE factors) says what to install."""
    import importlib.util

    import gguf
    import numpy as np
    import transformers

    from conftest import tiny_hf_model
    from gguf_util import write_llama_gguf
    from maxlike.weights import WeightsError, load_hf_config, load_tokenizer

    def without_torch(cls):
        real = cls.from_pretrained

        def from_pretrained(*args, **kwargs):
            if "gguf_file" in kwargs:  # what transformers does without torch
                raise ModuleNotFoundError("Could not import module 'read_gguf_metadata'.")
            return real(*args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    without_torch(transformers.AutoConfig)
    without_torch(transformers.AutoTokenizer)
    copy = tmp_path / "model.gguf"
    shutil.copy(smollm2_path, copy)
    assert load_hf_config(str(copy)).num_hidden_layers == 30
    assert load_tokenizer(str(copy)).decode(load_tokenizer(str(copy)).encode("Paris.")) == "Paris."

    hf = tiny_hf_model("llama", seed=5, llama3_rope=False)
    factors = np.ones(hf.config.hidden_size // hf.config.num_attention_heads // 2, np.float32)
    other = tmp_path / "rope_freqs.gguf"
    write_llama_gguf(other, hf.config, {k: v.numpy() for k, v in hf.state_dict().items()},
                     extra_tensors={"rope_freqs.weight": (factors, gguf.GGMLQuantizationType.F32)})
    with pytest.raises(WeightsError, match=r"the first time needs torch: .*\(pip install torch --index-url"):
        load_hf_config(str(other))
