"""The page allocator and the prefix cache, without a model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from maxlike.kv_cache import KVCacheParams, OutOfPagesError, PagedKVCacheManager
from maxlike.sharding import MESH_AXES


def manager(pages: int, caching: bool = True) -> PagedKVCacheManager:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), MESH_AXES)
    return PagedKVCacheManager(KVCacheParams(1, 1, 4, 4, "float32"), pages, mesh, allocate=False,
                               enable_prefix_caching=caching)


def test_pages_are_claimed_grown_and_returned():
    kv = manager(5, caching=False)  # 4 usable pages of 4 tokens
    kv.claim("a")
    kv.reserve("a", 6)
    assert kv.num_pages_of("a") == 2 and kv.free_pages == 2
    assert kv.pages_short("a", 20) == 3 - 2  # needs 5 pages, holds 2, 2 free
    with pytest.raises(OutOfPagesError):
        kv.reserve("a", 20)
    table = kv.page_table(["a", None], 4)
    assert 0 not in table[0, :2] and (table[0, 2:] == 0).all() and (table[1] == 0).all()
    kv.release("a")
    assert kv.free_pages == 4


def test_prefix_pages_are_shared_refcounted_and_evicted_lru():
    kv = manager(7)  # 6 usable pages
    a = np.arange(13)  # 3 full pages + 1 token
    assert kv.claim("a", a) == 0
    kv.reserve("a", 13)
    kv.commit("a", a, 13)
    assert kv.claim("b", a) == 12, "three full pages hit; the last token is always computed"
    assert kv.num_pages_of("b") == 3 and kv.pages_in_use == 4
    kv.release("a")
    assert kv.pages_in_use == 3, "b still holds the shared pages"
    kv.release("b")
    assert kv.pages_in_use == 0 and kv.free_pages == 6, "cached pages count as free"
    c = np.arange(100, 113)
    kv.claim("c", c)
    kv.reserve("c", 24)  # 6 pages: 3 free + the 3 cached ones evicted
    assert kv.claim("d", a) == 0, "evicted pages no longer match"
    assert kv.prefix_cache.stats.hit_rate == pytest.approx(12 / (13 + 13 + 13 + 13))


def test_a_diverging_prefix_matches_only_its_common_pages():
    kv = manager(9)
    a = np.arange(17)
    kv.claim("a", a)
    kv.reserve("a", 17)
    kv.commit("a", a, 16)
    b = a.copy()
    b[5] = 999  # differs in the second page
    assert kv.claim("b", b) == 4


@pytest.mark.parametrize("tokens", [1, 5])
def test_kv_write_variants_agree(tokens):
    """The accelerator KV write (one scatter) equals the CPU one (plus a null-slot write)."""
    from graphs.layers import write_kv

    rng = np.random.default_rng(tokens)
    pages = rng.normal(size=(6, 4, 2, 8)).astype(np.float32)
    new = rng.normal(size=(2, tokens, 2, 8)).astype(np.float32)
    slots = rng.choice(np.arange(4, 24), size=(2, tokens), replace=False).astype(np.int32)  # pages 1-5
    cpu, accel = (np.asarray(write_kv(jax.numpy.asarray(pages[None]), new, slots, backend=b))[0]
                  for b in ("cpu", "gpu"))
    expect = pages.reshape(24, 2, 8).copy()
    expect[slots.reshape(-1)] = new.reshape(-1, 2, 8)
    np.testing.assert_array_equal(accel.reshape(24, 2, 8)[4:], expect[4:])
    np.testing.assert_array_equal(cpu[1:], accel[1:])  # page 0 (null) may differ: nothing reads it
