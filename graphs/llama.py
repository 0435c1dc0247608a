"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3, Phi-3/3.5, SmolLM2, and the
mixture-of-experts members Mixtral and Qwen3-MoE.

One decoder; the family members differ only in config (qkv bias, tied
embeddings, RoPE scaling, q/k norms, sliding windows, experts in place of the
MLP: graphs.moe), so each is a registry entry, not a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax

from graphs.base import Architecture, UnsupportedConfigError, WeightSpec, require, run_layers
from graphs.fused import gate_up, qkv
from graphs.attention import paged_attention, write_kv
from graphs.layers import adapter_mask, embed_rows, head_logits, kernel_weights, projection, rms_norm
from graphs.llama_checkpoint import checkpoint_names
from graphs.moe import ExpertRun, MoESpec, expert_specs, moe_from_hf, moe_mlp
from graphs.rope import RopeSpec, apply_rope, hf_rope_parameters, rope_from_hf


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
    rope: RopeSpec
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    max_position_embeddings: int
    sliding_window: int | None  # the widest window of any layer; None: every layer attends to everything
    layer_windows: tuple[int, ...]  # per layer: attention reaches this many tokens (itself included); 0: all
    qk_norm: bool  # Qwen3: RMSNorm over each q and k head before RoPE
    fused_checkpoint: bool  # Phi-3: the checkpoint holds qkv_proj and gate_up_proj (split at load)
    gguf_qk_permuted: bool  # checkpoint format: llama.cpp permutes q/k rows of Llama-arch GGUFs
    moe: MoESpec | None = None  # Mixtral, Qwen3-MoE: the layers whose MLP is a mixture of experts


def layer_windows(hf: Any, num_layers: int, window: int | None) -> tuple[int, ...]:
    """Each layer's window from HF's `layer_types` ("sliding_attention" / "full_attention"); without
    it, every layer slides when the config has a window."""
    if not window:
        return (0,) * num_layers
    types = getattr(hf, "layer_types", None)
    if types is None:
        return (int(window),) * num_layers
    if len(types) != num_layers:
        raise UnsupportedConfigError(f"layer_types has {len(types)} entries for {num_layers} layers: fix the config.")
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise UnsupportedConfigError(f"layer_types {unknown} are not built: maxlike runs sliding_attention and "
                                     "full_attention layers.")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)


def config_from_hf(hf: Any) -> LlamaConfig:
    """The one converter from an HF config (Llama, Mistral, Qwen2, Qwen3) to ours."""
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(f"hidden_act={act!r} is not built yet: the Llama graph uses SwiGLU (silu).")
    if getattr(hf, "mlp_bias", False):
        raise UnsupportedConfigError("mlp_bias=True is not built yet in the Llama graph.")
    model_type = getattr(hf, "model_type", "llama")
    attention_bias = bool(getattr(hf, "attention_bias", False))
    window = getattr(hf, "sliding_window", None)
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not getattr(hf, "use_sliding_window", False):
        window = None
    arch = (getattr(hf, "architectures", None) or ["the Llama graph"])[0]
    need = {name: require(hf, name, arch) for name in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                       "num_attention_heads", "intermediate_size", "rms_norm_eps",
                                                       "max_position_embeddings")}
    heads = need["num_attention_heads"]
    head_dim = getattr(hf, "head_dim", None) or need["hidden_size"] // heads
    windows = layer_windows(hf, need["num_hidden_layers"], window)
    return LlamaConfig(
        vocab_size=need["vocab_size"],
        hidden_size=need["hidden_size"],
        num_layers=need["num_hidden_layers"],
        q_heads=heads,
        kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=need["intermediate_size"],
        rms_norm_eps=float(need["rms_norm_eps"]),
        rope=rope_from_hf(hf_rope_parameters(hf), head_dim, need["max_position_embeddings"], arch),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        max_position_embeddings=need["max_position_embeddings"],
        sliding_window=max(windows) or None,
        layer_windows=windows,
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        fused_checkpoint=model_type == "phi3",
        gguf_qk_permuted=model_type in ("llama", "mistral", "mixtral"),
        moe=moe_from_hf(hf, need["num_hidden_layers"]),
    )


def weight_specs(cfg: LlamaConfig) -> dict[str, WeightSpec]:
    d, h, kv, hd, f = cfg.hidden_size, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate_size
    specs = {"embed": WeightSpec((cfg.vocab_size, d), ("vocab", "embed")), "final_norm": WeightSpec((d,), ("embed",))}
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = WeightSpec((cfg.vocab_size, d), ("vocab", "embed"))
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        specs.update({
            p + "attn_norm": WeightSpec((d,), ("embed",)),
            p + "q": WeightSpec((d, h, hd), ("embed", "q_heads", "head_dim")),
            p + "k": WeightSpec((d, kv, hd), ("embed", "kv_heads", "head_dim")),
            p + "v": WeightSpec((d, kv, hd), ("embed", "kv_heads", "head_dim")),
            p + "o": WeightSpec((h, hd, d), ("q_heads", "head_dim", "embed")),
            p + "mlp_norm": WeightSpec((d,), ("embed",)),
        })
        if cfg.moe is not None and cfg.moe.layers[i]:
            specs.update({p + kind: spec for kind, spec in expert_specs(cfg.moe, d).items()})
        else:
            specs.update({p + "gate": WeightSpec((d, f), ("embed", "mlp")),
                          p + "up": WeightSpec((d, f), ("embed", "mlp")),
                          p + "down": WeightSpec((f, d), ("mlp", "embed"))})
        if cfg.qkv_bias:
            specs[p + "q_bias"] = WeightSpec((h, hd), ("q_heads", "head_dim"))
            specs[p + "k_bias"] = WeightSpec((kv, hd), ("kv_heads", "head_dim"))
            specs[p + "v_bias"] = WeightSpec((kv, hd), ("kv_heads", "head_dim"))
        if cfg.o_bias:
            specs[p + "o_bias"] = WeightSpec((d,), ("embed",))
        if cfg.qk_norm:
            specs[p + "q_norm"] = WeightSpec((hd,), ("head_dim",))
            specs[p + "k_norm"] = WeightSpec((hd,), ("head_dim",))
    return specs


def forward(cfg: LlamaConfig, w: dict, kv: list, tokens, positions, slots, page_table, *, backend: str = "cpu",
            scan: bool = False, adapters=None, attention="xla", experts: ExpertRun | None = None, matmul="xla"):
    """tokens/positions/slots [B, T]; page_table [B, P]; kv: the pool's (k_pages, v_pages)
    pairs. `backend` (the mesh's platform) picks the op variants that are fast there;
    `scan` runs the layers as one loop over stacked weights (see graphs.base.run_layers).
    adapters [B, T]: each token's LoRA slot (0: none), with the slots' weights in `w` as
    "{projection}_lora_a" / "_lora_b" per layer (maxlike.pipelines.lora). `attention`: the decode
    attention kernel ("xla", "pallas", or a graphs.attention.AttentionRun with the mesh; see
    graphs.attention.paged_attention). `experts`: how MoE layers compute their experts
    (graphs.moe.ExpertRun: kernel and mesh). `matmul`: how grouped weights' products run
    ("xla", "pallas", or a graphs.layers.MatmulRun with the mesh; see graphs.layers.projection)."""
    proj = projection(adapter_mask(w, adapters), matmul, backend)

    def layer(x, lw, k_pages, v_pages, index):
        with jax.named_scope("attention"):
            h = rms_norm(x, lw["attn_norm"], cfg.rms_norm_eps)
            q, k, v = qkv(proj, h, lw)  # [B, T, H, K], [B, T, KV, K] x 2
            if cfg.qkv_bias:
                q, k, v = q + lw["q_bias"], k + lw["k_bias"], v + lw["v_bias"]
            if cfg.qk_norm:
                q, k = rms_norm(q, lw["q_norm"], cfg.rms_norm_eps), rms_norm(k, lw["k_norm"], cfg.rms_norm_eps)
            q = apply_rope(q, positions, cfg.rope)
            k = apply_rope(k, positions, cfg.rope)
            k_pages = write_kv(k_pages, k, slots, index, backend=backend)
            v_pages = write_kv(v_pages, v, slots, index, backend=backend)
            a = paged_attention(q, k_pages, v_pages, page_table, positions, index, backend=backend,
                                window=lw.get("window"), kernel=attention, max_window=cfg.sliding_window)
            a = proj("bthk,hkd->btd", a, lw, "o", 2)
            if cfg.o_bias:
                a = a + lw["o_bias"]
            x = x + a
        with jax.named_scope("mlp"):
            h = rms_norm(x, lw["mlp_norm"], cfg.rms_norm_eps)
            if "router" in lw:
                x = x + moe_mlp(h, lw, cfg.moe, experts)
            else:
                g, u = gate_up(proj, h, lw)
                x = x + proj("btf,fd->btd", jax.nn.silu(g) * u, lw, "down")
        return x, k_pages, v_pages

    x = embed_rows(w, tokens, w["final_norm"].dtype)  # [B, T, D]
    x, kv = run_layers(layer, x, w, kv, cfg.num_layers, scan=scan,
                       per_layer={"window": cfg.layer_windows} if cfg.sliding_window else None,
                       whole=kernel_weights(w, matmul))
    return rms_norm(x, w["final_norm"], cfg.rms_norm_eps), kv


def lm_head(cfg: LlamaConfig, w: dict, hidden: jax.Array, *, matmul="xla", backend: str = "cpu") -> jax.Array:
    return head_logits(w, hidden, cfg.tie_word_embeddings, matmul, backend)


# LoRA: PEFT's module name -> (our weight kind, how many leading axes of it are the input).
LORA_TARGETS = {"q_proj": ("q", 1), "k_proj": ("k", 1), "v_proj": ("v", 1), "o_proj": ("o", 2),
                "gate_proj": ("gate", 1), "up_proj": ("up", 1), "down_proj": ("down", 1)}


def kv_shape(cfg: LlamaConfig) -> tuple[int, int, int]:
    return cfg.num_layers, cfg.kv_heads, cfg.head_dim


# What every architecture shares: where tensor parallelism is allowed, the RoPE variants.
COMMON_FEATURES = ("tensor parallel: degrees dividing the attention heads (KV heads split, or repeated when fewer "
                   "than the degree); RoPE default, linear, dynamic, llama3, yarn, longrope, partial rotary; "
                   "safetensors and GGUF")


def _arch(name: str, model_types: tuple[str, ...], features: str) -> Architecture:
    return Architecture(name, model_types, config_from_hf, weight_specs, checkpoint_names, kv_shape, forward, lm_head,
                        lora_targets=LORA_TARGETS, features=f"{features}; {COMMON_FEATURES}",
                        quantized_head=True)


LLAMA_FAMILY = (
    _arch("LlamaForCausalLM", ("llama",), "optional attention biases, tied embeddings, LoRA"),
    _arch("MistralForCausalLM", ("mistral",), "sliding-window attention on every layer"),
    _arch("Qwen2ForCausalLM", ("qwen2",), "q/k/v biases; sliding window on the layers layer_types names"),
    _arch("Qwen3ForCausalLM", ("qwen3",), "q/k norms, explicit head_dim; sliding window on the layers "
                                          "layer_types names"),
    _arch("Phi3ForCausalLM", ("phi3",), "fused qkv_proj and gate_up_proj split at load, LongRoPE (short and long "
                                        "factors), sliding window"),
    _arch("MixtralForCausalLM", ("mixtral",), "mixture of experts (softmax, top-k, renormalized), expert parallel; "
                                              "sliding window"),
    _arch("Qwen3MoeForCausalLM", ("qwen3_moe",), "mixture of experts (top-k, norm_topk_prob), dense layers by "
                                                 "mlp_only_layers / decoder_sparse_step, expert parallel; q/k norms"),
)
