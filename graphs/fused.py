"""Fused projections: q/k/v as one weight and gate/up as one, so a layer runs two matmuls over
its normed input instead of five (fewer, larger kernels per decode step).

Checkpoints and architectures describe q, k, v, gate and up apart (`weight_specs`); the runtime
fuses them after loading (`fuse_specs` / `fuse_weights`), quantized parts included, and the
graphs' `qkv` / `gate_up` take either form:

- "qkv" [*in, KV, G + 2, D]: for each KV head, its G = H / KV query heads, then its key, then
  its value. Sharding the KV-head axis keeps every query head on the device of its key and
  value, so tensor parallelism splits the fused weight as it split the three.
- "gate_up" [*in, 2, F]: gate, then up; the F axis stays the one sharded.

The leading axes (*in) are whatever the parts share before their output axes: the input axis,
or a quantized weight's packed or group axis, so scales and offsets fuse the same way.
"""

from __future__ import annotations

import jax
import numpy as np

from graphs.base import WeightSpec

QKV, GATE_UP = "qkv", "gate_up"
GROUPS = {QKV: ("q", "k", "v"), GATE_UP: ("gate", "up")}  # each fused weight and the ones it joins
PARTS = ("", "_scale", "_offset")  # a weight and its quantization scales and offsets (maxlike.weights.quantize)


def _fusable(names, p: str, kinds: tuple[str, ...], suffix: str) -> bool:
    return all(p + kind + suffix in names for kind in kinds)


def _layer_prefixes(names) -> list[str]:
    return sorted({name[: name.rindex(".") + 1] for name in names if name.startswith("layers.")})


def fuse_specs(specs: dict[str, WeightSpec], kv_heads: int, groups=tuple(GROUPS)) -> dict[str, WeightSpec]:
    """Per-layer specs with q/k/v and gate/up (and their scales) replaced by qkv and gate_up (those
    of them in `groups`: parts stored alike, maxlike.weights.quantize.fusable)."""
    out = dict(specs)
    for p in _layer_prefixes(specs):
        for suffix in PARTS:
            if QKV in groups and _fusable(specs, p, GROUPS[QKV], suffix):
                q = out.pop(p + "q" + suffix)
                out.pop(p + "k" + suffix), out.pop(p + "v" + suffix)
                lead, (h, d) = q.shape[:-2], q.shape[-2:]
                out[p + QKV + suffix] = WeightSpec((*lead, kv_heads, h // kv_heads + 2, d),
                                                   (*q.axes[:-2], "kv_heads", None, "head_dim"))
            if GATE_UP in groups and _fusable(specs, p, GROUPS[GATE_UP], suffix):
                gate = out.pop(p + "gate" + suffix)
                out.pop(p + "up" + suffix)
                out[p + GATE_UP + suffix] = WeightSpec((*gate.shape[:-1], 2, gate.shape[-1]),
                                                       (*gate.axes[:-1], None, gate.axes[-1]))
    return out


def fuse_weights(host: dict[str, np.ndarray], kv_heads: int, groups=tuple(GROUPS)) -> dict[str, np.ndarray]:
    """Host arrays named as `weight_specs` (per layer) -> fused as `fuse_specs` describes."""
    out = dict(host)
    for p in _layer_prefixes(host):
        for suffix in PARTS:
            if QKV in groups and _fusable(host, p, GROUPS[QKV], suffix):
                q, k, v = (np.asarray(out.pop(p + kind + suffix)) for kind in ("q", "k", "v"))
                lead = q.shape[:-2]
                q = q.reshape(*lead, kv_heads, -1, q.shape[-1])
                out[p + QKV + suffix] = np.concatenate([q, k[..., None, :], v[..., None, :]], axis=-2)
            if GATE_UP in groups and _fusable(host, p, GROUPS[GATE_UP], suffix):
                out[p + GATE_UP + suffix] = np.stack([out.pop(p + "gate" + suffix), out.pop(p + "up" + suffix)],
                                                     axis=-2)
    return out


def qkv(proj, h: jax.Array, lw: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The layer's queries [B, T, H, D], keys and values [B, T, KV, D] from its normed input."""
    if QKV not in lw:
        return (proj("btd,dhk->bthk", h, lw, "q"), proj("btd,dhk->bthk", h, lw, "k"),
                proj("btd,dhk->bthk", h, lw, "v"))
    out = proj("btd,dkgh->btkgh", h, lw, QKV)  # [B, T, KV, G + 2, D]
    g = out.shape[-2] - 2
    q = out[..., :g, :]
    return q.reshape(*q.shape[:2], -1, q.shape[-1]), out[..., g, :], out[..., g + 1, :]


def gate_up(proj, h: jax.Array, lw: dict) -> tuple[jax.Array, jax.Array]:
    """The MLP's gate and up projections [B, T, F] of its normed input."""
    if GATE_UP not in lw:
        return proj("btd,df->btf", h, lw, "gate"), proj("btd,df->btf", h, lw, "up")
    out = proj("btd,dcf->btcf", h, lw, GATE_UP)
    return out[:, :, 0], out[:, :, 1]
