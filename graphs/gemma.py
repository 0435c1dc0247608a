"""The Gemma family: Gemma 2 and Gemma 3 (text, and the text tower of a Gemma 3 multimodal checkpoint).

Where it differs from the Llama graph: embeddings scaled by sqrt(hidden); RMSNorm
scaling by (1 + w), in fp32; a norm after attention and after the MLP as well as
before each; GeGLU (tanh-approximated GELU); queries scaled by
query_pre_attn_scalar^-1/2 instead of head_dim^-1/2; Gemma 2's soft-capping of
attention logits and of the final logits; Gemma 3's q/k norms and separate RoPE for
its sliding (local) and global layers. Which layers slide is the config's
`layer_types`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp

from graphs.base import Architecture, Source, UnsupportedConfigError, WeightSpec, require, run_layers
from graphs.fused import gate_up, qkv
from graphs.attention import paged_attention, write_kv
from graphs.layers import adapter_mask, embed_rows, head_logits, kernel_weights, projection
from graphs.llama import COMMON_FEATURES, LORA_TARGETS, kv_shape, layer_windows
from graphs.rope import RopeSpec, apply_rope, hf_rope_parameters, rope_from_hf


@dataclass(frozen=True)
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeSpec  # global (full-attention) layers
    local_rope: RopeSpec  # sliding layers (Gemma 2: the same)
    query_scale: float  # query_pre_attn_scalar ** -0.5
    attn_softcap: float | None  # Gemma 2: attention logits -> c * tanh(logits / c)
    final_softcap: float | None  # Gemma 2: the output logits likewise
    qk_norm: bool  # Gemma 3
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_window: int | None
    layer_windows: tuple[int, ...]  # per layer; 0: global


def text_config(hf: Any) -> Any:
    """The text model's config: a multimodal Gemma 3 checkpoint nests it as `text_config`."""
    if getattr(hf, "model_type", None) == "gemma3" and hasattr(hf, "vision_config"):
        text = getattr(hf, "text_config", None)
        if isinstance(text, dict):  # a config read as plain values (maxlike's lean loading)
            text = SimpleNamespace(**text)
        if text is None or getattr(text, "num_hidden_layers", None) is None:
            raise UnsupportedConfigError("this Gemma 3 checkpoint's config has no text_config (a vision-only "
                                         "checkpoint?): maxlike runs Gemma 3's text model.")
        return text
    return hf


def config_from_hf(hf: Any) -> GemmaConfig:
    arch = (getattr(hf, "architectures", None) or ["Gemma"])[0]
    hf = text_config(hf)
    act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedConfigError(f"hidden_activation={act!r} is not built: the Gemma graph uses GeGLU with "
                                     "tanh-approximated GELU (gelu_pytorch_tanh).")
    if getattr(hf, "use_bidirectional_attention", False):
        raise UnsupportedConfigError("use_bidirectional_attention=True (an embedding model) is not built: maxlike "
                                     "generates text with causal attention.")
    if getattr(hf, "attention_bias", False):
        raise UnsupportedConfigError("attention_bias=True is not built in the Gemma graph.")
    need = {name: require(hf, name, arch) for name in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                       "num_attention_heads", "intermediate_size", "rms_norm_eps",
                                                       "max_position_embeddings", "query_pre_attn_scalar")}
    heads = need["num_attention_heads"]
    head_dim = getattr(hf, "head_dim", None) or need["hidden_size"] // heads
    gemma3 = getattr(hf, "model_type", "") in ("gemma3_text", "gemma3")
    windows = layer_windows(hf, need["num_hidden_layers"], getattr(hf, "sliding_window", None))
    positions = need["max_position_embeddings"]
    rope = rope_from_hf(hf_rope_parameters(hf, "full_attention"), head_dim, positions, arch)
    local = rope_from_hf(hf_rope_parameters(hf, "sliding_attention"), head_dim, positions, arch) if gemma3 else rope
    return GemmaConfig(
        vocab_size=need["vocab_size"], hidden_size=need["hidden_size"], num_layers=need["num_hidden_layers"],
        q_heads=heads, kv_heads=getattr(hf, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate_size=need["intermediate_size"], rms_norm_eps=float(need["rms_norm_eps"]),
        rope=rope, local_rope=local, query_scale=float(need["query_pre_attn_scalar"]) ** -0.5,
        attn_softcap=getattr(hf, "attn_logit_softcapping", None),
        final_softcap=getattr(hf, "final_logit_softcapping", None), qk_norm=gemma3,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)), max_position_embeddings=positions,
        sliding_window=max(windows) or None, layer_windows=windows,
    )


NORMS = ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm")


def weight_specs(cfg: GemmaConfig) -> dict[str, WeightSpec]:
    d, h, kv, hd, f = cfg.hidden_size, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate_size
    specs = {"embed": WeightSpec((cfg.vocab_size, d), ("vocab", "embed")), "final_norm": WeightSpec((d,), ("embed",))}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = WeightSpec((cfg.vocab_size, d), ("vocab", "embed"))
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        specs.update({p + n: WeightSpec((d,), ("embed",)) for n in NORMS})
        specs.update({
            p + "q": WeightSpec((d, h, hd), ("embed", "q_heads", "head_dim")),
            p + "k": WeightSpec((d, kv, hd), ("embed", "kv_heads", "head_dim")),
            p + "v": WeightSpec((d, kv, hd), ("embed", "kv_heads", "head_dim")),
            p + "o": WeightSpec((h, hd, d), ("q_heads", "head_dim", "embed")),
            p + "gate": WeightSpec((d, f), ("embed", "mlp")),
            p + "up": WeightSpec((d, f), ("embed", "mlp")),
            p + "down": WeightSpec((f, d), ("mlp", "embed")),
        })
        if cfg.qk_norm:
            specs[p + "q_norm"] = WeightSpec((hd,), ("head_dim",))
            specs[p + "k_norm"] = WeightSpec((hd,), ("head_dim",))
    return specs


def _heads(heads: int, head_dim: int):
    return lambda a: a.T.reshape(-1, heads, head_dim)


def _minus_one(a):
    """llama.cpp stores Gemma's norm weights with the 1 of (1 + w) added."""
    return a - 1


def checkpoint_names(cfg: GemmaConfig) -> dict[str, Source]:
    """HF names (a multimodal checkpoint's text tower is found by the loader under its prefix) and
    llama.cpp's GGUF names."""
    h, kv, hd = cfg.q_heads, cfg.kv_heads, cfg.head_dim
    names = {"embed": Source("model.embed_tokens.weight", "token_embd.weight"),
             "final_norm": Source("model.norm.weight", "output_norm.weight", gguf_convert=_minus_one)}
    if not cfg.tie_word_embeddings:
        names["lm_head"] = Source("lm_head.weight", "output.weight")
    norms = {"attn_norm": ("input_layernorm", "attn_norm"),
             "post_attn_norm": ("post_attention_layernorm", "post_attention_norm"),
             "mlp_norm": ("pre_feedforward_layernorm", "ffn_norm"),
             "post_mlp_norm": ("post_feedforward_layernorm", "post_ffw_norm")}
    for i in range(cfg.num_layers):
        p, hf, gg = f"layers.{i}.", f"model.layers.{i}.", f"blk.{i}."
        names.update({p + ours: Source(hf + f"{a}.weight", gg + f"{b}.weight", gguf_convert=_minus_one)
                      for ours, (a, b) in norms.items()})
        names.update({
            p + "q": Source(hf + "self_attn.q_proj.weight", gg + "attn_q.weight", _heads(h, hd)),
            p + "k": Source(hf + "self_attn.k_proj.weight", gg + "attn_k.weight", _heads(kv, hd)),
            p + "v": Source(hf + "self_attn.v_proj.weight", gg + "attn_v.weight", _heads(kv, hd)),
            p + "o": Source(hf + "self_attn.o_proj.weight", gg + "attn_output.weight",
                            lambda a: a.T.reshape(h, hd, -1)),
            p + "gate": Source(hf + "mlp.gate_proj.weight", gg + "ffn_gate.weight", lambda a: a.T),
            p + "up": Source(hf + "mlp.up_proj.weight", gg + "ffn_up.weight", lambda a: a.T),
            p + "down": Source(hf + "mlp.down_proj.weight", gg + "ffn_down.weight", lambda a: a.T),
        })
        if cfg.qk_norm:
            names[p + "q_norm"] = Source(hf + "self_attn.q_norm.weight", gg + "attn_q_norm.weight",
                                         gguf_convert=_minus_one)
            names[p + "k_norm"] = Source(hf + "self_attn.k_norm.weight", gg + "attn_k_norm.weight",
                                         gguf_convert=_minus_one)
    return names


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: normalized and scaled by (1 + w), both in fp32."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def _rotate(x: jax.Array, positions: jax.Array, cfg: GemmaConfig, window) -> jax.Array:
    """Local RoPE on sliding layers, global on the others (`window` static, or traced under scan)."""
    if cfg.local_rope == cfg.rope:
        return apply_rope(x, positions, cfg.rope)
    if isinstance(window, int):
        return apply_rope(x, positions, cfg.local_rope if window else cfg.rope)
    return jnp.where(window > 0, apply_rope(x, positions, cfg.local_rope), apply_rope(x, positions, cfg.rope))


def forward(cfg: GemmaConfig, w: dict, kv: list, tokens, positions, slots, page_table, *, backend: str = "cpu",
            scan: bool = False, adapters=None, attention="xla", matmul="xla"):
    """As graphs.llama.forward (same arguments and results)."""
    proj = projection(adapter_mask(w, adapters), matmul, backend)
    eps = cfg.rms_norm_eps

    def layer(x, lw, k_pages, v_pages, index):
        window = lw.get("window", 0)
        with jax.named_scope("attention"):
            h = rms_norm(x, lw["attn_norm"], eps)
            q, k, v = qkv(proj, h, lw)  # [B, T, H, K], [B, T, KV, K] x 2
            if cfg.qk_norm:
                q, k = rms_norm(q, lw["q_norm"], eps), rms_norm(k, lw["k_norm"], eps)
            q, k = _rotate(q, positions, cfg, window), _rotate(k, positions, cfg, window)
            k_pages = write_kv(k_pages, k, slots, index, backend=backend)
            v_pages = write_kv(v_pages, v, slots, index, backend=backend)
            a = paged_attention(q, k_pages, v_pages, page_table, positions, index, backend=backend, window=window,
                                scale=cfg.query_scale, softcap=cfg.attn_softcap, kernel=attention,
                                max_window=cfg.sliding_window)
            x = x + rms_norm(proj("bthk,hkd->btd", a, lw, "o", 2), lw["post_attn_norm"], eps)
        with jax.named_scope("mlp"):
            h = rms_norm(x, lw["mlp_norm"], eps)
            g, u = gate_up(proj, h, lw)
            m = proj("btf,fd->btd", jax.nn.gelu(g, approximate=True) * u, lw, "down")
            x = x + rms_norm(m, lw["post_mlp_norm"], eps)
        return x, k_pages, v_pages

    dtype = w["final_norm"].dtype
    x = embed_rows(w, tokens, dtype) * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)  # [B, T, D]
    x, kv = run_layers(layer, x, w, kv, cfg.num_layers, scan=scan,
                       per_layer={"window": cfg.layer_windows} if cfg.sliding_window else None,
                       whole=kernel_weights(w, matmul))
    return rms_norm(x, w["final_norm"], eps), kv


def lm_head(cfg: GemmaConfig, w: dict, hidden: jax.Array, *, matmul="xla", backend: str = "cpu") -> jax.Array:
    logits = head_logits(w, hidden, cfg.tie_word_embeddings, matmul, backend)
    if cfg.final_softcap:
        c = cfg.final_softcap
        logits = (jnp.tanh(logits.astype(jnp.float32) / c) * c).astype(logits.dtype)
    return logits


def _arch(name: str, model_types: tuple[str, ...], features: str) -> Architecture:
    return Architecture(name, model_types, config_from_hf, weight_specs, checkpoint_names, kv_shape, forward, lm_head,
                        lora_targets=LORA_TARGETS, features=f"{features}; {COMMON_FEATURES}",
                        quantized_head=True)


GEMMA_FAMILY = (
    _arch("Gemma2ForCausalLM", ("gemma2",), "sliding and global layers, attention and final logit soft-caps, "
                                            "pre/post norms, GeGLU"),
    _arch("Gemma3ForCausalLM", ("gemma3_text",), "sliding and global layers with their own RoPE, q/k norms, "
                                                 "pre/post norms, GeGLU"),
    _arch("Gemma3ForConditionalGeneration", ("gemma3",), "the text model of a multimodal checkpoint (images are "
                                                         "not read), as Gemma3ForCausalLM"),
)
