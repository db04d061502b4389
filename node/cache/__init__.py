"""Response caching: the memory tier, the local sqlite store, and the tiered cache the router uses."""

from node.cache.memory import Entry, MemoryCache, MemoryCacheStatistics
from node.cache.store import LocalStore, StoreError, StoreStatistics
from node.cache.tiered import Hit, MappingCache, ResponseCache, TieredCache, as_response_cache

__all__ = [
    "Entry",
    "Hit",
    "LocalStore",
    "MappingCache",
    "MemoryCache",
    "MemoryCacheStatistics",
    "ResponseCache",
    "StoreError",
    "StoreStatistics",
    "TieredCache",
    "as_response_cache",
]
