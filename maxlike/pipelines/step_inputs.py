"""Step inputs on the device: host arrays placed shard by shard, one packed transfer
unpacked on device, and the decode step that follows a step, built on device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maxlike.kv_cache import NULL_PAGE


def place_sharded(array, sharding, dtype) -> jax.Array:
    """A host array onto the mesh shard by shard: each device receives only its slice
    (and in a multi-host job each process places only its own devices' slices)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: np.asarray(array[index], dtype))


def place_replicated(tree, sharding):
    """Host arrays (any pytree) onto the mesh, a full copy on every device; leaves already on the
    device stay as they are. In a multi-host job each process places its own devices' copies."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda a: a if isinstance(a, jax.Array) else place_sharded(a, sharding, a.dtype), tree)


def unpack(layout: tuple, packed: jax.Array) -> dict:
    out, at = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        out[name] = packed[at : at + n].reshape(shape)
        at += n
    return out


def next_inputs(page_size: int, next_tokens: jax.Array, prev: dict) -> dict:
    """Device-side: the decode inputs that follow `prev`, one token per row. A position past
    the page table (refused on the host before any call) writes to the null page, never into
    a page the row does not own."""
    lengths = prev["cache_lengths"] + prev["input_lengths"]  # [B] tokens now in the cache
    live = prev["input_lengths"] > 0  # padding rows stay on the null page
    pos = jnp.where(live, lengths, 0)[:, None]  # [B, 1]
    index = pos // page_size
    inside = index < prev["page_table"].shape[1]
    page = jnp.where(inside, jnp.take_along_axis(prev["page_table"], index, axis=1, mode="clip"), NULL_PAGE)
    return {
        "tokens": next_tokens.astype(jnp.int32)[:, None],
        "positions": pos,
        "slots": page * page_size + pos % page_size,
        "logit_indices": jnp.zeros_like(pos),
        "input_lengths": live.astype(jnp.int32),
        "page_table": prev["page_table"],
        "cache_lengths": lengths,
        **({"adapters": prev["adapters"]} if "adapters" in prev else {}),
    }
