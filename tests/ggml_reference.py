"""llama.cpp's dequantization, written out in plain numpy (test reference; no `gguf` package).

Each function takes the raw bytes of a tensor as blocks, shape (n_blocks, bytes_per_block)
uint8, and returns (n_blocks, values_per_block) float32, following ggml's block structs
(ggml-common.h) and `dequantize_row_*` (ggml-quants.c). All multi-byte fields are
little-endian. Arithmetic is float32 in the same order as the C code, so results are
bit-identical to llama.cpp's scalar path.
"""

from __future__ import annotations

import numpy as np

QK = 32  # values per block for Q8_0, Q4_0, Q4_1
QK_K = 256  # values per super-block for the K-quants


def _fp16(raw: np.ndarray) -> np.ndarray:
    """A ggml_half field (2 bytes per block) -> float32, shape (n_blocks,)."""
    return np.ascontiguousarray(raw).view("<f2")[:, 0].astype(np.float32)


def _nibbles_split_halves(qs: np.ndarray) -> np.ndarray:
    """Byte j holds value j in its low nibble and value j + len(qs) in its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


# ---- 32-value blocks -------------------------------------------------------------------------

def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """block_q8_0 (34 bytes): ggml_half d; int8 qs[32].   y = qs * d"""
    d = _fp16(blocks[:, 0:2])
    qs = blocks[:, 2:34].view(np.int8).astype(np.float32)
    return qs * d[:, None]


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """block_q4_0 (18 bytes): ggml_half d; uint8 qs[16].   y = (nibble - 8) * d

    y[j] comes from the low nibble of qs[j], y[j + 16] from its high nibble.
    """
    d = _fp16(blocks[:, 0:2])
    q = _nibbles_split_halves(blocks[:, 2:18]).astype(np.int32) - 8
    return q.astype(np.float32) * d[:, None]


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """block_q4_1 (20 bytes): ggml_half d; ggml_half m; uint8 qs[16].   y = nibble * d + m"""
    d = _fp16(blocks[:, 0:2])
    m = _fp16(blocks[:, 2:4])
    q = _nibbles_split_halves(blocks[:, 4:20]).astype(np.float32)
    return q * d[:, None] + m[:, None]


# ---- 256-value super-blocks ------------------------------------------------------------------

def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for sub-blocks j = 0..7: the 6-bit scale and min packed in 12 bytes.

    j < 4:  scale = scales[j] & 63,   min = scales[j + 4] & 63
    j >= 4: scale = low nibble of scales[j + 4], top 2 bits from scales[j - 4] >> 6
            min   = high nibble of scales[j + 4], top 2 bits from scales[j] >> 6
    """
    s = scales.astype(np.int32)
    sc = np.empty((len(s), 8), np.int32)
    mn = np.empty((len(s), 8), np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j] = s[:, j] & 63
            mn[:, j] = s[:, j + 4] & 63
        else:
            sc[:, j] = (s[:, j + 4] & 0x0F) | ((s[:, j - 4] >> 6) << 4)
            mn[:, j] = (s[:, j + 4] >> 4) | ((s[:, j] >> 6) << 4)
    return sc, mn


def _low4_q45k(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K qs[128] -> (n, 8 sub-blocks, 32) low 4 bits.

    qs is 4 chunks of 32 bytes; chunk c holds sub-block 2c in its low nibbles and
    sub-block 2c + 1 in its high nibbles.
    """
    chunks = qs.reshape(len(qs), 4, 32)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(len(qs), 8, 32)


def _type1_k(d, dmin, scales, q) -> np.ndarray:
    """y = (d * scale_j) * q - (dmin * min_j) per 32-value sub-block j (the C code's order)."""
    sc, mn = _scale_min_k4(scales)
    d_j = d[:, None] * sc.astype(np.float32)  # d1/d2 in dequantize_row_q4_K
    m_j = dmin[:, None] * mn.astype(np.float32)  # m1/m2
    y = d_j[:, :, None] * q.astype(np.float32) - m_j[:, :, None]
    return y.reshape(len(q), QK_K)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """block_q4_K (144 bytes): ggml_half d; ggml_half dmin; uint8 scales[12]; uint8 qs[128]."""
    d = _fp16(blocks[:, 0:2])
    dmin = _fp16(blocks[:, 2:4])
    scales = blocks[:, 4:16]
    qs = blocks[:, 16:144]
    return _type1_k(d, dmin, scales, _low4_q45k(qs))


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """block_q5_K (176 bytes): ggml_half d; ggml_half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128].

    Like Q4_K plus a fifth bit: value l of sub-block j gets +16 when bit j of qh[l] is set
    (the C code's masks u1 = 1 << 2c and u2 = 2 << 2c for chunk c).
    """
    d = _fp16(blocks[:, 0:2])
    dmin = _fp16(blocks[:, 2:4])
    scales = blocks[:, 4:16]
    qh = blocks[:, 16:48]
    qs = blocks[:, 48:176]
    bit = np.arange(8, dtype=np.uint8)[None, :, None]  # sub-block j -> bit j
    high = (qh[:, None, :] >> bit) & 1  # (n, 8, 32)
    return _type1_k(d, dmin, scales, _low4_q45k(qs) + 16 * high)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """block_q6_K (210 bytes): uint8 ql[128]; uint8 qh[64]; int8 scales[16]; ggml_half d.

    Two halves of 128 values, each using 64 bytes of ql and 32 bytes of qh. Within a half,
    for l = 0..31 (ql, qh already offset to the half):
        value l      = low  nibble of ql[l]      | bits 0-1 of qh[l] << 4
        value l + 32 = low  nibble of ql[l + 32] | bits 2-3 of qh[l] << 4
        value l + 64 = high nibble of ql[l]      | bits 4-5 of qh[l] << 4
        value l + 96 = high nibble of ql[l + 32] | bits 6-7 of qh[l] << 4
    minus 32; value i of the super-block is scaled by d * scales[i // 16].
    """
    n = len(blocks)
    ql = blocks[:, 0:128].astype(np.int32)
    qh = blocks[:, 128:192].astype(np.int32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _fp16(blocks[:, 208:210])
    q = np.empty((n, QK_K), np.int32)
    for half in range(2):
        lo = ql[:, 64 * half : 64 * half + 64]
        hi = qh[:, 32 * half : 32 * half + 32]
        base = 128 * half
        q[:, base + 0 : base + 32] = (lo[:, 0:32] & 0x0F) | (((hi >> 0) & 3) << 4)
        q[:, base + 32 : base + 64] = (lo[:, 32:64] & 0x0F) | (((hi >> 2) & 3) << 4)
        q[:, base + 64 : base + 96] = (lo[:, 0:32] >> 4) | (((hi >> 4) & 3) << 4)
        q[:, base + 96 : base + 128] = (lo[:, 32:64] >> 4) | (((hi >> 6) & 3) << 4)
    q -= 32
    d_i = d[:, None] * scales  # d * sc[is], per 16-value group
    return (np.repeat(d_i, 16, axis=1) * q.astype(np.float32)).reshape(n, QK_K)


# qtype name -> (values per block, bytes per block, byte offsets of the fp16 fields, dequantizer)
REFERENCE = {
    "Q8_0": (QK, 34, (0,), dequantize_q8_0),
    "Q4_0": (QK, 18, (0,), dequantize_q4_0),
    "Q4_1": (QK, 20, (0, 2), dequantize_q4_1),
    "Q4_K": (QK_K, 144, (0, 2), dequantize_q4_k),
    "Q5_K": (QK_K, 176, (0, 2), dequantize_q5_k),
    "Q6_K": (QK_K, 210, (208,), dequantize_q6_k),
}
