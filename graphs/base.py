"""What an architecture provides to the runtime: its config, weights, math and checkpoint names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
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

    `hf_name` / `gguf_name` name the tensor in HF safetensors / GGUF files (a tuple of HF
    names: those tensors stacked on a new leading axis, e.g. one per expert); `convert`
    turns the HF-layout array ([out, in] for linears) into our layout; `gguf_convert`
    first undoes what llama.cpp's converter changed (e.g. its q/k row permutation).
    """

    hf_name: str | tuple[str, ...]
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
    weight_specs(cfg) -> {name: WeightSpec}, layer weights named "layers.{i}.{kind}"
    checkpoint_names(cfg) -> {name: Source}: one name map for every weight of weight_specs
    kv_shape(cfg) -> (layers, kv_heads, head_dim)
    forward(cfg, weights, kv, tokens, positions, slots, page_table, *, backend, scan)
        -> (hidden [B, T, D] after the final norm, kv updated); with scan=True the layer
        weights come stacked (`stacked_specs`) and the layers run through `run_layers`;
        page_table may be a `graphs.attention.GroupedPageTable` (a mixed step: tokens lie flat
        as [replicas, N], every op but attention sees them so, and attention takes the table)
    lm_head(cfg, weights, hidden [..., D]) -> logits [..., V]; with `quantized_head`, also
        lm_head(..., matmul=, backend=) when the weights hold the head as a quantized "head"
        [D, V] (maxlike.weights.quantize.with_head), which it reads through graphs.layers.head_logits,
        and the embedding table in q8_0 by rows, which forward reads through graphs.layers.embed_rows
    """

    name: str  # the HF `architectures` entry
    model_types: tuple[str, ...]  # HF `model_type` / GGUF `general.architecture`
    config_from_hf: Callable[[Any], ArchConfig]
    weight_specs: Callable[[Any], dict[str, WeightSpec]]
    checkpoint_names: Callable[[Any], dict[str, Source]]
    kv_shape: Callable[[Any], tuple[int, int, int]]
    forward: Callable
    lm_head: Callable
    # LoRA: PEFT module name -> (weight kind, input axes); forward applies `adapters` to these
    lora_targets: dict = field(default_factory=dict)
    features: str = ""  # what it runs, for `maxlike list`
    quantized_head: bool = False  # its graphs read the tables through graphs.layers.head_logits / embed_rows

    def functions(self) -> tuple[Callable, ...]:
        """Every function of this architecture (whose source is part of cache keys)."""
        return (self.config_from_hf, self.weight_specs, self.checkpoint_names, self.kv_shape, self.forward,
                self.lm_head)


# -- layers as one loop ------------------------------------------------------
# Architectures describe their weights per layer ("layers.{i}.{kind}"), which is what
# checkpoints hold. A model whose layers run as one loop keeps each kind stacked
# ("layers.{kind}", with a leading "layers" axis); these helpers convert and drive both.

LAYERS = "layers."


def _layer_kind(name: str) -> tuple[int, str] | None:
    """'layers.3.q' -> (3, 'q'); None for a weight outside the layers."""
    if not name.startswith(LAYERS):
        return None
    index, _, kind = name[len(LAYERS):].partition(".")
    return (int(index), kind) if index.isdigit() and kind else None


def _by_kind(named: dict) -> tuple[dict, dict[str, list]]:
    """{name: value} -> (the values outside the layers by name, {kind: [value per layer, in layer order]})."""
    others: dict = {}
    layers: dict[str, dict[int, object]] = {}
    for name, value in named.items():
        found = _layer_kind(name)
        if found is None:
            others[name] = value
        else:
            layers.setdefault(found[1], {})[found[0]] = value
    return others, {kind: [by_index[i] for i in sorted(by_index)] for kind, by_index in layers.items()}


def uniform_layers(specs: dict[str, WeightSpec]) -> bool:
    """Whether every layer holds the same weight kinds in the same shapes (so they can run as one loop)."""
    _, layers = _by_kind(specs)
    counts = {len(group) for group in layers.values()}
    return len(counts) <= 1 and all(s == group[0] for group in layers.values() for s in group)


def stacked_specs(specs: dict[str, WeightSpec]) -> dict[str, WeightSpec]:
    """Per-layer specs -> one spec per kind with a leading "layers" axis (every layer of a
    kind must have the same shape: a model whose layers differ cannot loop over them)."""
    out, layers = _by_kind(specs)
    for kind, group in layers.items():
        if any(s != group[0] for s in group):
            raise UnsupportedConfigError(f"the layers' {kind!r} weights differ in shape, so they cannot run as one "
                                         "loop: build this model with scan_layers=False.")
        out[LAYERS + kind] = WeightSpec((len(group),) + group[0].shape, ("layers",) + group[0].axes)
    return out


def stack_layers(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Host arrays named per layer -> stacked per kind (layer order), the rest unchanged."""
    out, layers = _by_kind(weights)
    out.update({LAYERS + kind: np.stack([np.asarray(a) for a in group]) for kind, group in layers.items()})
    return out


# Layers per iteration of the scan (lax.scan's `unroll`): 1 is the plain loop. A knob for the
# GPU probe (benchmarks/probe_gpu_step.py), which runs without the executable cache.
SCAN_UNROLL = 1


class LayerOf(NamedTuple):
    """Layer `index` of a stacked weight, handed to a looped layer whole (run_layers' `whole`): a
    kernel that reads its layer by index takes `stack` as it is, where a slice would be a copy;
    anything else takes `get()`."""

    stack: jax.Array
    index: jax.Array

    def get(self) -> jax.Array:
        return jax.lax.dynamic_index_in_dim(self.stack, self.index, keepdims=False)


def run_layers(layer: Callable, x, weights: dict, kv: list, num_layers: int, *, scan: bool,
               per_layer: dict[str, tuple[int, ...]] | None = None, whole: Callable[[str], bool] | None = None):
    """Run `layer(x, layer_weights, k_pages, v_pages, index) -> (x, k_pages, v_pages)`
    over every layer, `layer_weights` keyed by kind ("q", "attn_norm", ...).

    scan=False: a Python loop (the graph unrolled), per-layer weights and one KV pool
    pair per layer, `index` 0. scan=True: one `lax.scan` over stacked weights with the
    stacked KV pool pair in the carry, `index` the layer (the pool is read and written
    by index, never sliced). `per_layer` ({name: one int per layer}, e.g. each layer's
    attention window) joins layer_weights: Python ints when unrolled (static), the
    layer's entry of an int32 array under scan. `whole(kind)`: under scan, the kinds handed to the
    layer as LayerOf(the stack, index) rather than sliced. Returns (x, kv)."""
    per_layer = per_layer or {}
    if not scan:
        out = []
        for i in range(num_layers):
            prefix = f"{LAYERS}{i}."
            own = {name[len(prefix):]: w for name, w in weights.items() if name.startswith(prefix)}
            own.update({name: int(values[i]) for name, values in per_layer.items()})
            with jax.named_scope(f"layer{i}"):
                x, k, v = layer(x, own, kv[i][0], kv[i][1], 0)
            out.append((k, v))
        return x, out
    stacked = {name[len(LAYERS):]: w for name, w in weights.items() if _layer_kind(name) is None
               and name.startswith(LAYERS)}
    stacked.update({name: jnp.asarray(values, jnp.int32) for name, values in per_layer.items()})
    kept = {kind: stacked.pop(kind) for kind in list(stacked) if whole is not None and whole(kind)}

    def body(carry, xs):
        (x, k, v), (own, index) = carry, xs
        own = {**own, **{kind: LayerOf(w, index) for kind, w in kept.items()}}
        with jax.named_scope("layer"):
            return layer(x, own, k, v, index), None

    (x, k, v), _ = jax.lax.scan(body, (x, kv[0][0], kv[0][1]), (stacked, jnp.arange(num_layers, dtype=jnp.int32)),
                                unroll=SCAN_UNROLL)
    return x, [(k, v)]


def several_devices(mesh):
    """`mesh` when it has more than one device (the kernel then runs per shard), else None."""
    return mesh if mesh is not None and mesh.size > 1 else None
