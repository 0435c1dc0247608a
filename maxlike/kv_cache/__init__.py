from maxlike.kv_cache.paged import BlockAllocator, KVCacheInputs, KVCacheParams, PagedKVCacheManager, OutOfPagesError

__all__ = ["KVCacheParams", "PagedKVCacheManager", "BlockAllocator", "KVCacheInputs", "OutOfPagesError"]
