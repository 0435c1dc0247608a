"""Prefix caching: full KV pages shared between requests by the tokens they hold.

A full page is keyed by (key of the page before it, its tokens): a chain, so a
page matches only when the whole prefix up to it matches. Keys hold the
tokens themselves, so a match is exact (no hash collisions). Pages are
reference counted; pages nobody holds stay cached, and the least recently
used of them are reused first when the free list runs dry.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

ROOT = 0  # the key id before a sequence's first page


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PrefixCache:
    def __init__(self) -> None:
        self._by_key: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}  # -> (key id, page)
        self._key_of_page: dict[int, tuple[tuple[int, tuple[int, ...]], int]] = {}  # page -> (key, key id)
        self._refs: collections.Counter[int] = collections.Counter()
        self._unused: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU, oldest first
        self._next_id = ROOT + 1
        self._roots: dict[str, int] = {}  # namespace (a LoRA adapter) -> the key id its chains start from
        self.stats = PrefixCacheStats()

    def root(self, namespace: str | None) -> int:
        """The key id a sequence's first page follows: ROOT, or one per namespace, so pages
        computed under one LoRA adapter never match a prompt under another (or none)."""
        if namespace is None:
            return ROOT
        if namespace not in self._roots:
            self._roots[namespace] = self._next_id
            self._next_id += 1
        return self._roots[namespace]

    @property
    def evictable(self) -> int:
        return len(self._unused)

    def match(self, tokens, page_size: int, root: int = ROOT) -> tuple[list[int], int]:
        """Cached pages for the longest full-page prefix of `tokens` (chains from `root`),
        leaving at least one token to compute. Returns (pages, key id of the last one, `root`
        when none); takes a reference on each."""
        usable = (len(tokens) - 1) // page_size
        pages, parent = [], root
        for i in range(usable):
            hit = self._by_key.get((parent, tuple(tokens[i * page_size : (i + 1) * page_size])))
            if hit is None:
                break
            parent, page = hit
            self._take(page)
            pages.append(page)
        self.stats.queried_tokens += len(tokens)
        self.stats.hit_tokens += len(pages) * page_size
        return pages, parent

    def register(self, parent: int, tokens: tuple[int, ...], page: int) -> int:
        """Record that `page` (held by its writer) holds `tokens` after key `parent`; returns its key id."""
        key = (parent, tokens)
        if key in self._by_key:  # the same content was computed twice: keep the first copy
            return self._by_key[key][0]
        kid = self._next_id
        self._next_id += 1
        self._by_key[key] = (kid, page)
        self._key_of_page[page] = (key, kid)
        self._refs[page] += 1
        return kid

    def _take(self, page: int) -> None:
        self._refs[page] += 1
        self._unused.pop(page, None)

    def cached_pages(self) -> dict[int, int]:
        """Every page the cache holds -> how many requests hold it too (0: evictable)."""
        return {page: self._refs.get(page, 0) for page in self._key_of_page}

    def owns(self, page: int) -> bool:
        return page in self._key_of_page

    def drop_ref(self, page: int) -> None:
        """A holder let go of a cached page; at zero it becomes evictable."""
        self._refs[page] -= 1
        if self._refs[page] == 0:
            del self._refs[page]
            self._unused[page] = None

    def evict(self, n: int) -> list[int]:
        """Forget the `n` least recently used unheld pages and hand them back for reuse."""
        out = []
        for _ in range(n):
            page, _ = self._unused.popitem(last=False)
            key, _ = self._key_of_page.pop(page)
            del self._by_key[key]
            out.append(page)
        return out
