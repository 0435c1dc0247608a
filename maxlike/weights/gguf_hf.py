"""A GGUF file's config and tokenizer written as a Hugging Face folder, from the
`gguf` package alone.

transformers' own GGUF reader imports torch, which a plain `pip install maxlike`
does not bring. The configs of the architectures below are converted here (for
Gemma and Qwen that also keeps what transformers' reader drops: soft-caps, the
query scale, sliding windows); so are byte-level BPE vocabularies split by GPT-2's
rule (SmolLM2's). Other vocabularies (SentencePiece: Gemma, Phi-3) and other
architectures go to transformers. Tests check the result against transformers'
reading of the same file and against the safetensors model it was written from.
"""

from __future__ import annotations

import json
import os
from typing import Any

# GGUF general.architecture -> (HF architecture, HF model_type)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
                 "qwen3": ("Qwen3ForCausalLM", "qwen3"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
                 "gemma3": ("Gemma3ForCausalLM", "gemma3_text"), "phi3": ("Phi3ForCausalLM", "phi3"),
                 "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe")}
MIXTRAL = ("MixtralForCausalLM", "mixtral")  # llama.cpp writes Mixtral as "llama" with experts
# llama.cpp takes a Gemma with this many layers for the 27B model, whose queries it scales by
# (hidden / heads)^-1/2 instead of head_dim^-1/2 (HF's query_pre_attn_scalar).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# tokenizer.ggml.pre values whose text splitting is GPT-2's (the ByteLevel pre-tokenizer's own regex).
GPT2_SPLIT = {"gpt2", "smollm"}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _metadata(reader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def convertible(meta: dict[str, Any], tensor_names: set[str]) -> bool:
    """Whether this module writes the file's config."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES or tensor_names & {"rope_freqs.weight", "rope_factors_long.weight"}:
        return False  # RoPE factors as tensors (Llama 3.1, Phi-3 LongRoPE): transformers knows them
    scaling = [key for key in meta if key.startswith(f"{arch}.rope.scaling")]
    return not scaling or (arch == "gemma3" and meta.get(f"{arch}.rope.scaling.type") in ("linear", "none")
                           and set(scaling) <= {f"{arch}.rope.scaling.type", f"{arch}.rope.scaling.factor"})


def tokenizer_convertible(meta: dict[str, Any]) -> bool:
    """Whether this module writes the file's tokenizer (byte-level BPE split as GPT-2 does)."""
    model = meta.get("tokenizer.ggml.model")
    return model is None or (model == "gpt2" and meta.get("tokenizer.ggml.pre", "gpt2") in GPT2_SPLIT
                             and not meta.get("tokenizer.ggml.add_bos_token")
                             and not meta.get("tokenizer.ggml.add_eos_token"))


def write_hf_folder(reader, folder: str) -> str | None:
    """Write config.json (and the tokenizer files, when the file has a vocabulary this module
    converts) into `folder`. Returns "all", "config" (a vocabulary is left for the caller to
    convert), or None (nothing written: not a file this module converts)."""
    meta, tensors = _metadata(reader), {t.name for t in reader.tensors}
    if not convertible(meta, tensors):
        return None
    os.makedirs(folder, exist_ok=True)
    tokens = meta.get("tokenizer.ggml.tokens")
    done = "all"
    if tokens and tokenizer_convertible(meta):
        tokenizer, settings = _tokenizer(meta)
        tokenizer.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1)
    elif tokens:
        done = "config"
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(_config(meta, tensors), f, indent=1)
    return done


def _config(meta: dict[str, Any], tensors: set[str]) -> dict[str, Any]:
    arch = meta["general.architecture"]
    heads = meta[f"{arch}.attention.head_count"]
    hf_arch = MIXTRAL if arch == "llama" and meta.get(f"{arch}.expert_count") else ARCHITECTURES[arch]
    config = {
        "architectures": [hf_arch[0]], "model_type": hf_arch[1],
        "hidden_size": meta[f"{arch}.embedding_length"],
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": meta.get(f"{arch}.attention.key_length", meta[f"{arch}.embedding_length"] // heads),
        "max_position_embeddings": meta[f"{arch}.context_length"],
        "rms_norm_eps": meta[f"{arch}.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "vocab_size": meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in tensors,  # llama.cpp drops a tied output matrix
    }
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[name] = meta[f"tokenizer.ggml.{key}"]
    config.update(_family_config(arch, meta, config))
    return config


def _family_config(arch: str, meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """What an architecture's HF config holds beyond the Llama fields, from llama.cpp's metadata."""
    window = meta.get(f"{arch}.attention.sliding_window")
    experts = meta.get(f"{arch}.expert_count")
    if arch == "llama" and experts:  # Mixtral
        return {"num_local_experts": experts, "num_experts_per_tok": meta[f"{arch}.expert_used_count"]}
    if arch == "qwen3moe":  # llama.cpp renormalizes the top-k weights and makes every layer's MLP the experts
        return {"use_sliding_window": False, "num_experts": experts, "num_experts_per_tok":
                meta[f"{arch}.expert_used_count"], "moe_intermediate_size": meta[f"{arch}.expert_feed_forward_length"],
                "norm_topk_prob": True, "mlp_only_layers": [], "decoder_sparse_step": 1}
    if arch in ("qwen2", "qwen3"):
        return {"use_sliding_window": False}  # llama.cpp runs Qwen without a window
    if arch == "phi3":
        return {"sliding_window": window}
    if arch not in GEMMA_27B_LAYERS:
        return {}
    big = config["num_hidden_layers"] == GEMMA_27B_LAYERS[arch]
    out = {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": window,
           "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"] if big
           else config["head_dim"]}
    if arch == "gemma2":
        out["attn_logit_softcapping"] = meta.get(f"{arch}.attn_logit_softcapping")
        out["final_logit_softcapping"] = meta.get(f"{arch}.final_logit_softcapping")
    else:  # Gemma 3: local layers keep RoPE base 10000 (llama.cpp's fixed value), global ones the file's
        factor = meta.get(f"{arch}.rope.scaling.factor")
        full = {"rope_type": "linear", "factor": factor} if factor and factor != 1 else {"rope_type": "default"}
        out["rope_parameters"] = {"full_attention": {**full, "rope_theta": config.pop("rope_theta")},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
        if isinstance(pattern, (list, tuple)):  # per layer: True where it slides
            out["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        elif pattern:
            out["sliding_window_pattern"] = int(pattern)
    return out


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte-to-character table: printable bytes stand for themselves, the rest are
    moved up past 255, so every byte sequence is spelled in visible characters."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _tokenizer(meta: dict[str, Any]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|im_start|>, ...) stay whole and are special; user-defined ones stay whole.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab])
    settings: dict[str, Any] = {"tokenizer_class": "TokenizersBackend"}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            settings[name] = tokens[meta[f"tokenizer.ggml.{key}"]]
    if meta.get("tokenizer.chat_template"):
        settings["chat_template"] = meta["tokenizer.chat_template"]
    return tok, settings
