"""RouterDeps: the shared state of a group of router calls (provider instances, caches, counters).

Calls that share a `RouterDeps` share its provider instances and its response cache. A
`RouterDeps()` whose caches are None creates a bounded memory response cache on first use
and keeps it. `remote_cache` is any object with sync ``get(key) -> bytes | None`` and
``set(key, value: bytes)`` (async code calls it in a worker thread); its hits count as the
``cluster`` tier.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from node.cache import MemoryCache, ResponseCache, TieredCache, as_response_cache
from node.config import Settings, current_settings
from node.providers import registry
from node.providers.base import BaseProvider, adapt
from node._singleflight import InFlight

__all__ = [
    "RouterDeps",
    "RouterStatistics",
    "get_default_router_deps",
    "set_default_router_deps",
    "TIERS",
]

TIERS = ("memory", "local", "cluster", "miss", "bypass")


@dataclass(frozen=True)
class RouterStatistics:
    inferences: int  # provider answers produced (cache misses and bypasses that succeeded)
    cache: dict[str, int]  # answers by tier: memory, local, cluster, miss, bypass
    failures: dict[str, int]  # failed attempts by provider name
    in_flight: int  # distinct request keys being computed right now

    def to_json(self) -> dict[str, Any]:
        return {"inferences": self.inferences, "cache": dict(self.cache)}


class RouterDeps:
    def __init__(
        self,
        router_cache: dict[str, Any] | None = None,
        response_cache: Any = None,
        remote_cache: Any = None,
        backend_manager: Any = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        self.router_cache = router_cache  # provider instances by name; made on first use
        self._response_cache_arg = response_cache
        self._response_cache: ResponseCache | None = (
            as_response_cache(response_cache) if response_cache is not None else None
        )
        self.remote_cache = remote_cache
        self.backend_manager = backend_manager
        self.settings = settings  # None: read the environment at each call
        self.inflight = InFlight()
        self.pinned: dict[str, BaseProvider] = {}  # instances owned by the caller (the daemon's mesh provider)
        self._lock = threading.Lock()
        self._tiers = dict.fromkeys(TIERS, 0)
        self._inferences = 0
        self._failures: dict[str, int] = {}

    # -- settings, caches, providers ---------------------------------------------------

    def current_settings(self) -> Settings:
        return self.settings if self.settings is not None else current_settings()

    @property
    def response_cache(self) -> Any:
        return self._response_cache_arg

    def get_response_cache(self, settings: Settings) -> ResponseCache:
        if self._response_cache is None:
            with self._lock:
                if self._response_cache is None:
                    c = settings.cache
                    memory = MemoryCache(c.memory_max_entries, c.memory_max_bytes, c.memory_ttl)
                    self._response_cache = TieredCache(memory)
                    self._response_cache_arg = memory
        return self._response_cache

    def pin_provider(self, name: str, provider: BaseProvider) -> None:
        """Use this instance for `name` in calls with these deps, whatever the provider-cache setting."""
        self.pinned[name] = provider

    def get_provider(self, name: str, settings: Settings) -> BaseProvider:
        """The provider instance for `name`, constructed once per settings when provider caching is on."""
        pinned = self.pinned.get(name)
        if pinned is not None:
            return pinned
        if not settings.provider_cache:
            return self._construct(name, settings)
        cache_key = name
        with self._lock:
            if self.router_cache is None:
                self.router_cache = {}
            cached = self.router_cache.get(cache_key)
        built_with = getattr(cached, "_accelmesh_settings", settings)
        if cached is not None and (built_with is settings or built_with == settings):
            return cached  # type: ignore[no-any-return]
        provider = self._construct(name, settings)
        with self._lock:
            self.router_cache[cache_key] = provider
        return provider

    @staticmethod
    def _construct(name: str, settings: Settings) -> BaseProvider:
        factory = registry.factory_for(name)
        if isinstance(factory, type) and issubclass(factory, BaseProvider) and hasattr(factory, "from_settings"):
            provider = factory.from_settings(settings)
            provider._accelmesh_settings = settings  # type: ignore[attr-defined]  # rebuilt if settings change
            return provider
        return adapt(name, factory())

    def clear(self) -> None:
        """Forget provider instances and cached responses (counters are kept)."""
        with self._lock:
            if self.router_cache is not None:
                self.router_cache.clear()
        if self._response_cache is not None:
            self._response_cache.clear()

    # -- counters ----------------------------------------------------------------------

    def count(self, tier: str, *, inference: bool = False) -> None:
        with self._lock:
            self._tiers[tier] += 1
            if inference:
                self._inferences += 1

    def count_failure(self, provider: str) -> None:
        with self._lock:
            self._failures[provider] = self._failures.get(provider, 0) + 1

    def statistics(self) -> RouterStatistics:
        with self._lock:
            return RouterStatistics(
                inferences=self._inferences,
                cache=dict(self._tiers),
                failures=dict(self._failures),
                in_flight=len(self.inflight),
            )

    def __repr__(self) -> str:
        s = self.statistics()
        cache = self._response_cache
        return f"<RouterDeps inferences={s.inferences} tiers={s.cache} cache={cache!r}>"


_default_lock = threading.Lock()
_default: RouterDeps | None = None


def get_default_router_deps() -> RouterDeps:
    """The process-wide deps used when a call passes none (created on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = RouterDeps()
    return _default


def set_default_router_deps(deps: RouterDeps | None) -> None:
    """Replace the process-wide deps (None: a fresh one is made on next use)."""
    global _default
    with _default_lock:
        _default = deps
