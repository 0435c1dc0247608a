"""Weights kept quantized on the device: int8 values with a float32 scale per output channel.

A projection's weight [*in, *out] becomes `name` (int8) and `name + "_scale"` ([*out] float32):
w ~ values * scale, with scale = max |w| over the input axes / 127 (symmetric, rounded to
nearest). The graphs dequantize in the matmul (`graphs.layers.projection`): x @ values, times the
scale. Embeddings, norms and the LM head stay in the model's dtype. Works on per-layer names
("layers.{i}.{kind}"); stacking for the layer loop comes after, scales included.
"""

from __future__ import annotations

import numpy as np

from graphs.base import WeightSpec

SCALE = "_scale"


def linear_inputs(specs: dict[str, WeightSpec], kinds: dict[str, int]) -> dict[str, int]:
    """The projection weights among per-layer `specs` (kind in `kinds`: kind -> input axes)."""
    return {name: kinds[name.rsplit(".", 1)[-1]] for name in specs
            if name.startswith("layers.") and name.rsplit(".", 1)[-1] in kinds}


def quantized_specs(specs: dict[str, WeightSpec], inputs: dict[str, int]) -> dict[str, WeightSpec]:
    """`specs` plus each projection's scale: its shape and axes without the input axes."""
    out = dict(specs)
    for name, n_in in inputs.items():
        out[name + SCALE] = WeightSpec(specs[name].shape[n_in:], specs[name].axes[n_in:])
    return out


def dtype_of(name: str, kinds, dtype):
    """A parameter's dtype under int8 (kinds: the projection kinds quantized; empty: none):
    int8 for those projections (per layer or stacked), float32 for their scales, else `dtype`."""
    kind = name.rsplit(".", 1)[-1]
    if kinds and kind.endswith(SCALE) and kind[: -len(SCALE)] in kinds:
        return np.dtype(np.float32)
    return np.dtype(np.int8) if kind in kinds else np.dtype(dtype)


def quantize_int8(w: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales) of a weight whose first `n_in` axes are its input."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=tuple(range(n_in))) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def quantize_host(host: dict[str, np.ndarray], inputs: dict[str, int]) -> dict[str, np.ndarray]:
    """Host weights -> int8 projections and their scales (the rest unchanged)."""
    out = dict(host)
    for name, n_in in inputs.items():
        out[name], out[name + SCALE] = quantize_int8(host[name], n_in)
    return out
