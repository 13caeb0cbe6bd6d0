"""KV-cache managers."""

from policies.kv_cache.block_pool import BlockPool
from policies.kv_cache.paged import DEFAULT_CPU_MAX_TOKENS, PagedKVCacheManager

__all__ = ["DEFAULT_CPU_MAX_TOKENS", "BlockPool", "PagedKVCacheManager"]
