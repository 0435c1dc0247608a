"""Weights kept quantized on the device (`quantization_encoding`, MAX's names).

A projection's weight [*in, *out] (first `n_in` axes its input) becomes `name` (the quantized
values) plus `name + "_scale"` and, for the affine q4_k and q5_k, `name + "_offset"`:

- per output channel (int8, float8_e4m3fn): scale [*out] float32; w ~ values * scale. The graph
  multiplies x by the values, then by the scale.
- grouped (q8_0, q4_0, q4_k, q5_k in groups of 32, q6_k in groups of 16): one scale (and offset) per
  `group` consecutive input values of each output channel, counted over the flattened input axes
  as llama.cpp's blocks are: scale [prod(in) / group, *out] float16; w ~ values * scale
  (+ offset). The graph dequantizes the weight in the matmul's input (`graphs.layers.projection`).
- 4-bit values (-8..7) are stored packed, two to a byte, as uint8 [prod(in) / 2, *out]: within
  each group of 32 inputs, byte j holds value j + 8 in its low nibble and value j + 16 + 8 in its
  high one (llama.cpp's Q4_0 order). Packing by hand rather than as jnp.int4 keeps the bytes
  halved on every backend and in the converted-weights cache (XLA:CPU and TensorStore do not
  hold int4 packed).
- 5- and 6-bit values (-16..15 in groups of 32, -32..31 in groups of 16) are stored as uint8
  [prod(in) * bits / 8, *out], the bits above the fourth in a plane of their own after the
  nibbles, as llama.cpp's Q5_K and Q6_K split them: in each group, the low 4 bits of each value
  + 16 (+ 32), laid out as 4-bit values are (group / 2 bytes), then 4 bytes of the bits above,
  value j's at byte group / 2 + j % 4, bit (bits - 4) * (j // 4).

Quantize-on-load (from float weights): int8, float8_e4m3fn and q8_0 scale each channel's or group's
largest magnitude to the top of the range and round to nearest; the 4-, 5- and 6-bit encodings
search a few grids per group for the least-squares scale (and offset) (`GRIDS`). GGUF tensors whose
blocks fit an encoding exactly (Q8_0 for q8_0; Q4_0 for q4_0; Q4_0, Q4_1 and Q4_K for q4_k, and
those and Q5_K for q5_k; Q6_K and Q4_0 for q6_k) are kept as they are
(`maxlike.weights.gguf_blocks`); any other tensor is dequantized and quantized again. Each
projection kind has its encoding ({kind: Encoding}): one for all, or, for a GGUF without
`quantization_encoding` on GPU and TPU, the one keeping its layers' blocks
(`maxlike.weights.loader.resolve_encodings`). Norms stay in the model's dtype, and so do the
embeddings and the LM head, except where a Pallas matmul runs the head (`with_head`): then the
vocabulary table it multiplies by is held as "head" [D, V] in q8_0 (a scale per 32 inputs: one
scale per vocabulary row moved SmolLM2's logits by up to 0.47), and the embedding table, tied or
not, as "embed" in q8_0 by rows (`ROWS`), for the rows a step gathers. Works on per-layer names
("layers.{i}.{kind}"); stacking for the layer loop comes after, scales included.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from graphs.base import WeightSpec
from maxlike.config import ConfigError

SCALE, OFFSET = "_scale", "_offset"


@dataclass(frozen=True)
class Encoding:
    name: str
    values: Any  # numpy dtype of the stored values (uint8 for packed 4-bit)
    bits: int = 8
    group: int = 0  # 0: one scale per output channel; else one per `group` inputs (flattened)
    offset: bool = False  # affine: w = values * scale + offset
    scale_dtype: Any = np.float32
    kept_gguf: tuple[str, ...] = ()  # GGUF block types stored exactly in this encoding

    @property
    def parts(self) -> tuple[str, ...]:
        """The suffixes of the arrays beside the values."""
        return (SCALE, OFFSET) if self.offset else (SCALE,)


ENCODINGS = {e.name: e for e in (
    Encoding("int8", np.int8),
    Encoding("float8_e4m3fn", ml_dtypes.float8_e4m3fn),
    Encoding("q8_0", np.int8, group=32, scale_dtype=np.float16, kept_gguf=("Q8_0",)),
    Encoding("q4_0", np.uint8, bits=4, group=32, scale_dtype=np.float16, kept_gguf=("Q4_0",)),
    Encoding("q4_k", np.uint8, bits=4, group=32, offset=True, scale_dtype=np.float16,
             kept_gguf=("Q4_0", "Q4_1", "Q4_K")),
    Encoding("q5_k", np.uint8, bits=5, group=32, offset=True, scale_dtype=np.float16,
             kept_gguf=("Q4_0", "Q4_1", "Q4_K", "Q5_K")),
    # Q6_K's scale per 16 is the product of its block's float16 and a sub-block's int8; stored as
    # one float16 (rounded), 7 bits a weight in all against Q6_K's 6.56.
    Encoding("q6_k", np.uint8, bits=6, group=16, scale_dtype=np.float16, kept_gguf=("Q6_K", "Q4_0")),
)}
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


# quantization_encoding=None on a GGUF: on accelerators, the encoding that keeps the blocks most of its
# projection weights are in (MAX reads a GGUF's encoding from the file too). On CPU the file is
# dequantized: XLA:CPU runs float weights several times faster (README, Performance).
GGUF_ENCODING = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_k", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}
KEEP_GGUF_BLOCKS = {"gpu": True, "tpu": True, "cpu": False}
GGUF_PROJECTIONS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_qkv.weight", "attn_output.weight",
                    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


# Encodings from least to most precise: a GGUF projection kind whose layers hold different block types runs in
# the most precise of their encodings (llama.cpp's Q4_K_M: Q6_K for some layers' attn_v and ffn_down).
PRECISION = ("q4_0", "q4_k", "q5_k", "q6_k", "q8_0")


def kind_of(name: str) -> str:
    """The projection kind of a per-layer or stacked weight name ("layers.3.v" -> "v")."""
    return name.rsplit(".", 1)[-1]


def plan(specs: dict[str, WeightSpec], lora_targets: dict, encodings: dict[str, str]):
    """({projection kind: Encoding}, {projection kind: input axes}, specs with the scales) for
    `encodings` ({kind: encoding name}, maxlike.weights.loader.resolve_encodings); ({}, {}, specs
    unchanged) for a float model. The projection kinds are those LoRA can target (the
    architecture's `lora_targets`)."""
    encs = {kind: ENCODINGS[name] for kind, name in encodings.items() if name in ENCODINGS}
    if not encs:
        return {}, {}, specs
    inputs = {kind: n_in for kind, n_in in lora_targets.values()}
    kinds = {kind: inputs[kind] for kind in encs}
    return encs, kinds, quantized_specs(specs, linear_inputs(specs, kinds), encs)


HEAD, HEAD_ENCODING = "head", "q8_0"
# The embedding table beside a quantized head: q8_0 by rows, [V, D] int8 values packed four to an
# int32 word ([V, D / 4], little-endian: value 4j + i in byte i of word j) and scales [V, D / 32]
# float16. Gathering one row of an int8 table makes XLA:TPU re-tile the whole table (501 MiB of
# temporaries for Llama-3.1-8B's, compiled for a v5e); of int32 words, none
# (benchmarks/probe_tpu_table_rows.py). graphs.layers.embed_rows reads it.
ROWS = Encoding("q8_0", np.int32, group=32, scale_dtype=np.float16)


def with_head(specs: dict[str, WeightSpec], encs: dict[str, Encoding], kinds: dict[str, int], table: str):
    """(specs, encs, kinds) of a model whose LM head runs quantized: HEAD [D, V] in HEAD_ENCODING
    (scale [D / 32, V]), the layout the matmul kernels read, from the vocabulary table `table`
    ("lm_head", which it replaces, or the tied "embed"); and the embedding table, tied or not, in
    `ROWS` (a tied one's numbers are the head's, transposed). `head_from_table` converts the weights."""
    vocab, d = specs[table].shape
    enc = ENCODINGS[HEAD_ENCODING]
    specs = {**{n: s for n, s in specs.items() if n != "lm_head"}, HEAD: WeightSpec((d, vocab), ("embed", "vocab"))}
    rows = {"embed": WeightSpec((vocab, d // 4), ("vocab", "embed")),
            "embed" + SCALE: WeightSpec((vocab, d // ROWS.group), ("vocab", "embed"))}
    return ({**quantized_specs(specs, {HEAD: 1}, {HEAD: enc}), **rows}, {**encs, HEAD: enc, "embed": ROWS},
            {**kinds, HEAD: 1})


def head_from_table(host: dict[str, np.ndarray], table: str, encs: dict[str, Encoding]) -> dict[str, np.ndarray]:
    """Host weights as `with_head` describes them: HEAD [D, V] and its scale from `table` [V, D],
    the embedding table in `ROWS`."""
    out = quantize_host({**host, HEAD: np.asarray(host[table], np.float32).T}, {HEAD: 1}, encs)
    rows = out if table == "embed" else quantize_host({HEAD: np.asarray(host["embed"], np.float32).T}, {HEAD: 1}, encs)
    values = np.ascontiguousarray(rows[HEAD].T)  # [V, D] int8
    out["embed"] = values.view("<i4")  # four to a word, little-endian, as graphs.layers.embed_rows unpacks them
    out["embed" + SCALE] = np.ascontiguousarray(rows[HEAD + SCALE].T)
    out.pop("lm_head", None)
    return out


def describe(encs: dict[str, Encoding]) -> str | None:
    """The encodings of a plan in words ("q4_k" when every kind shares one, else
    "q4_k (gate, k, o, q, up), q6_k (down, v)"); None for a float model."""
    by_name: dict[str, list[str]] = {}
    for kind, enc in sorted(encs.items()):
        by_name.setdefault(enc.name, []).append(kind)
    if len(by_name) <= 1:
        return next(iter(by_name), None)
    return ", ".join(f"{name} ({', '.join(kinds)})" for name, kinds in sorted(by_name.items()))


def fusable(encs: dict[str, Encoding], kinds: dict[str, int], groups: dict[str, tuple[str, ...]]):
    """(the fused weights of `groups` ({fused name: the kinds it joins}, graphs.fused.GROUPS) whose
    parts share an encoding, or are all float: fusing concatenates values and scales alike; encs
    and kinds (input axes) with those fused weights added where quantized)."""
    fused = {name: parts for name, parts in groups.items() if len({encs.get(kind) for kind in parts}) == 1}
    quantized = [name for name, parts in fused.items() if parts[0] in encs]
    return (fused, {**encs, **{name: encs[fused[name][0]] for name in quantized}},
            {**kinds, **{name: 1 for name in quantized}})


def linear_inputs(specs: dict[str, WeightSpec], kinds: dict[str, int]) -> dict[str, int]:
    """The projection weights among per-layer `specs` (kind in `kinds`: kind -> input axes)."""
    return {name: kinds[kind_of(name)] for name in specs
            if name.startswith("layers.") and kind_of(name) in kinds}


def quantized_specs(specs: dict[str, WeightSpec], inputs: dict[str, int], encs: dict[str, Encoding]
                    ) -> dict[str, WeightSpec]:
    """`specs` plus each projection's scale (and offset) in its kind's encoding: per channel, its
    shape and axes without the input axes; grouped, one leading axis of groups named as the first
    input axis."""
    out = dict(specs)
    for name, n_in in inputs.items():
        spec, enc = specs[name], encs[kind_of(name)]
        if enc.group:
            size = math.prod(spec.shape[:n_in])
            if size % enc.group:
                raise ConfigError(f"quantization_encoding={enc.name!r} quantizes {enc.group} input values at a time, "
                                  f"and {name} has {size} inputs: use int8 or float8_e4m3fn for this model.")
            part = WeightSpec((size // enc.group, *spec.shape[n_in:]), (spec.axes[0], *spec.axes[n_in:]))
            if enc.bits < 8:  # packed (module doc)
                out[name] = WeightSpec((size * enc.bits // 8, *spec.shape[n_in:]), part.axes)
        else:
            part = WeightSpec(spec.shape[n_in:], spec.axes[n_in:])
        out.update({name + suffix: part for suffix in enc.parts})
    return out


def dtype_of(name: str, encs: dict[str, Encoding], dtype):
    """A parameter's dtype (encs: {projection kind: Encoding}, empty for a float model): the kind's
    encoding's values for those projections (per layer or stacked), its scale dtype for their
    scales and offsets, else `dtype`."""
    kind = kind_of(name)
    if kind in encs:
        return np.dtype(encs[kind].values)
    for suffix in (SCALE, OFFSET):
        if kind.endswith(suffix) and kind[: -len(suffix)] in encs:
            return np.dtype(encs[kind[: -len(suffix)]].scale_dtype)
    return np.dtype(dtype)


def _grouped(w: np.ndarray, n_in: int, group: int) -> np.ndarray:
    """[*in, *out] -> [groups, group, *out] (groups over the flattened input axes)."""
    return w.reshape(-1, group, *w.shape[n_in:])


def quantize(w: np.ndarray, n_in: int, enc: Encoding) -> dict[str, np.ndarray]:
    """{"": values, "_scale": ..., ["_offset": ...]} of a float weight whose first `n_in` axes are
    its input, rounded to nearest (as llama.cpp's reference quantizers for the grouped ones)."""
    w = np.asarray(w, np.float32)
    if not enc.group:
        top = FP8_MAX if enc.values == ml_dtypes.float8_e4m3fn else 127.0
        scale = np.abs(w).max(axis=tuple(range(n_in))) / top
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        if enc.values == ml_dtypes.float8_e4m3fn:
            return {"": (w / scale).astype(enc.values), SCALE: scale}
        return {"": np.clip(np.rint(w / scale), -127, 127).astype(np.int8), SCALE: scale}
    g = _grouped(w, n_in, enc.group)
    if enc.bits == 8:  # q8_0 as llama.cpp's: the largest magnitude maps to 127
        scale = (np.abs(g).max(axis=1) / 127).astype(enc.scale_dtype)
        scale = np.where(scale == 0, np.ones_like(scale), scale)
        q = np.clip(np.rint(g / scale[:, None].astype(np.float32)), -127, 127)
        return {"": q.astype(np.int8).reshape(w.shape), SCALE: scale}
    mid = 1 << (enc.bits - 1)
    if enc.offset:
        scale, low = _in_chunks(_fit_affine, g, 2 * mid - 1)  # w = level * scale + low, levels 0..2 mid - 1
        scale = _nonzero(scale.astype(enc.scale_dtype))
        offset = (low + mid * scale.astype(np.float32)).astype(enc.scale_dtype)
        parts = {SCALE: scale, OFFSET: offset}
        q = (g - offset[:, None].astype(np.float32)) / scale[:, None].astype(np.float32)
    else:
        parts = {SCALE: _nonzero(_in_chunks(_fit_symmetric, g, mid).astype(enc.scale_dtype))}
        q = g / parts[SCALE][:, None].astype(np.float32)
    return {"": np.clip(np.rint(q), -mid, mid - 1).astype(np.int8).reshape(w.shape), **parts}


# Quantize-on-load tries these grids around the plain one (the group's extreme on the grid's last level) and keeps,
# per group, the one whose least-squares scale (and offset) fits best: the search of llama.cpp's make_qx_quants and
# make_qkx2_quants, with fewer grids. On SmolLM2's weights and on Student-t(5) noise, five grids gave within 1% of
# the root-mean-square error of 19 (llama.cpp's count) in 18-30% of the time: 0.87-0.96 of rounding to nearest.
GRIDS = (-0.8, -0.4, 0.0, 0.4, 0.8)


CHUNK = 1 << 20  # values a thread fits at a time: numpy's passes over them stay in cache, and the threads share them


def _in_chunks(fit, g: np.ndarray, *args):
    """fit(groups, *args) over runs of about CHUNK values of g [groups, group, *out] in threads
    (numpy releases the GIL in its loops), joined along the groups."""
    step = max(1, CHUNK // math.prod(g.shape[1:]))
    runs = [g[i:i + step] for i in range(0, len(g), step)]
    with ThreadPoolExecutor(max(1, min(len(runs), os.cpu_count() or 1))) as pool:
        fits = list(pool.map(lambda run: fit(run, *args), runs))
    if isinstance(fits[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*fits))
    return np.concatenate(fits)


def _nonzero(scale: np.ndarray) -> np.ndarray:
    return np.where(scale == 0, np.ones_like(scale), scale)


def _fit_symmetric(g: np.ndarray, mid: int) -> np.ndarray:
    """Groups g [groups, group, *out] -> scales [groups, *out] for values -mid..mid - 1: per grid,
    the value of largest magnitude maps to -(mid + the grid's shift), the others round to that
    grid, and the scale is their least-squares one (sum(x * l) / sum(l * l)); the grid whose fit
    leaves the least squared error wins."""
    peak = np.take_along_axis(g, np.abs(g).argmax(axis=1)[:, None], axis=1)  # signed
    inverse = 1 / np.where(peak == 0, 1, peak)
    best = scale = None
    for shift in GRIDS:
        levels = np.clip(np.rint(g * (inverse * -(mid + shift))), -mid, mid - 1)
        xl, ll = (g * levels).sum(axis=1), (levels * levels).sum(axis=1)
        ll = np.where(ll == 0, 1, ll)
        gain = xl * xl / ll  # the squared error is sum(x * x) - gain
        fit = xl / ll
        if best is None:
            best, scale = gain, fit
        else:
            better = gain > best
            best, scale = np.where(better, gain, best), np.where(better, fit, scale)
    return scale


def _fit_affine(g: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Groups g [groups, group, *out] -> (scale, lowest value) [groups, *out] for levels 0..top:
    per grid, the group's range spans top + the grid's shift levels, the values round to it, and
    scale and lowest are the least-squares line through (level, value); the grid whose line
    leaves the least squared error wins."""
    lo, hi = g.min(axis=1), g.max(axis=1)
    span = np.where(hi > lo, hi - lo, 1)
    n, sx, sxx = g.shape[1], g.sum(axis=1), (g * g).sum(axis=1)
    best = scale = low = None
    for shift in GRIDS:
        levels = np.clip(np.rint((g - lo[:, None]) * ((top + shift) / span)[:, None]), 0, top)
        sl, sll, sxl = levels.sum(axis=1), (levels * levels).sum(axis=1), (g * levels).sum(axis=1)
        det = n * sll - sl * sl
        ok = det > 0  # else every value on one level: the range's own line
        a = np.where(ok, (n * sxl - sl * sx) / np.where(ok, det, 1), span / top)
        a = np.where(a > 0, a, span / top)
        b = np.where(ok, (sx - a * sl) / n, lo)
        err = sxx + a * a * sll + n * b * b - 2 * a * sxl - 2 * b * sx + 2 * a * b * sl
        if best is None:
            best, scale, low = err, a, b
        else:
            better = err < best
            best, scale, low = np.where(better, err, best), np.where(better, a, scale), np.where(better, b, low)
    return scale, low


def pack(values: np.ndarray, n_in: int, enc: Encoding) -> np.ndarray:
    """4-, 5- or 6-bit values (int8 around 0) [*in, *out] -> uint8 [prod(in) * bits / 8, *out]
    (module doc)."""
    g = (_grouped(values, n_in, enc.group) + (1 << (enc.bits - 1))).astype(np.uint8)
    half, extra = enc.group // 2, enc.bits - 4
    out = (g[:, :half] & 15) | ((g[:, half:] & 15) << 4)
    if extra:  # the top bits: 4 bytes, value j's at byte j % 4, bit extra * (j // 4)
        top = g >> 4
        planes = [top[:, 4 * i: 4 * i + 4] << (extra * i) for i in range(8 // extra)]
        out = np.concatenate([out, np.bitwise_or.reduce(planes)], axis=1)
    return out.reshape(-1, *values.shape[n_in:])


def quantize_host(host: dict[str, np.ndarray], inputs: dict[str, int], encs: dict[str, Encoding]
                  ) -> dict[str, np.ndarray]:
    """Host weights -> quantized projections with their scales, as stored, each in its kind's
    encoding (projections kept quantized from the checkpoint arrive with their scales; the rest
    unchanged)."""
    out = dict(host)
    for name, n_in in inputs.items():
        enc = encs[kind_of(name)]
        if name + SCALE not in host:
            out.update({name + suffix: a for suffix, a in quantize(host[name], n_in, enc).items()})
        if enc.bits < 8:
            out[name] = pack(out[name], n_in, enc)
        else:
            out[name] = np.asarray(out[name]).astype(enc.values)
    return out


def in_layout(parts: dict[str, np.ndarray], convert, n_in: int, enc: Encoding) -> dict[str, np.ndarray]:
    """A kept GGUF tensor's parts in HF layout (values [out, in]; scales [out, in / its block's
    group]) -> ours, through the weight's own conversion (transposes, reshapes, row permutations):
    each scale is spread over its block's group, converted as the weight is, then taken once per
    group of the encoding (which divides the block's: Q4_0's 32 into q6_k's 16)."""
    out = {"": convert(parts[""])}
    for suffix in enc.parts:
        spread = convert(np.repeat(parts[suffix], parts[""].shape[-1] // parts[suffix].shape[-1], axis=-1))
        out[suffix] = _grouped(spread, n_in, enc.group)[:, 0]
    return out
