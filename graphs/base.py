"""What an architecture provides to the runtime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class WeightSpec:
    """One weight, described once: shape, logical axes, and where it comes from.

    `hf_name` / `gguf_name` name the source tensor; `convert` turns the source
    array (in its HF layout, [out, in] for linears) into ours.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    hf_name: str
    gguf_name: str
    convert: Callable[[np.ndarray], np.ndarray] = lambda a: a
    gguf_convert: Callable[[np.ndarray], np.ndarray] | None = None  # applied before `convert`


class UnsupportedConfigError(ValueError):
    """The HF config asks for a feature this graph does not build yet."""


@dataclass(frozen=True)
class Architecture:
    """An architecture: config converter, weight descriptions, forward and head.

    forward(cfg, weights, kv, tokens, positions, slots, page_table, *, backend)
        -> (hidden [B, T, D] after the final norm, kv updated)
    lm_head(cfg, weights, hidden [..., D]) -> logits [..., V]
    """

    name: str  # the HF `architectures` entry
    model_types: tuple[str, ...]  # HF `model_type` / GGUF `general.architecture`
    config_from_hf: Callable[[Any], Any]
    weight_specs: Callable[[Any], dict[str, WeightSpec]]
    kv_shape: Callable[[Any], tuple[int, int, int]]  # (layers, kv_heads, head_dim)
    forward: Callable
    lm_head: Callable
