"""Where the Llama family's weights live in checkpoints: the HF and GGUF name map.

Kept apart from the math in `llama.py`: this file knows tensor names, HF's
[out, in] linear layout and llama.cpp's q/k row permutation; `llama.py` knows
only our own layout (`weight_specs`).
"""

from __future__ import annotations

import numpy as np

from graphs.base import Source
from graphs.moe import expert_names


def _unpermute_gguf(heads: int):
    """llama.cpp interleaves the two RoPE halves of each q/k head's rows; undo it."""

    def undo(w: np.ndarray) -> np.ndarray:
        rows = w.shape[0]
        return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return undo


def _heads(heads: int, head_dim: int):
    """An HF [heads * head_dim, in] projection -> our [in, heads, head_dim]."""
    return lambda a: a.T.reshape(-1, heads, head_dim)


def _rows(start: int, stop: int, then):
    return lambda a: then(a[start:stop])


def _fused(cfg, p: str, hf: str, gg: str) -> dict[str, Source]:
    """Phi-3's fused projections (HF and llama.cpp keep them fused alike), split into ours."""
    h, kv, hd, f = cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate_size
    q, k = h * hd, kv * hd
    qkv, gate_up = (hf + "self_attn.qkv_proj.weight", gg + "attn_qkv.weight"), (hf + "mlp.gate_up_proj.weight",
                                                                                 gg + "ffn_up.weight")
    return {
        p + "q": Source(*qkv, _rows(0, q, _heads(h, hd))),
        p + "k": Source(*qkv, _rows(q, q + k, _heads(kv, hd))),
        p + "v": Source(*qkv, _rows(q + k, q + 2 * k, _heads(kv, hd))),
        p + "gate": Source(*gate_up, _rows(0, f, np.transpose)),
        p + "up": Source(*gate_up, _rows(f, 2 * f, np.transpose)),
    }


def checkpoint_names(cfg) -> dict[str, Source]:
    """Every weight of `graphs.llama.weight_specs(cfg)`: its HF and GGUF tensor and the conversion."""
    h, kv, hd = cfg.q_heads, cfg.kv_heads, cfg.head_dim
    perm_q = _unpermute_gguf(h) if cfg.gguf_qk_permuted else None
    perm_k = _unpermute_gguf(kv) if cfg.gguf_qk_permuted else None
    names = {
        "embed": Source("model.embed_tokens.weight", "token_embd.weight"),
        "final_norm": Source("model.norm.weight", "output_norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head"] = Source("lm_head.weight", "output.weight")
    for i in range(cfg.num_layers):
        p, hf, gg = f"layers.{i}.", f"model.layers.{i}.", f"blk.{i}."
        names.update({
            p + "attn_norm": Source(hf + "input_layernorm.weight", gg + "attn_norm.weight"),
            p + "q": Source(hf + "self_attn.q_proj.weight", gg + "attn_q.weight", _heads(h, hd), perm_q),
            p + "k": Source(hf + "self_attn.k_proj.weight", gg + "attn_k.weight", _heads(kv, hd), perm_k),
            p + "v": Source(hf + "self_attn.v_proj.weight", gg + "attn_v.weight", _heads(kv, hd)),
            p + "o": Source(hf + "self_attn.o_proj.weight", gg + "attn_output.weight",
                            lambda a: a.T.reshape(h, hd, -1)),
            p + "mlp_norm": Source(hf + "post_attention_layernorm.weight", gg + "ffn_norm.weight"),
            p + "gate": Source(hf + "mlp.gate_proj.weight", gg + "ffn_gate.weight", np.transpose),
            p + "up": Source(hf + "mlp.up_proj.weight", gg + "ffn_up.weight", np.transpose),
            p + "down": Source(hf + "mlp.down_proj.weight", gg + "ffn_down.weight", np.transpose),
        })
        if cfg.moe is not None and cfg.moe.layers[i]:  # a router and stacked experts in place of the MLP
            for kind in ("gate", "up", "down"):
                del names[p + kind]
            names.update(expert_names(cfg.moe, i))
        if cfg.fused_checkpoint:  # Phi-3: rows of qkv_proj are q, then k, then v; gate_up_proj's gate, then up
            names.update(_fused(cfg, p, hf, gg))
        if cfg.qkv_bias:
            for name, heads, perm in (("q", h, perm_q), ("k", kv, perm_k), ("v", kv, None)):
                names[p + f"{name}_bias"] = Source(hf + f"self_attn.{name}_proj.bias", gg + f"attn_{name}.bias",
                                                   lambda a, heads=heads: a.reshape(heads, hd), perm)
        if cfg.o_bias:
            names[p + "o_bias"] = Source(hf + "self_attn.o_proj.bias", gg + "attn_output.bias")
        if cfg.qk_norm:
            names[p + "q_norm"] = Source(hf + "self_attn.q_norm.weight", gg + "attn_q_norm.weight")
            names[p + "k_norm"] = Source(hf + "self_attn.k_norm.weight", gg + "attn_k_norm.weight")
    return names
