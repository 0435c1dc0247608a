from maxlike.kv_cache.paged import (
    NULL_PAGE,
    BlockAllocator,
    KVCacheInputs,
    KVCacheParams,
    OutOfPagesError,
    PagedKVCacheManager,
)

__all__ = ["KVCacheParams", "PagedKVCacheManager", "BlockAllocator", "KVCacheInputs", "OutOfPagesError", "NULL_PAGE"]
