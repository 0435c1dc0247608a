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


def _writer(path, arch: str, c) -> gguf.GGUFWriter:
    """A GGUF writer holding the metadata every architecture has (llama.cpp's keys)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    return w


def write_llama_gguf(path, hf_config, state_dict: dict[str, np.ndarray], qtype: str = "F32",
                     extra_tensors: dict | None = None, qtypes: dict[str, str] | None = None) -> None:
    """`qtype` for every 2-D tensor, or `qtypes[gguf name]` where given (a mixed file, as llama.cpp's
    Q4_K_M: Q6_K for some layers' attn_v and ffn_down)."""
    c = hf_config
    w = _writer(path, "llama", c)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    for name, arr in state_dict.items():
        arr = np.asarray(arr, np.float32)
        if name.endswith("q_proj.weight"):
            arr = permute(arr, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            arr = permute(arr, c.num_key_value_heads)
        kind = gguf.GGMLQuantizationType[(qtypes or {}).get(gguf_name(name), qtype) if arr.ndim == 2 else "F32"]
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), arr)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(name), arr.astype(np.float16))
        elif kind == gguf.GGMLQuantizationType.Q4_K:  # the gguf package has no Q4_K quantizer
            w.add_tensor(gguf_name(name), quantize_q4_k(arr), raw_dtype=kind)
        elif kind == gguf.GGMLQuantizationType.Q5_K:  # nor Q5_K
            w.add_tensor(gguf_name(name), quantize_q4_k(arr, bits=5), raw_dtype=kind)
        elif kind == gguf.GGMLQuantizationType.Q6_K:  # nor Q6_K
            w.add_tensor(gguf_name(name), quantize_q6_k(arr), raw_dtype=kind)
        else:
            w.add_tensor(gguf_name(name), quantize(arr, kind), raw_dtype=kind)
    for name, (raw, kind) in (extra_tensors or {}).items():
        w.add_tensor(name, raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_q4_k(w: np.ndarray, bits: int = 4) -> np.ndarray:
    """[rows, cols] float32 -> Q4_K blocks [rows, cols / 256 * 144] uint8 (block_q4_K in ggml-common.h):
    per 32 values, w ~ d * sc * q - dmin * m with q 0..15 and 6-bit sc, m per sub-block. A plain
    round-to-nearest quantizer (llama.cpp searches for better scales); enough for a valid file.
    bits=5: Q5_K (176 bytes a block), q 0..31, its fifth bits in qh[32] before qs (value l of
    sub-block j: bit j of qh[l])."""
    rows, cols = w.shape
    top = (1 << bits) - 1
    b = w.reshape(rows, cols // 256, 8, 32)
    sub_min = -np.minimum(b.min(-1), 0)  # [rows, blocks, 8] >= 0
    sub_scale = (b.max(-1) + sub_min) / top
    d = (sub_scale.max(-1) / 63).astype(np.float16)
    dmin = (sub_min.max(-1) / 63).astype(np.float16)
    d, dmin = np.where(d == 0, np.float16(1), d), np.where(dmin == 0, np.float16(1), dmin)
    sc = np.clip(np.rint(sub_scale / d[..., None].astype(np.float32)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(sub_min / dmin[..., None].astype(np.float32)), 0, 63).astype(np.uint8)
    step = (d[..., None].astype(np.float32) * sc)[..., None]
    low = (dmin[..., None].astype(np.float32) * mn)[..., None]
    q = np.clip(np.rint((b + low) / np.where(step == 0, 1, step)), 0, top).astype(np.uint8)  # [rows, blocks, 8, 32]
    scales = np.concatenate([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                             (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], axis=-1)  # 12 bytes
    qs = ((q[..., 0::2, :] & 15) | ((q[..., 1::2, :] & 15) << 4)).reshape(rows, cols // 256, 128)
    halves = np.stack([d, dmin], axis=-1).view(np.uint8)  # [rows, blocks, 4]
    qh = [np.bitwise_or.reduce((q >> 4) << np.arange(8, dtype=np.uint8)[:, None], axis=-2)] if bits == 5 else []
    return np.concatenate([halves, scales, *qh, qs], axis=-1).reshape(rows, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """[rows, cols] float32 -> Q6_K blocks [rows, cols / 256 * 210] uint8 (block_q6_K in ggml-common.h):
    w ~ d * sc_j * (q - 32) per 16 values, q 0..63, sc_j int8, d float16. Round to nearest; each
    sub-block's value of largest magnitude maps to -32. In each half of 128 values, value 32 k + l
    keeps its low 4 bits in ql[32 (k % 2) + l] (low nibble for k < 2, high after) and its top 2 bits
    at bit 2 k of qh[l]."""
    rows, cols = w.shape
    b = w.reshape(rows, cols // 256, 16, 16)
    peak = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], axis=-1)[..., 0]
    sub = peak / -32  # [rows, blocks, 16]
    d = (np.abs(sub).max(-1) / 127).astype(np.float16)
    d = np.where(d == 0, np.float16(1), d)
    sc = np.clip(np.rint(sub / d[..., None].astype(np.float32)), -128, 127).astype(np.int8)
    step = (d[..., None].astype(np.float32) * sc)[..., None]
    q = (np.clip(np.rint(b / np.where(step == 0, 1, step)), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(rows, cols // 256, 2, 4, 32)  # [.., half, k, l]
    ql = np.concatenate([q[:, :, :, 0] & 15 | (q[:, :, :, 2] & 15) << 4,
                         q[:, :, :, 1] & 15 | (q[:, :, :, 3] & 15) << 4], axis=-1)  # [.., half, 64]
    top = q >> 4
    qh = top[:, :, :, 0] | top[:, :, :, 1] << 2 | top[:, :, :, 2] << 4 | top[:, :, :, 3] << 6  # [.., half, 32]
    return np.concatenate([ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), sc.view(np.uint8),
                           d[..., None].view(np.uint8)], axis=-1).reshape(rows, -1)


# What llama.cpp's converter calls each layer tensor of the other architectures (HF suffix -> GGUF).
COMMON_LAYER = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
                "self_attn.k_norm.weight": "attn_k_norm.weight", "input_layernorm.weight": "attn_norm.weight",
                "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                "mlp.down_proj.weight": "ffn_down.weight"}
ARCH_LAYER = {
    "qwen3": {"post_attention_layernorm.weight": "ffn_norm.weight"},
    "phi3": {"post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.qkv_proj.weight": "attn_qkv.weight",
             "mlp.gate_up_proj.weight": "ffn_up.weight"},
    "qwen3moe": {"post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate.weight": "ffn_gate_inp.weight"},
    "gemma2": {"post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight"},
}
ARCH_LAYER["gemma3"] = ARCH_LAYER["gemma2"]
ARCH_LAYER["llama"] = ARCH_LAYER["qwen3moe"]  # Mixtral


def _experts(name: str, arr: np.ndarray) -> dict[str, np.ndarray]:
    """transformers' stacked experts -> llama.cpp's ffn_{gate,up,down}_exps (the same [E, out, in] rows)."""
    prefix = name.split("mlp.experts.")[0].replace("model.layers.", "blk.")
    if name.endswith("gate_up_proj"):
        gate, up = np.split(arr, 2, axis=1)
        return {prefix + "ffn_gate_exps.weight": gate, prefix + "ffn_up_exps.weight": up}
    return {prefix + "ffn_down_exps.weight": arr}


def write_arch_gguf(path, arch: str, hf_model, experts_qtype: str = "F32") -> None:
    """A llama.cpp-style F32 GGUF of a tiny HF Qwen3 / Gemma 2 / Gemma 3 / Phi-3 / Qwen3-MoE, or a Mixtral
    as llama.cpp writes it (arch "llama" with experts, q/k rows permuted) (no vocabulary): its metadata
    keys, its tensor names, and Gemma's norm weights stored with the 1 of (1 + w) added. Expert stacks
    are stored as `experts_qtype` (F32, or a type the gguf package quantizes, e.g. Q8_0)."""
    c = hf_model.config
    w = _writer(path, arch, c)
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if arch == "gemma3":
        w.add_array(f"{arch}.attention.sliding_window_pattern", [t == "sliding_attention" for t in c.layer_types])
    names = {**COMMON_LAYER, **ARCH_LAYER[arch]}
    for name, tensor in hf_model.state_dict().items():
        arr = tensor.numpy().astype(np.float32)
        if "mlp.experts." in name:
            kind = gguf.GGMLQuantizationType[experts_qtype]
            for target, part in _experts(name, arr).items():
                part = np.ascontiguousarray(part)
                if kind == gguf.GGMLQuantizationType.F32:
                    w.add_tensor(target, part)
                else:
                    w.add_tensor(target, quantize(part, kind), raw_dtype=kind)
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            arr = permute(arr, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        if name in GGUF_NAMES:
            target = GGUF_NAMES[name]
        else:
            _, _, i, rest = name.split(".", 3)
            target = f"blk.{i}.{names[rest]}"
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            arr = arr + 1
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp drops a tied output matrix
        w.add_tensor(target, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
