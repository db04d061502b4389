"""The memory tier: a thread-safe LRU of response bytes, bounded in entries and bytes, with a TTL."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MemoryCache", "MemoryCacheStatistics", "Entry"]


@dataclass(frozen=True)
class Entry:
    data: bytes  # canonical response bytes
    cid: str  # their response CID
    expires: float  # clock time after which the entry is gone; inf = never


@dataclass(frozen=True)
class MemoryCacheStatistics:
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int
    expirations: int


class MemoryCache:
    """Request key -> (response bytes, response CID).

    Bounded by `max_entries` and `max_bytes` (least recently used goes first); an entry
    older than `ttl` seconds (0 = no TTL) is a miss. An entry larger than `max_bytes` on
    its own is not stored. `clock` is injectable so tests control time.
    """

    def __init__(
        self,
        max_entries: int = 4096,
        max_bytes: int = 64 * 1024 * 1024,
        ttl: float = 3600.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or ttl < 0:
            raise ValueError("max_entries and max_bytes must be >= 1 and ttl >= 0")
        self.max_entries, self.max_bytes, self.ttl = max_entries, max_bytes, ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._expirations = 0

    def get(self, key: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires <= self._clock():
                self._drop(key)
                self._expirations += 1
                entry = None
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry

    def put(self, key: str, data: bytes, cid: str) -> bool:
        """Store an entry; False when it alone is larger than `max_bytes`."""
        size = len(data)
        if size > self.max_bytes:
            return False
        expires = self._clock() + self.ttl if self.ttl else float("inf")
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = Entry(data, cid, expires)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self._evictions += 1
        return True

    def delete(self, key: str) -> bool:
        with self._lock:
            if key not in self._entries:
                return False
            self._drop(key)
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: str) -> None:
        self._bytes -= len(self._entries.pop(key).data)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def statistics(self) -> MemoryCacheStatistics:
        with self._lock:
            return MemoryCacheStatistics(
                entries=len(self._entries), bytes=self._bytes, max_entries=self.max_entries,
                max_bytes=self.max_bytes, hits=self._hits, misses=self._misses,
                evictions=self._evictions, expirations=self._expirations,
            )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<MemoryCache {s.entries}/{s.max_entries} entries, {s.bytes}/{s.max_bytes} bytes, "
            f"ttl={self.ttl:g}s, hits={s.hits} misses={s.misses}>"
        )
