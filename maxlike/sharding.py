"""Logical axis names -> mesh axes, in one place.

Graphs name the axes of every weight and activation logically ("vocab",
"q_heads", ...); this table decides which mesh axis, if any, shards each one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jax.sharding import Mesh, NamedSharding, PartitionSpec

# data: replicas, each with its own rows and KV pages; expert: a mixture-of-experts model's experts
# split (everything else whole on each, graphs.moe); tensor: heads, MLP columns and vocabulary split.
MESH_AXES = ("data", "expert", "tensor")

LOGICAL_TO_MESH: dict[str, str | None] = {
    "batch": "data",
    "layers": None,  # stacked per-layer weights and KV pools
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",  # stacked expert weights' leading axis
    "pages": None,
    "page_slots": None,
    "seq": None,
}


def partition_spec(axes: Sequence[str | None]) -> PartitionSpec:
    return PartitionSpec(*(LOGICAL_TO_MESH[a] if a is not None else None for a in axes))


def named_sharding(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def device_bytes(specs: dict, itemsize, mesh: Mesh) -> float:
    """Bytes one device holds of the weights `specs` (graphs.WeightSpec) describes: each weight's
    size over the devices its sharded axes split it across. `itemsize(name)` -> bytes per value."""
    total = 0.0
    for name, spec in specs.items():
        ways = 1
        for axis in {LOGICAL_TO_MESH[a] for a in spec.axes if a is not None} - {None}:
            ways *= mesh.shape[axis]
        total += float(np.prod(spec.shape)) * itemsize(name) / ways
    return total


def indivisible(specs: dict, mesh: Mesh) -> list[str]:
    """The weights (graphs.WeightSpec) with an axis this mesh cannot split evenly, each as
    "name: axis k (logical) of size n over m devices"."""
    out = []
    for name, spec in specs.items():
        for k, (size, axis) in enumerate(zip(spec.shape, spec.axes)):
            mesh_axis = LOGICAL_TO_MESH[axis] if axis is not None else None
            ways = mesh.shape[mesh_axis] if mesh_axis else 1
            if size % ways:
                out.append(f"{name}: axis {k} ({axis}) of size {size} over {ways} devices")
    return out
