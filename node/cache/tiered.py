"""The cache the router talks to: memory in front of an optional local store."""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from node.cache.memory import MemoryCache, MemoryCacheStatistics
from node.cache.store import LocalStore, StoreStatistics
from protocols.cid import cid_of

__all__ = ["Hit", "ResponseCache", "TieredCache", "TieredCacheStatistics", "MappingCache", "as_response_cache"]


@dataclass(frozen=True)
class Hit:
    data: bytes  # canonical response bytes
    cid: str  # response CID
    tier: str  # "memory" or "local"


class ResponseCache(Protocol):
    def lookup(self, key: str) -> Hit | None: ...
    def store(self, key: str, data: bytes, cid: str) -> None: ...
    def clear(self) -> None: ...


@dataclass(frozen=True)
class TieredCacheStatistics:
    """A snapshot of both tiers (`TieredCache.statistics()`)."""

    memory: MemoryCacheStatistics
    local: StoreStatistics | None  # None when there is no local store

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"memory": dataclasses.asdict(self.memory)}
        if self.local is not None:
            out["local"] = dataclasses.asdict(self.local)
        return out


class TieredCache:
    """Memory tier, then the local store (a local hit is promoted into memory)."""

    def __init__(self, memory: MemoryCache | None = None, local: LocalStore | None = None) -> None:
        self.memory = memory if memory is not None else MemoryCache()
        self.local = local

    def lookup(self, key: str) -> Hit | None:
        entry = self.memory.get(key)
        if entry is not None:
            return Hit(entry.data, entry.cid, "memory")
        if self.local is not None:
            entry = self.local.get(key)
            if entry is not None:
                self.memory.put(key, entry.data, entry.cid)
                return Hit(entry.data, entry.cid, "local")
        return None

    def store(self, key: str, data: bytes, cid: str) -> None:
        self.memory.put(key, data, cid)
        if self.local is not None:
            self.local.put(key, data, cid)

    def clear(self) -> None:
        self.memory.clear()

    def statistics(self) -> TieredCacheStatistics:
        return TieredCacheStatistics(memory=self.memory.statistics(),
                                     local=self.local.statistics() if self.local is not None else None)

    def __repr__(self) -> str:
        return f"<TieredCache memory={self.memory!r} local={self.local!r}>"


class MappingCache:
    """A seed-style cache: any mutable mapping of request key -> response bytes (unbounded if a dict)."""

    def __init__(self, mapping: MutableMapping[str, Any]) -> None:
        self.mapping = mapping

    def lookup(self, key: str) -> Hit | None:
        data = self.mapping.get(key)
        if not isinstance(data, (bytes, bytearray)):
            return None
        return Hit(bytes(data), cid_of(bytes(data)), "memory")

    def store(self, key: str, data: bytes, cid: str) -> None:
        self.mapping[key] = data

    def clear(self) -> None:
        self.mapping.clear()


def as_response_cache(obj: Any) -> ResponseCache:
    """Accept what `RouterDeps(response_cache=...)` may be given and return a `ResponseCache`."""
    if isinstance(obj, (TieredCache, MappingCache)):
        return obj
    if isinstance(obj, MemoryCache):
        return TieredCache(obj)
    if isinstance(obj, LocalStore):
        return TieredCache(MemoryCache(), obj)
    if isinstance(obj, MutableMapping):
        return MappingCache(obj)
    if all(callable(getattr(obj, name, None)) for name in ("lookup", "store")):
        return obj  # type: ignore[no-any-return]
    raise TypeError(
        f"response_cache must be a MemoryCache, LocalStore, TieredCache, a mutable mapping, "
        f"or have lookup()/store(); got {type(obj).__name__}"
    )
