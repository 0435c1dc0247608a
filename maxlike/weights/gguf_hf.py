"""A GGUF file's config and tokenizer written as a Hugging Face folder, from the
`gguf` package alone.

transformers' own GGUF reader imports torch, which a plain `pip install maxlike`
does not bring. The files this module knows (Llama-architecture models with a
byte-level BPE vocabulary split by GPT-2's rule, such as SmolLM2) are converted
here; anything else returns False and goes to transformers. Tests check the
result against transformers' reading of the same file.
"""

from __future__ import annotations

import json
import os
from typing import Any

ARCHITECTURES = {"llama": "LlamaForCausalLM"}
# tokenizer.ggml.pre values whose text splitting is GPT-2's (the ByteLevel pre-tokenizer's own regex).
GPT2_SPLIT = {"gpt2", "smollm"}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _metadata(reader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def convertible(meta: dict[str, Any], tensor_names: set[str]) -> bool:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES or "rope_freqs.weight" in tensor_names:
        return False
    if any(key.startswith(f"{arch}.rope.scaling") for key in meta):
        return False  # rope scaling: transformers knows the variants
    model = meta.get("tokenizer.ggml.model")
    return model is None or (model == "gpt2" and meta.get("tokenizer.ggml.pre", "gpt2") in GPT2_SPLIT
                             and not meta.get("tokenizer.ggml.add_bos_token")
                             and not meta.get("tokenizer.ggml.add_eos_token"))


def write_hf_folder(reader, folder: str) -> bool:
    """Write config.json (and the tokenizer files, when the file has a vocabulary) into
    `folder`; False (nothing written) when the file is not one this module converts."""
    meta, tensors = _metadata(reader), {t.name for t in reader.tensors}
    if not convertible(meta, tensors):
        return False
    os.makedirs(folder, exist_ok=True)
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens:
        tokenizer, settings = _tokenizer(meta)
        tokenizer.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(_config(meta, tensors), f, indent=1)
    return True


def _config(meta: dict[str, Any], tensors: set[str]) -> dict[str, Any]:
    arch = meta["general.architecture"]
    heads = meta[f"{arch}.attention.head_count"]
    config = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
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
    return config


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
