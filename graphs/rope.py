"""Rotary position embeddings and the scaling variants HF configs name.

`RopeSpec` is what a config holds (hashable: it is part of cache keys); its
`frequencies()` are the inverse frequencies [head_dim // 2] and the factor HF
multiplies cos and sin by ("attention scaling": yarn and longrope). Two variants
depend on how long sequences get: `dynamic` (NTK) grows its base past
max_position_embeddings and `longrope` switches from its short to its long factors
past original_max_position_embeddings. HF decides that per forward call from the
positions it sees, so a sequence's early keys and late keys can be rotated
differently; here it is decided once from the longest sequence the pipeline serves
(`length`, set by the runtime through `graphs.base.at_length`), as vLLM does for
longrope: every key of every sequence uses the same frequencies, and a model served
within its original length behaves exactly as HF.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graphs.base import UnsupportedConfigError

# rope_type -> the parameters it reads (beyond rope_theta), with those it cannot do without first.
_KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "longrope": (("long_factor", "short_factor", "original_max_position_embeddings"), ("factor", "attention_factor")),
}


@dataclass(frozen=True)
class RopeSpec:
    kind: str  # HF's rope_type
    theta: float
    head_dim: int
    max_position_embeddings: int
    params: tuple[tuple[str, Any], ...] = ()  # the variant's parameters (lists as tuples)
    length: int | None = None  # the longest sequence served (dynamic, longrope); None: max_position_embeddings
    rotary_dim: int | None = None  # partial rotary (partial_rotary_factor): the leading dims rotated; None: all

    def frequencies(self) -> tuple[np.ndarray, float]:
        """(inverse frequencies [rotary_dim // 2] float32, the factor on cos and sin)."""
        p, d, kind = dict(self.params), self.rotary_dim or self.head_dim, self.kind
        exponents = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d
        length = self.length or self.max_position_embeddings
        theta, scale = self.theta, 1.0
        if kind == "dynamic":
            seq = max(length, self.max_position_embeddings)
            theta = theta * ((p["factor"] * seq / self.max_position_embeddings) - (p["factor"] - 1)) ** (d / (d - 2))
        inv = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
        if kind == "linear":
            inv = inv / np.float32(p["factor"])
        elif kind == "llama3":
            inv = _llama3(inv, p)
        elif kind == "yarn":
            inv, scale = _yarn(theta, d, self.max_position_embeddings, p)
        elif kind == "longrope":
            original = p["original_max_position_embeddings"]
            factor = p.get("factor") or self.max_position_embeddings / original
            scale = p.get("attention_factor") or (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
            ext = np.asarray(p["long_factor"] if length > original else p["short_factor"], np.float32)
            inv = (1.0 / (ext * np.float32(theta) ** exponents)).astype(np.float32)
        return inv.astype(np.float32), float(scale)


def rope_from_hf(params: dict, head_dim: int, max_position_embeddings: int, architecture: str) -> RopeSpec:
    """One HF rope parameters dict (`config.rope_parameters`, or one layer type's entry of it)
    -> RopeSpec; an unknown rope_type or a missing parameter is an error naming it."""
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    kind = "longrope" if kind == "su" else kind  # LongRoPE's first name (Phi-3 configs)
    if kind not in _KEYS:
        raise UnsupportedConfigError(f"rope_type={kind!r} ({architecture}) is not built: maxlike runs "
                                     f"{', '.join(_KEYS)}.")
    partial = float(params.get("partial_rotary_factor", 1.0) or 1.0)
    rotary_dim = int(head_dim * partial)
    if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
        raise UnsupportedConfigError(f"partial_rotary_factor={params['partial_rotary_factor']} ({architecture}) "
                                     f"rotates {rotary_dim} of {head_dim} head dims: it must be an even number "
                                     "from 2 to head_dim.")
    needed, optional = _KEYS[kind]
    missing = [k for k in needed if params.get(k) is None]
    if missing:
        raise UnsupportedConfigError(f"rope_type={kind!r} needs {', '.join(missing)} in the config's rope "
                                     f"parameters ({architecture}).")
    kept = tuple((k, _hashable(params[k])) for k in needed + optional if params.get(k) is not None)
    return RopeSpec(kind, float(params.get("rope_theta", 10000.0)), head_dim, int(max_position_embeddings), kept,
                    rotary_dim=None if rotary_dim == head_dim else rotary_dim)


def hf_rope_parameters(hf: Any, layer_type: str | None = None) -> dict:
    """An HF config's rope parameters as one dict with rope_theta: transformers 5's
    `rope_parameters` (per layer type where the model has several: pass `layer_type`), or an
    older config's `rope_scaling` + `rope_theta`."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    params.setdefault("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
    if params.get("original_max_position_embeddings") is None and getattr(hf, "original_max_position_embeddings", None):
        params["original_max_position_embeddings"] = hf.original_max_position_embeddings
    return params


def at_length(cfg, length: int):
    """`cfg` (a frozen architecture config) with every RopeSpec whose frequencies depend on how
    long sequences get (dynamic, longrope) set for sequences of up to `length` tokens."""
    changes = {f.name: dataclasses.replace(getattr(cfg, f.name), length=int(length))
               for f in dataclasses.fields(cfg)
               if isinstance(getattr(cfg, f.name), RopeSpec) and getattr(cfg, f.name).kind in ("dynamic", "longrope")}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _hashable(value):
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else value


def _llama3(inv: np.ndarray, p: dict) -> np.ndarray:
    """Llama 3.1's long-context scaling: long wavelengths slowed by `factor`, short ones kept,
    the band between blended."""
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    mid = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
    return np.where(mid, blended, scaled).astype(np.float32)


def _yarn(theta: float, d: int, max_positions: int, p: dict) -> tuple[np.ndarray, float]:
    """YaRN: interpolated (slowed by `factor`) low frequencies, extrapolated (kept) high ones, a
    linear ramp between the dimensions that turn beta_slow and beta_fast times over the original
    context; cos and sin scaled by 0.1 ln(factor) + 1 (or mscale's ratio)."""
    factor = p.get("factor") or max_positions / p["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scale = p.get("attention_factor")
    if scale is None:
        scale = (mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
                 if p.get("mscale") and p.get("mscale_all_dim") else mscale(factor))
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def dim_of(rotations):  # the dimension that turns `rotations` times over the original context
        return d * math.log(p["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate
    base = np.float32(theta) ** (np.arange(0, d, 2).astype(np.float32) / d)
    inv = (1.0 / (factor * base)) * (1 - keep) + (1.0 / base) * keep
    return inv.astype(np.float32), float(scale)


def apply_rope(x: jax.Array, positions: jax.Array, rope: RopeSpec) -> jax.Array:
    """Rotate halves (HF layout). x [B, T, H, D], positions [B, T]. With a partial rotary_dim,
    only the leading rotary_dim dims turn; the rest pass through."""
    if rope.rotary_dim and rope.rotary_dim < x.shape[-1]:
        r = rope.rotary_dim
        return jnp.concatenate([apply_rope(x[..., :r], positions, dataclasses.replace(rope, rotary_dim=None,
                                                                                      head_dim=r)), x[..., r:]], -1)
    inv_freq, scale = rope.frequencies()
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    cos = (jnp.concatenate([jnp.cos(angles)] * 2, axis=-1) * scale)[:, :, None, :]
    sin = (jnp.concatenate([jnp.sin(angles)] * 2, axis=-1) * scale)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)
