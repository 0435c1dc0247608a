"""Shared fixtures: tiny random HF models saved as real checkpoints, and SmolLM2."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TEST_CACHE = tempfile.mkdtemp(prefix="maxlike-test-cache-")
os.environ["MAXLIKE_CACHE_DIR"] = TEST_CACHE  # never the user's cache


def pytest_sessionfinish(session, exitstatus):
    """The suite's cache folder goes with the run (subprocesses inherit it and are done by now)."""
    shutil.rmtree(TEST_CACHE, ignore_errors=True)

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def byte_tokenizer():
    """A byte-level BPE tokenizer (no merges): ids 0-2 special, 3-258 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


def tiny_hf_model(kind: str, *, tie: bool = False, seed: int = 0, llama3_rope: bool = True):
    """A tiny random HF model in fp32 (eval mode)."""
    import torch
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        cfg = tf.LlamaConfig(rope_scaling=LLAMA3_ROPE if llama3_rope else None, rope_theta=10000.0, **common)
        cls = tf.LlamaForCausalLM
    elif kind == "mistral":
        cfg = tf.MistralConfig(sliding_window=None, rope_theta=10000.0, **common)
        cls = tf.MistralForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(rope_theta=10000.0, **common)
        cls = tf.Qwen2ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # random biases so qkv bias is exercised (HF inits them to 0)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


WINDOW = 8  # sliding windows in the architecture tests: well inside their prompts and generations
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}


def tiny_arch_model(kind: str, *, seed: int = 0, **overrides):
    """A tiny random HF model (fp32, eval) of an architecture beyond TINY_KINDS, shaped to exercise
    its features: windows shorter than the test prompts, GQA, an explicit head_dim. `overrides`
    change config fields."""
    import torch
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

    def make(**fields):  # the kind's fields over the common ones, the caller's overrides over both
        return {**common, **fields, **overrides}

    if kind == "llama":  # plain (the benchmarks' baseline; the tests use tiny_hf_model)
        cfg, cls = tf.LlamaConfig(**make(num_hidden_layers=2, rope_theta=10000.0)), tf.LlamaForCausalLM
    elif kind == "qwen3":  # layer 0 full, layers 1-2 sliding; head_dim 24 != 64 / 4; YaRN RoPE
        cfg = tf.Qwen3Config(**make(num_hidden_layers=3, head_dim=24, use_sliding_window=True, sliding_window=WINDOW,
                             max_window_layers=1, rope_parameters=dict(YARN), tie_word_embeddings=True))
        cls = tf.Qwen3ForCausalLM
    elif kind == "mistral_window":  # every layer slides
        cfg = tf.MistralConfig(**make(num_hidden_layers=2, sliding_window=WINDOW, rope_theta=10000.0))
        cls = tf.MistralForCausalLM
    elif kind == "gemma2":  # alternating sliding/global layers; soft-caps small enough to bite
        cfg = tf.Gemma2Config(**make(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0, initializer_range=0.1))
        cls = tf.Gemma2ForCausalLM
    elif kind in ("gemma3", "gemma3_mm"):  # q/k norms; local RoPE on sliding layers, linear-scaled global RoPE
        text = make(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                        "rope_theta": 1000000.0}},
                    initializer_range=0.1)
        if kind == "gemma3":
            cfg, cls = tf.Gemma3TextConfig(**text), tf.Gemma3ForCausalLM
        else:  # the text tower of a multimodal checkpoint, with a one-layer vision tower beside it
            vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=64, patch_size=16)
            cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                  boi_token_index=3, eoi_token_index=4, image_token_index=5)
            cls = tf.Gemma3ForConditionalGeneration
    elif kind == "phi3":  # fused projections; LongRoPE past a 4-token original context (long factors, cos/sin x 2)
        half = 8  # head_dim 16 / 2
        cfg = tf.Phi3Config(**make(num_hidden_layers=2, sliding_window=WINDOW, original_max_position_embeddings=4,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                             "short_factor": [1.0 + 0.05 * i for i in range(half)],
                                             "long_factor": [1.0 + 0.5 * i for i in range(half)]}))
        cls = tf.Phi3ForCausalLM
    else:
        raise ValueError(kind)
    model = _eager(cls, cfg, seed)
    with torch.no_grad():  # norms away from their identity so every norm weight matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5) if kind.startswith("gemma") else p.uniform_(0.5, 1.5)
    return model


def _eager(cls, cfg, seed: int):
    """An HF model of `cfg` with eager attention, its weights drawn from `seed`, in eval mode."""
    import torch

    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(cfg).eval()


def tiny_moe_model(kind: str, *, seed: int = 0, **overrides):
    """A tiny random HF mixture-of-experts model (fp32, eval): 8 experts, top-2. Mixtral renormalizes
    its top-2 weights; this Qwen3-MoE does not (norm_topk_prob False) and keeps layer 1 dense
    (mlp_only_layers). Router weights are drawn wide (std 1) so no token's top-2 is a near tie."""
    import torch
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  num_experts_per_tok=2, rope_theta=10000.0)
    if kind == "mixtral":
        cfg = tf.MixtralConfig(**{**common, "num_hidden_layers": 2, "intermediate_size": 64, "num_local_experts": 8,
                                  **overrides})
        cls = tf.MixtralForCausalLM
    elif kind == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**{**common, "num_hidden_layers": 3, "intermediate_size": 96,
                                   "moe_intermediate_size": 32, "num_experts": 8, "head_dim": 16,
                                   "mlp_only_layers": [1], "norm_topk_prob": False, **overrides})
        cls = tf.Qwen3MoeForCausalLM
    else:
        raise ValueError(kind)
    model = _eager(cls, cfg, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.ndim == 2 and p.shape[0] == 8:  # the router
                p.normal_(0, 1.0)
            elif "experts" in name:  # (HF draws them at std 0.02: experts that barely move the logits)
                p.normal_(0, 0.1)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


MOE_KINDS = ("mixtral", "qwen3_moe")


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory):
    """name -> (path, HF torch model) for every MOE_KINDS model."""
    return {name: (save_tiny(model := tiny_moe_model(name), tmp_path_factory.mktemp(name)), model)
            for name in MOE_KINDS}


def save_tiny(model, path) -> str:
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


TINY_KINDS = {
    "llama": dict(kind="llama"),
    "llama_tied": dict(kind="llama", tie=True),
    "mistral": dict(kind="mistral"),
    "qwen2": dict(kind="qwen2", tie=True),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> (path, HF torch model) for every tiny kind."""
    out = {}
    for name, kw in TINY_KINDS.items():
        model = tiny_hf_model(**kw)
        out[name] = (save_tiny(model, tmp_path_factory.mktemp(name)), model)
    return out


ARCH_KINDS = ("qwen3", "mistral_window", "gemma2", "gemma3", "gemma3_mm", "phi3")


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory):
    """name -> (path, HF torch model) for every ARCH_KINDS model."""
    return {name: (save_tiny(model := tiny_arch_model(name), tmp_path_factory.mktemp(name)), model)
            for name in ARCH_KINDS}


@pytest.fixture(scope="session")
def eight_head_models(tmp_path_factory):
    """Tiny Llama and Qwen2 with 8 query and 2 KV heads (so 8-way tensor parallel splits them)."""
    import torch
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=10000.0)
    paths = {}
    for kind, cls, cfg in (("llama", tf.LlamaForCausalLM, tf.LlamaConfig(**common)),
                           ("qwen2", tf.Qwen2ForCausalLM, tf.Qwen2Config(tie_word_embeddings=True, **common))):
        torch.manual_seed(0)
        model = cls(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
        paths[kind] = save_tiny(model, tmp_path_factory.mktemp(kind))
    return paths


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]


def build_model(path: str, *, return_logits="last_token", return_hidden_states="none", max_length: int = 128,
                max_batch_size: int = 4, **kw):
    """A DecoderPipelineModel straight from a checkpoint (no tokenizer needed)."""
    from maxlike.engine import InferenceSession
    from maxlike.pipelines import PipelineConfig, ReturnHiddenStates, ReturnLogits
    from maxlike.pipelines.decoder import DecoderPipelineModel

    kw.setdefault("dtype", "float32")  # the parity tests' precision on every backend (accelerators default to bf16)
    config = PipelineConfig(model_path=path, max_length=max_length, max_batch_size=max_batch_size, **kw)
    session = InferenceSession()
    return DecoderPipelineModel(config, session, session.devices, config.kv_cache, None, None,
                                ReturnLogits(return_logits), ReturnHiddenStates(return_hidden_states), progress=False)


def held(model, ctx):
    """`ctx` holding KV pages for its whole length (what the scheduler does for a request), for
    tests that drive a PipelineModel by hand."""
    model.kv_manager.claim(ctx.request_id, total_tokens=ctx.max_length)
    return ctx


@pytest.fixture(scope="session")
def smollm2_path():
    from maxlike.entrypoints.llm import default_model_path

    try:
        return default_model_path()
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """(tokenizer, model): HF transformers' own reading of the default GGUF, fp32 (loaded once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = os.path.dirname(smollm2_path), os.path.basename(smollm2_path)
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama):
    from maxlike.entrypoints import LLM
    from maxlike.pipelines import PipelineConfig

    return LLM(PipelineConfig(model_path=tiny_llama[0], max_length=128, max_batch_size=4, dtype="float32"),
               progress=False)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in tests listen there only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_prompt(n: int, seed: int, vocab: int = 320) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab, size=n).astype(np.int32)


def kinds_written(cache) -> dict[str, int]:
    """Executables in a cache folder by kind (log-prob sizes together), from their records."""
    import glob
    import json
    import re

    out: dict[str, int] = {}
    for path in glob.glob(os.path.join(str(cache), "executables", "*.json")):
        with open(path) as f:
            name = re.sub(r"_top\d+$", "", json.load(f)["key"]["name"])
        out[name] = out.get(name, 0) + 1
    return out


def dry_run_counts(stdout: str) -> dict[str, int]:
    """warm-cache's first line, "N executables (7 step, 7 unpack_inputs, ...)", as a dict."""
    listed = stdout.split(" executables (")[1].split(")")[0]
    return {name: int(n) for n, name in (part.split() for part in listed.split(", "))}


def counted_calls(monkeypatch, module, name: str) -> list:
    """Replace `module.name` by a wrapper that records each call's second argument's shape (a
    kernel's weight) and calls the real one; returns the record."""
    calls = []
    real = getattr(module, name)

    def counted(x, values, *args, **kw):
        calls.append(values.shape)
        return real(x, values, *args, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls
