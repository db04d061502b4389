"""The provider-registry half of the public API (the router half is in node.router)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from node.deps import RouterDeps, get_default_router_deps
from node.errors import AllProvidersFailed, ProviderUnavailable
from node.providers import registry
from node.providers.base import BaseProvider, ProviderInfo

__all__ = [
    "register_llm_provider",
    "get_llm_provider",
    "list_llm_providers",
    "describe_llm_providers",
    "clear_llm_router_caches",
]


def register_llm_provider(name: str, factory: Callable[[], Any]) -> None:
    """Register a provider factory: a zero-argument callable returning an object with
    ``generate(prompt, *, model_name=None, **kwargs) -> str`` (seed-compatible).

    Registering a name again replaces the factory and drops its cached instances.
    """
    registry.register(name, factory)
    deps = get_default_router_deps()
    if deps.router_cache is not None:
        deps.router_cache.pop(name, None)


def list_llm_providers() -> list[str]:
    """Names of every provider: built-ins first, then registered ones."""
    return registry.names()


def get_llm_provider(name: str | None = None, *, deps: RouterDeps | None = None) -> BaseProvider:
    """The provider instance the router would use for `name` (None: configured, else first ready)."""
    from node.router import _candidates

    deps = deps if deps is not None else get_default_router_deps()
    settings = deps.current_settings()
    if name is not None:
        return deps.get_provider(name, settings)
    candidates, skipped, _ = _candidates(None, deps, settings)
    if not candidates:
        raise AllProvidersFailed(skipped)
    return candidates[0][1]


def describe_llm_providers(*, deps: RouterDeps | None = None) -> list[ProviderInfo]:
    """Every provider with whether it is ready, why (or why not), and the models it serves."""
    deps = deps if deps is not None else get_default_router_deps()
    settings = deps.current_settings()
    infos = []
    for name in registry.names():
        try:
            provider = deps.get_provider(name, settings)
            readiness = provider.available()
            models = tuple(provider.models())
        except (ProviderUnavailable, ImportError) as exc:
            infos.append(ProviderInfo(name, False, str(exc)))
            continue
        except Exception as exc:  # a broken third-party factory must not hide the others
            infos.append(ProviderInfo(name, False, f"could not be constructed: {type(exc).__name__}: {exc}"))
            continue
        infos.append(ProviderInfo(name, readiness.ok, readiness.reason, models))
    return infos


def clear_llm_router_caches(*, deps: RouterDeps | None = None) -> None:
    """Drop cached provider instances and cached responses (the default deps unless given)."""
    (deps if deps is not None else get_default_router_deps()).clear()
