"""RouterDeps: the shared state of a group of router calls (provider instances, caches, counters).

Calls that share a `RouterDeps` share its provider instances and its response cache. A
`RouterDeps()` whose caches are None creates a bounded memory response cache on first use
and keeps it. `remote_cache` is any object with sync ``get(key) -> bytes | None`` and
``set(key, value: bytes)`` (`RemoteCacheProtocol`; async code calls it in a worker thread); its
hits count as the ``cluster`` tier.

The seed's container API is here too: `router_cache` is a dict of shared instances (the router
keeps its provider instances there under ``provider:NAME``), read and written with
`get_cached` / `set_cached` / `get_or_create` (thread-safe; `factory` runs once per key even when
threads race for it), `get_cached_or_remote` / `set_cached_and_remote` (best effort to
`remote_cache`), and `get_backend_manager()`.
"""

from __future__ import annotations

import threading
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from node.cache import MemoryCache, ResponseCache, TieredCache, as_response_cache
from node.config import Settings, current_settings, provider_section
from node.providers import registry
from node.providers.base import BaseProvider, DisabledProvider, adapt
from node._singleflight import InFlight
from protocols.vocabulary import CACHE_TIERS

__all__ = [
    "RouterDeps",
    "RemoteCacheProtocol",
    "RouterStatistics",
    "get_default_router_deps",
    "set_default_router_deps",
    "TIERS",
]

TIERS = CACHE_TIERS  # answers are counted by tier
PROVIDER_PREFIX = "provider:"  # the router keeps provider NAME in `router_cache` under "provider:NAME"

log = logging.getLogger(__name__)
T = TypeVar("T")


@runtime_checkable
class RemoteCacheProtocol(Protocol):
    """What `RouterDeps(remote_cache=...)` needs: a shared cache the router reads on a miss and
    writes after an answer (best effort: its errors are logged, never raised to the caller)."""

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes) -> None: ...


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
        # Shared instances: the router's providers (under ``provider:NAME``) and the caller's own.
        self.router_cache: dict[str, Any] = router_cache if router_cache is not None else {}
        self._response_cache_arg = response_cache
        self._response_cache: ResponseCache | None = (
            as_response_cache(response_cache) if response_cache is not None else None
        )
        self.remote_cache = remote_cache
        self.backend_manager = backend_manager
        self.cluster_cache: Any = None  # a daemon's cluster tier (node.cache.cluster.ClusterCache): async, set by it
        self.settings = settings  # None: read the environment at each call
        self.inflight = InFlight()
        self.pinned: dict[str, BaseProvider] = {}  # instances owned by the caller (the daemon's mesh provider)
        self._lock = threading.Lock()
        self._creating: dict[str, threading.Lock] = {}  # key -> lock held while its factory runs
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
        cache_key = PROVIDER_PREFIX + name
        with self._lock:
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
        section = provider_section(settings, name) if name in registry.BUILTIN_PROVIDERS else None
        if section is not None and not section.enabled:
            return DisabledProvider(name)  # `enabled = false`: not ready, reason "disabled"
        factory = registry.factory_for(name)
        if isinstance(factory, type) and issubclass(factory, BaseProvider) and hasattr(factory, "from_settings"):
            provider = factory.from_settings(settings)
            provider._accelmesh_settings = settings  # type: ignore[attr-defined]  # rebuilt if settings change
            return provider
        return adapt(name, factory())

    def forget_provider(self, name: str) -> None:
        """Drop the cached instance of provider `name` (it is built again on next use)."""
        with self._lock:
            self.router_cache.pop(PROVIDER_PREFIX + name, None)

    def clear(self) -> None:
        """Forget provider instances and cached responses (the caller's own shared instances and the
        counters are kept)."""
        prefix = PROVIDER_PREFIX
        with self._lock:
            for key in [k for k in self.router_cache if k.startswith(prefix)]:
                del self.router_cache[key]
        if self._response_cache is not None:
            self._response_cache.clear()

    # -- the seed's shared-instance API -------------------------------------------------

    def get_cached(self, key: str) -> Any:
        """The instance kept under `key`, or None."""
        if not key:
            return None
        with self._lock:
            return self.router_cache.get(key)

    def set_cached(self, key: str, value: T) -> T:
        """Keep `value` under `key` (an empty key keeps nothing) and return it."""
        if key:
            with self._lock:
                self.router_cache[key] = value
        return value

    def get_or_create(self, key: str, factory: Callable[[], T]) -> T:
        """The instance under `key`, made by `factory()` if there is none yet.

        Threads racing for the same key wait for the first one's factory: it runs once per key
        (again only if it raised). Other keys are not held up. An empty key is never kept. Not
        re-entrant: a factory must not ask for its own key.
        """
        if not key:
            return factory()
        with self._lock:
            if key in self.router_cache:
                return self.router_cache[key]  # type: ignore[no-any-return]
            creating = self._creating.setdefault(key, threading.Lock())
        with creating:
            try:
                with self._lock:
                    if key in self.router_cache:
                        return self.router_cache[key]  # type: ignore[no-any-return]
                value = factory()
                with self._lock:
                    self.router_cache[key] = value
                return value
            finally:
                with self._lock:
                    if self._creating.get(key) is creating:
                        del self._creating[key]

    def get_cached_or_remote(self, key: str) -> Any:
        """`get_cached(key)`, else `remote_cache.get(key)` (kept locally when found); None if neither
        has it. A failing remote cache counts as a miss (logged)."""
        cached = self.get_cached(key)
        if cached is not None or not key or self.remote_cache is None:
            return cached
        try:
            value = self.remote_cache.get(key)
        except Exception as exc:  # a third-party cache must not fail the caller
            log.warning("remote cache get(%s) failed: %s", key, exc)
            return None
        if value is not None:
            self.set_cached(key, value)
        return value

    def set_cached_and_remote(self, key: str, value: T) -> T:
        """`set_cached(key, value)`, then best effort `remote_cache.set(key, value)` (failures logged)."""
        self.set_cached(key, value)
        if key and self.remote_cache is not None:
            try:
                self.remote_cache.set(key, value)
            except Exception as exc:  # best effort by contract
                log.warning("remote cache set(%s) failed: %s", key, exc)
        return value

    def get_backend_manager(self, **_seed_options: Any) -> Any:
        """The mesh's backend manager on a daemon; None in a plain process. (The seed's keyword
        options, `purpose`, `enable_health_checks`, `load_balancing_strategy`, are accepted and
        ignored: a daemon's manager is configured by its settings.)"""
        return self.backend_manager

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
