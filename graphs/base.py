"""What an architecture provides to the runtime: its config, weights, math and checkpoint names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np


class ArchConfig(Protocol):
    """The fields of an architecture's frozen config that the runtime reads (sizing, sharding,
    KV layout, request checks). Each architecture's config dataclass has at least these."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    q_heads: int
    kv_heads: int  # the runtime may raise it (repeating heads) for tensor parallelism
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    sliding_window: int | None  # attention reaches this many tokens back; None: all of them


@dataclass(frozen=True)
class WeightSpec:
    """One weight, described once: its shape and logical axes (shardings and abstract shapes
    are derived from these)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]


def _same(a: np.ndarray) -> np.ndarray:
    return a


@dataclass(frozen=True)
class Source:
    """Where one weight comes from in a checkpoint, and how it becomes ours.

    `hf_name` / `gguf_name` name the tensor in HF safetensors / GGUF files; `convert`
    turns the HF-layout array ([out, in] for linears) into our layout; `gguf_convert`
    first undoes what llama.cpp's converter changed (e.g. its q/k row permutation).
    """

    hf_name: str
    gguf_name: str
    convert: Callable[[np.ndarray], np.ndarray] = _same
    gguf_convert: Callable[[np.ndarray], np.ndarray] | None = None


class UnsupportedConfigError(ValueError):
    """The HF config asks for a feature this graph does not build, or lacks a field it needs."""


def require(hf: Any, name: str, architecture: str) -> Any:
    """`hf.<name>`, or an error naming the missing field (a config.json without it is not this architecture's)."""
    value = getattr(hf, name, None)
    if value is None:
        raise UnsupportedConfigError(f"the model config has no {name!r}, which {architecture} needs: check the "
                                     "checkpoint's config.json (a truncated or hand-edited config?).")
    return value


@dataclass(frozen=True)
class Architecture:
    """An architecture: config converter, weight descriptions, name map, forward and head.

    config_from_hf(hf_config) -> the frozen config (an ArchConfig)
    weight_specs(cfg) -> {name: WeightSpec}
    checkpoint_names(cfg) -> {name: Source}: one name map for every weight of weight_specs
    kv_shape(cfg) -> (layers, kv_heads, head_dim)
    forward(cfg, weights, kv, tokens, positions, slots, page_table, *, backend)
        -> (hidden [B, T, D] after the final norm, kv updated)
    lm_head(cfg, weights, hidden [..., D]) -> logits [..., V]
    """

    name: str  # the HF `architectures` entry
    model_types: tuple[str, ...]  # HF `model_type` / GGUF `general.architecture`
    config_from_hf: Callable[[Any], ArchConfig]
    weight_specs: Callable[[Any], dict[str, WeightSpec]]
    checkpoint_names: Callable[[Any], dict[str, Source]]
    kv_shape: Callable[[Any], tuple[int, int, int]]
    forward: Callable
    lm_head: Callable

    def functions(self) -> tuple[Callable, ...]:
        """Every function of this architecture (whose source is part of cache keys)."""
        return (self.config_from_hf, self.weight_specs, self.checkpoint_names, self.kv_shape, self.forward,
                self.lm_head)
