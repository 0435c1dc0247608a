"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2, SmolLM2.

One decoder; the family members differ only in config (qkv bias, tied
embeddings, RoPE scaling), so each is a registry entry, not a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graphs.base import Architecture, UnsupportedConfigError, WeightSpec
from graphs.layers import apply_rope, paged_attention, rms_norm, rope_inv_freq, swiglu, write_kv


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, float], ...] | None  # llama3 parameters, hashable
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    max_position_embeddings: int
    sliding_window: int | None  # attention is full up to this many tokens
    gguf_qk_permuted: bool  # llama.cpp permutes q/k rows of Llama-arch GGUFs

    @property
    def inv_freq(self) -> np.ndarray:
        return rope_inv_freq(self.head_dim, self.rope_theta, dict(self.rope_scaling) if self.rope_scaling else None)


def _rope_params(hf: Any) -> tuple[float, tuple | None]:
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, tuple((k, float(params[k])) for k in keys)
    raise UnsupportedConfigError(
        f"RoPE type {kind!r} is not built yet: maxlike supports 'default' and 'llama3' RoPE."
    )


def config_from_hf(hf: Any) -> LlamaConfig:
    """The one converter from an HF config (Llama, Mistral, Qwen2) to ours."""
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"hidden_act={act!r} is not built yet: the Llama graph uses SwiGLU (silu).")
    if getattr(hf, "mlp_bias", False):
        raise UnsupportedConfigError("mlp_bias=True is not built yet in the Llama graph.")
    model_type = getattr(hf, "model_type", "llama")
    attention_bias = bool(getattr(hf, "attention_bias", False))
    window = getattr(hf, "sliding_window", None)
    if model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
        window = None
    theta, scaling = _rope_params(hf)
    heads = hf.num_attention_heads
    return LlamaConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        q_heads=heads,
        kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        intermediate_size=hf.intermediate_size,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        max_position_embeddings=hf.max_position_embeddings,
        sliding_window=int(window) if window else None,
        gguf_qk_permuted=model_type in ("llama", "mistral"),
    )


def _unpermute_gguf(heads: int):
    """llama.cpp interleaves the two RoPE halves of each q/k head; undo it (rows)."""

    def undo(w: np.ndarray) -> np.ndarray:
        rows = w.shape[0]
        return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    return undo


def weight_specs(cfg: LlamaConfig) -> dict[str, WeightSpec]:
    d, h, kv, hd, f = cfg.hidden_size, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate_size
    perm_q = _unpermute_gguf(h) if cfg.gguf_qk_permuted else None
    perm_k = _unpermute_gguf(kv) if cfg.gguf_qk_permuted else None
    specs = {
        "embed": WeightSpec((cfg.vocab_size, d), ("vocab", "embed"), "model.embed_tokens.weight", "token_embd.weight"),
        "final_norm": WeightSpec((d,), ("embed",), "model.norm.weight", "output_norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = WeightSpec((cfg.vocab_size, d), ("vocab", "embed"), "lm_head.weight", "output.weight")
    for i in range(cfg.num_layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        specs.update({
            f"layers.{i}.attn_norm": WeightSpec((d,), ("embed",), hf + "input_layernorm.weight", gg + "attn_norm.weight"),
            f"layers.{i}.q": WeightSpec(
                (d, h, hd), ("embed", "q_heads", "head_dim"), hf + "self_attn.q_proj.weight", gg + "attn_q.weight",
                lambda a, h=h, hd=hd: a.T.reshape(-1, h, hd), perm_q),
            f"layers.{i}.k": WeightSpec(
                (d, kv, hd), ("embed", "kv_heads", "head_dim"), hf + "self_attn.k_proj.weight", gg + "attn_k.weight",
                lambda a, kv=kv, hd=hd: a.T.reshape(-1, kv, hd), perm_k),
            f"layers.{i}.v": WeightSpec(
                (d, kv, hd), ("embed", "kv_heads", "head_dim"), hf + "self_attn.v_proj.weight", gg + "attn_v.weight",
                lambda a, kv=kv, hd=hd: a.T.reshape(-1, kv, hd)),
            f"layers.{i}.o": WeightSpec(
                (h, hd, d), ("q_heads", "head_dim", "embed"), hf + "self_attn.o_proj.weight", gg + "attn_output.weight",
                lambda a, h=h, hd=hd: a.T.reshape(h, hd, -1)),
            f"layers.{i}.mlp_norm": WeightSpec((d,), ("embed",), hf + "post_attention_layernorm.weight", gg + "ffn_norm.weight"),
            f"layers.{i}.gate": WeightSpec((d, f), ("embed", "mlp"), hf + "mlp.gate_proj.weight", gg + "ffn_gate.weight", np.transpose),
            f"layers.{i}.up": WeightSpec((d, f), ("embed", "mlp"), hf + "mlp.up_proj.weight", gg + "ffn_up.weight", np.transpose),
            f"layers.{i}.down": WeightSpec((f, d), ("mlp", "embed"), hf + "mlp.down_proj.weight", gg + "ffn_down.weight", np.transpose),
        })
        if cfg.qkv_bias:
            for name, heads, perm in (("q", h, perm_q), ("k", kv, perm_k), ("v", kv, None)):
                specs[f"layers.{i}.{name}_bias"] = WeightSpec(
                    (heads, hd), (f"{'q' if name == 'q' else 'kv'}_heads", "head_dim"),
                    hf + f"self_attn.{name}_proj.bias", gg + f"attn_{name}.bias",
                    lambda a, heads=heads, hd=hd: a.reshape(heads, hd), perm)
        if cfg.o_bias:
            specs[f"layers.{i}.o_bias"] = WeightSpec((d,), ("embed",), hf + "self_attn.o_proj.bias", gg + "attn_output.bias")
    return specs


def forward(cfg: LlamaConfig, w: dict, kv: list, tokens, positions, slots, page_table, *, backend: str = "cpu"):
    """tokens/positions/slots [B, T]; page_table [B, P]; kv[i] = (k_pages, v_pages).
    `backend` (the mesh's platform) picks the op variants that are fast there."""
    inv_freq = cfg.inv_freq
    x = w["embed"][tokens]  # [B, T, D]
    new_kv = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        with jax.named_scope(f"layer{i}"):
            with jax.named_scope("attention"):
                h = rms_norm(x, w[p + "attn_norm"], cfg.rms_norm_eps)
                q = jnp.einsum("btd,dhk->bthk", h, w[p + "q"])  # [B, T, H, K]
                k = jnp.einsum("btd,dhk->bthk", h, w[p + "k"])  # [B, T, KV, K]
                v = jnp.einsum("btd,dhk->bthk", h, w[p + "v"])
                if cfg.qkv_bias:
                    q, k, v = q + w[p + "q_bias"], k + w[p + "k_bias"], v + w[p + "v_bias"]
                q = apply_rope(q, positions, inv_freq)
                k = apply_rope(k, positions, inv_freq)
                k_pages = write_kv(kv[i][0], k, slots, backend=backend)
                v_pages = write_kv(kv[i][1], v, slots, backend=backend)
                new_kv.append((k_pages, v_pages))
                a = paged_attention(q, k_pages, v_pages, page_table, positions)
                a = jnp.einsum("bthk,hkd->btd", a, w[p + "o"])
                if cfg.o_bias:
                    a = a + w[p + "o_bias"]
                x = x + a
            with jax.named_scope("mlp"):
                h = rms_norm(x, w[p + "mlp_norm"], cfg.rms_norm_eps)
                x = x + swiglu(h, w[p + "gate"], w[p + "up"], w[p + "down"])
    return rms_norm(x, w["final_norm"], cfg.rms_norm_eps), new_kv


def lm_head(cfg: LlamaConfig, w: dict, hidden: jax.Array) -> jax.Array:
    table = w["embed"] if cfg.tie_word_embeddings else w["lm_head"]
    return jnp.einsum("...d,vd->...v", hidden, table)


def kv_shape(cfg: LlamaConfig) -> tuple[int, int, int]:
    return cfg.num_layers, cfg.kv_heads, cfg.head_dim


def _arch(name: str, model_types: tuple[str, ...]) -> Architecture:
    return Architecture(name, model_types, config_from_hf, weight_specs, kv_shape, forward, lm_head)


LLAMA_FAMILY = (
    _arch("LlamaForCausalLM", ("llama",)),
    _arch("MistralForCausalLM", ("mistral",)),
    _arch("Qwen2ForCausalLM", ("qwen2",)),
)
