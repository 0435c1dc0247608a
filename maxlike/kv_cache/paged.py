"""The paged KV pool, its block allocator and per-sequence page tables.

Layout: `pool` is a list of (keys, values) pairs of [replicas, layers, pages,
page_size, kv_heads, head_dim] arrays. Unrolled models keep one pair per layer
(layers = 1) so the decode step never slices a stacked buffer; models whose
layers run as one loop (`stacked`) keep a single pair holding every layer, which
the loop reads and writes by index in place. Each data-parallel replica owns its own pages
(the leading axis is sharded over the mesh's data axis) and page ids are local
to a replica. Page 0 of every replica is reserved: padding tokens write there
and unused page-table entries point there, so no real sequence ever sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from maxlike.kv_cache.prefix_cache import PrefixCache
from maxlike.sharding import named_sharding

NULL_PAGE = 0


class OutOfPagesError(RuntimeError):
    """The pool has too few free pages for a request right now."""


@dataclass(frozen=True)
class KVCacheParams:
    num_layers: int
    kv_heads: int
    head_dim: int
    page_size: int
    dtype: str

    @property
    def page_bytes(self) -> int:
        """Bytes of one page across all layers, keys and values."""
        return 2 * self.num_layers * self.page_size * self.kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)


@struct.dataclass
class KVCacheInputs:
    """What a step needs to find a batch's cache: page tables and context lengths."""

    page_table: jax.Array  # [B, P] page ids, NULL_PAGE where unused
    cache_lengths: jax.Array  # [B] tokens already in the cache before this step


class BlockAllocator:
    """Free list of page ids; page 0 is never handed out, and a page is freed only once."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))
        self._is_free = set(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def free_ids(self) -> list[int]:
        """The free page ids (a copy)."""
        return list(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(f"needs {n} KV pages, {len(self._free)} free")
        out = self._free[-n:][::-1] if n else []
        del self._free[len(self._free) - n :]
        self._is_free.difference_update(out)
        return out

    def release(self, pages: list[int]) -> None:
        bad = [p for p in pages if p in self._is_free or not NULL_PAGE < p < self.num_pages]
        if bad or len(set(pages)) != len(pages):
            raise ValueError(f"pages {bad or sorted(pages)} are released twice or are not pages of this pool "
                             f"(1..{self.num_pages - 1}): a page is freed once, by its owner.")
        self._free.extend(reversed(pages))
        self._is_free.update(pages)


class _Replica:
    """One data-parallel replica's pages: free list and prefix cache."""

    def __init__(self, num_pages: int, enable_prefix_caching: bool):
        self.allocator = BlockAllocator(num_pages)
        self.prefix_cache = PrefixCache() if enable_prefix_caching else None

    @property
    def free_pages(self) -> int:
        return self.allocator.free + (self.prefix_cache.evictable if self.prefix_cache else 0)


class PagedKVCacheManager:
    """Owns the pool arrays and which pages each request holds.

    claim(request_id, tokens) -> reserve(request_id, total_tokens) -> (steps,
    commit(request_id, tokens, cache_length)) -> release(request_id).
    How many tokens are written is the caller's (the context's `cache_length`).
    The pool is donated to every compiled step; `pool` is replaced by the step's output.
    With prefix caching, `claim` returns how many leading tokens are already cached.
    With several replicas, a request lives on the one `claim` puts it on.

    `window`: every layer of the model attends at most this many tokens back (sliding-window
    attention on all layers). Then `commit` also returns the pages that lie wholly before the
    next token's window: a sequence holds about window / page_size + 1 pages however long it
    grows. Its page list keeps their places (as the null page), so positions still map to
    page indices; attention masks what it reads there. Models with any full-attention layer
    keep every page.
    """

    def __init__(self, params: KVCacheParams, num_pages: int, mesh: Mesh, allocate: bool = True,
                 enable_prefix_caching: bool = False, replicas: int = 1, stacked: bool = False,
                 window: int | None = None):
        if num_pages < 2:
            raise ValueError("the KV pool needs at least 2 pages (page 0 is reserved).")
        self.params = params
        self.num_pages = num_pages  # per replica
        self.replicas = replicas
        self.stacked = stacked
        self.mesh = mesh
        self._replicas = [_Replica(num_pages, enable_prefix_caching) for _ in range(replicas)]
        self._pages: dict[str, list[int]] = {}
        self._replica_of: dict[str, int] = {}
        self._chain: dict[str, tuple[int, int]] = {}  # request -> (pages registered, key id of the last)
        self.window = window
        self._slid: dict[str, int] = {}  # request -> pages before its window already returned
        self.pool: list[tuple[jax.Array, jax.Array]] | None = self._allocate_pool() if allocate else None

    @property
    def allocator(self) -> BlockAllocator:
        return self._replicas[0].allocator

    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The first replica's prefix cache (the only one without data parallelism)."""
        return self._replicas[0].prefix_cache

    @property
    def pool_sharding(self):
        return named_sharding(self.mesh, ("batch", "layers", "pages", "page_slots", "kv_heads", "head_dim"))

    @property
    def pool_shape(self) -> tuple[int, ...]:
        """The shape of each array of `pool`."""
        p = self.params
        layers = p.num_layers if self.stacked else 1
        return (self.replicas, layers, self.num_pages, p.page_size, p.kv_heads, p.head_dim)

    @property
    def pool_groups(self) -> int:
        """How many (keys, values) pairs `pool` holds."""
        return 1 if self.stacked else self.params.num_layers

    def _allocate_pool(self):
        zeros = jax.jit(
            lambda: jnp.zeros(self.pool_shape, self.params.dtype), out_shardings=self.pool_sharding
        )
        return [(zeros(), zeros()) for _ in range(self.pool_groups)]

    # -- bookkeeping -------------------------------------------------------
    def claim(self, request_id: str, tokens=None, replica: int | None = None, total_tokens: int | None = None,
              namespace: str | None = None) -> int:
        """Start holding pages for `request_id` (on `replica`, default the one with the
        most free pages); returns the number of leading `tokens` whose keys and values
        are already cached (0 without prefix caching), matched only among pages computed
        under the same `namespace` (its LoRA adapter). With `total_tokens`, pages for that
        many tokens are reserved too (all or nothing: OutOfPagesError leaves no claim)."""
        if request_id in self._pages:
            raise ValueError(f"request {request_id!r} already holds KV pages.")
        if replica is None:
            replica = max(range(self.replicas), key=lambda r: self._replicas[r].free_pages)
        cache = self._replicas[replica].prefix_cache
        pages, last = ([], 0) if cache is None or tokens is None else \
            cache.match(tokens, self.params.page_size, root=cache.root(namespace))
        self._pages[request_id] = pages
        self._replica_of[request_id] = replica
        self._chain[request_id] = (len(pages), last)
        self._slid[request_id] = 0
        if total_tokens is not None:
            try:
                self.reserve(request_id, total_tokens)
            except OutOfPagesError:
                self.release(request_id)
                raise
        return len(pages) * self.params.page_size

    def contains(self, request_id: str) -> bool:
        return request_id in self._pages

    def replica_of(self, request_id: str) -> int:
        return self._replica_of[request_id]

    def _held(self, request_id: str) -> list[int]:
        try:
            return self._pages[request_id]
        except KeyError:
            raise ValueError(f"request {request_id!r} holds no KV pages (never claimed, or already released).") \
                from None

    def reserve(self, request_id: str, total_tokens: int) -> None:
        """Make sure `request_id` owns pages for `total_tokens` tokens."""
        pages, rep = self._held(request_id), self._replicas[self._replica_of[request_id]]
        need = self.params.pages_for(total_tokens) - len(pages)
        if need > 0:
            short = need - rep.allocator.free
            if short > 0 and rep.prefix_cache is not None and short <= rep.prefix_cache.evictable:
                rep.allocator.release(rep.prefix_cache.evict(short))
            pages.extend(rep.allocator.allocate(need))

    def pages_short(self, request_id: str, total_tokens: int) -> int:
        """How many more pages `request_id` needs for `total_tokens` than its replica can give (0: it fits)."""
        need = self.params.pages_for(total_tokens) - len(self._held(request_id))
        return max(0, need - self._replicas[self._replica_of[request_id]].free_pages)

    def commit(self, request_id: str, tokens, cache_length: int) -> None:
        """`cache_length` tokens of `request_id` are now written: offer its full pages to the prefix
        cache, and with a `window`, return the pages the next token's window has left."""
        rep = self._replicas[self._replica_of[request_id]]
        page_size, pages = self.params.page_size, self._pages[request_id]
        if rep.prefix_cache is not None:
            done, key = self._chain[request_id]
            for i in range(done, cache_length // page_size):
                key = rep.prefix_cache.register(key, tuple(int(t) for t in tokens[i * page_size : (i + 1) * page_size]),
                                                pages[i])
                done = i + 1
            self._chain[request_id] = (done, key)
        if self.window is not None:  # the next token (at cache_length) sees keys from cache_length - window + 1 on
            gone = min(max(0, cache_length - self.window + 1) // page_size, len(pages))
            self._give_back(rep, pages[self._slid[request_id]:gone])
            pages[self._slid[request_id]:gone] = [NULL_PAGE] * max(0, gone - self._slid[request_id])
            self._slid[request_id] = max(gone, self._slid[request_id])

    @staticmethod
    def _give_back(rep: _Replica, pages: list[int]) -> None:
        """Return pages a request held: its own to the free list, cached ones to the prefix cache."""
        cache = rep.prefix_cache
        pages = [p for p in pages if p != NULL_PAGE]
        if cache is not None:
            for p in pages:
                if cache.owns(p):
                    cache.drop_ref(p)
        rep.allocator.release([p for p in pages if cache is None or not cache.owns(p)])

    def release(self, request_id: str) -> None:
        """Give back every page `request_id` holds (cached ones stay cached for others)."""
        self._held(request_id)
        pages = self._pages.pop(request_id)
        del self._chain[request_id], self._slid[request_id]
        self._give_back(self._replicas[self._replica_of.pop(request_id)], pages)

    def page_table(self, request_ids: list[str | None], width: int) -> np.ndarray:
        """[len(request_ids), width] page ids (local to each request's replica); None
        rows (padding) point at the null page."""
        table = np.full((len(request_ids), width), NULL_PAGE, np.int32)
        for row, rid in enumerate(request_ids):
            if rid is not None:
                pages = self._pages[rid][:width]
                table[row, : len(pages)] = pages
        return table

    def num_pages_of(self, request_id: str) -> int:
        """Pages `request_id` reaches (its page list's length, returned window pages included)."""
        return len(self._held(request_id))

    def pages_held(self, request_id: str) -> int:
        """Pages `request_id` holds now (without those its window has left)."""
        return sum(p != NULL_PAGE for p in self._held(request_id))

    def pages_of(self, request_id: str) -> list[int]:
        """The page ids `request_id` holds, in sequence order (a copy)."""
        return list(self._held(request_id))

    def requests(self) -> list[str]:
        """Every request holding pages."""
        return list(self._pages)

    def replica_state(self, replica: int) -> tuple[BlockAllocator, PrefixCache | None]:
        """A replica's allocator and prefix cache (for inspection)."""
        rep = self._replicas[replica]
        return rep.allocator, rep.prefix_cache

    def replica_free_pages(self, replica: int) -> int:
        return self._replicas[replica].free_pages

    @property
    def free_pages(self) -> int:
        """Pages requests could get now, over all replicas: free ones plus cached pages nobody holds."""
        return sum(r.free_pages for r in self._replicas)

    @property
    def pages_in_use(self) -> int:
        return self.replicas * (self.num_pages - 1) - self.free_pages
