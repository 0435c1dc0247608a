"""llama.cpp's quantized blocks kept as they are: raw GGUF blocks -> values, scales and offsets.

A tensor [rows, cols] quantized in blocks along cols becomes, in HF layout:
values [rows, cols] (int8: Q8_0's values, a 4-, 5- or 6-bit value minus 8, 16 or 32: -8..7,
-16..15, -32..31), scale and offset [rows, cols / group] float32, with w = values * scale
(+ offset) per `group` consecutive columns (32; Q6_K's sub-blocks: 16). That is
`maxlike.weights.quantize`'s grouped form, so the device holds the file's own numbers (scales
rounded to float16). Block layouts: ggml-common.h; all fields little-endian.
"""

from __future__ import annotations

import numpy as np


def _half(raw: np.ndarray) -> np.ndarray:
    """Two bytes per block (ggml_half) -> float32 [..., 1]."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values 0..15: the low nibbles are values 0..15, the high ones 16..31."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int8)


def _q8_0(b):  # d, qs[32]
    return b[..., 2:].view(np.int8), _half(b[..., 0:2]), None


def _q4_0(b):  # d, qs[16]: w = d * (q - 8)
    return _nibbles(b[..., 2:]) - 8, _half(b[..., 0:2]), None


def _q4_1(b):  # d, m, qs[16]: w = d * q + m = d * (q - 8) + (m + 8 d)
    d = _half(b[..., 0:2])
    return _nibbles(b[..., 4:]) - 8, d, _half(b[..., 2:4]) + 8 * d


def _q4_k(b, qs_at: int = 16, high=None):
    """block_q4_K (256 values): d, dmin, 12 bytes of 6-bit sub-block scales and mins, qs[128].
    Sub-block j (32 values): w = d * sc_j * q - dmin * m_j, q 0..15; qs holds sub-blocks 2c and
    2c + 1 in the low and high nibbles of bytes 32c..32c + 31. Q5_K (`high`: each value's fifth
    bit, [..., 8, 32]) is the same with q 0..31 and qs after its qh."""
    d, dmin = _half(b[..., 0:2]), _half(b[..., 2:4])
    s = b[..., 4:16].astype(np.int32)
    low, high_bits = s[..., 0:4], s[..., 4:8]
    top = s[..., 8:12]
    sc = np.concatenate([low & 63, (top & 15) | ((low >> 6) << 4)], axis=-1)  # [..., 8]
    mn = np.concatenate([high_bits & 63, (top >> 4) | ((high_bits >> 6) << 4)], axis=-1)
    qs = b[..., qs_at:qs_at + 128].reshape(*b.shape[:-1], 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=-2).reshape(*b.shape[:-1], 8, 32)
    mid = 8 if high is None else 16  # values minus the middle of their range: -8..7, -16..15
    q = (q if high is None else q | (high << 4)).astype(np.int8) - mid
    scale = d * sc.astype(np.float32)  # [..., 8]
    return q, scale[..., None], (mid * scale - dmin * mn.astype(np.float32))[..., None]


def _q5_k(b):
    """block_q5_K (256 values): d, dmin, 12 bytes of scales and mins as Q4_K's, qh[32], qs[128]:
    Q4_K's values plus a fifth bit, bit j of qh[l] for value l of sub-block j."""
    qh = b[..., 16:48]
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [..., 8, 32]
    return _q4_k(b, qs_at=48, high=high)


def _q6_k(b):
    """block_q6_K (256 values): ql[128], qh[64], 16 int8 sub-block scales, d. w = d * sc_j * (q - 32)
    per 16 values. Each half of 128 values takes 64 bytes of ql and 32 of qh; in it, value
    32 k + l (k = 0..3, l = 0..31) has its low 4 bits in the low (k < 2) or high nibble of
    ql[l + 32 (k % 2)] and its top 2 bits at bit 2 k of qh[l]."""
    ql = b[..., 0:128].reshape(*b.shape[:-1], 2, 1, 64)
    low = np.concatenate([ql & 15, ql >> 4], axis=-2).reshape(*b.shape[:-1], 2, 4, 32)
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 1, 32)
    top = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [..., 2, 4, 32]
    q = (low | (top << 4)).astype(np.int8).reshape(*b.shape[:-1], 16, 16) - 32
    scale = _half(b[..., 208:210]) * b[..., 192:208].view(np.int8).astype(np.float32)  # [..., 16]
    return q, scale[..., None], None


# GGUF type -> (bytes per block, values per block, values per scale, decoder)
BLOCKS = {"Q8_0": (34, 32, 32, _q8_0), "Q4_0": (18, 32, 32, _q4_0), "Q4_1": (20, 32, 32, _q4_1),
          "Q4_K": (144, 256, 32, _q4_k), "Q5_K": (176, 256, 32, _q5_k), "Q6_K": (210, 256, 16, _q6_k)}


def decode(raw: np.ndarray, qtype: str, rows: int, cols: int) -> dict[str, np.ndarray]:
    """A tensor's raw bytes -> {"": values [rows, cols] int8, "_scale": [rows, cols / group] float32,
    "_offset": the same (zeros when the type has none)}, group the type's values per scale."""
    nbytes, per_block, group, fn = BLOCKS[qtype]
    blocks = np.asarray(raw, np.uint8).reshape(rows, cols // per_block, nbytes)
    values, scale, offset = fn(blocks)
    groups = cols // group
    scale = np.broadcast_to(scale, (*values.shape[:-1], 1)).reshape(rows, groups)
    offset = np.zeros_like(scale) if offset is None else offset.reshape(rows, groups)
    return {"": values.reshape(rows, cols), "_scale": scale, "_offset": offset}
