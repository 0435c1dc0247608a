"""Write an HF Llama state dict as a llama.cpp-style GGUF (test helper)."""

from __future__ import annotations

import gguf
import numpy as np
from gguf.quants import quantize

GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{LAYER_NAMES[rest]}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (what our loader undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, hf_config, state_dict: dict[str, np.ndarray], qtype: str = "F32",
                     extra_tensors: dict | None = None) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    c = hf_config
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    for name, arr in state_dict.items():
        arr = np.asarray(arr, np.float32)
        if name.endswith("q_proj.weight"):
            arr = permute(arr, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            arr = permute(arr, c.num_key_value_heads)
        kind = gguf.GGMLQuantizationType[qtype if arr.ndim == 2 else "F32"]
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), arr)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(name), arr.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), quantize(arr, kind), raw_dtype=kind)
    for name, (raw, kind) in (extra_tensors or {}).items():
        w.add_tensor(name, raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
