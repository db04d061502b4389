"""The provider-registry half of the public API (the router half is in node.router)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from node.deps import RouterDeps, get_default_router_deps
from node.errors import AllProvidersFailed, ProviderUnavailable
from node.providers import registry
from node.providers.base import BaseProvider, ProviderInfo

__all__ = [
    "LLMProvider",
    "llm_router_available",
    "builtin_provider",
    "response_cache_key",
    "register_llm_provider",
    "get_llm_provider",
    "list_llm_providers",
    "describe_llm_providers",
    "clear_llm_router_caches",
]


log = logging.getLogger(__name__)

llm_router_available = True  # the seed's flag: the router imported (here it always does)


@runtime_checkable
class LLMProvider(Protocol):
    """What a provider is to the seed, and all a registered provider needs: `generate`.

    Optional extras the router uses when present: ``agenerate`` (async), ``stream`` / ``astream``
    (text chunks), ``available()`` and a ``default_model`` attribute (node.providers.base).
    """

    def generate(self, prompt: str, *, model_name: str | None = None, **kwargs: Any) -> str: ...


def register_llm_provider(name: str, factory: Callable[[], Any]) -> None:
    """Register a provider factory: a zero-argument callable returning an object with
    ``generate(prompt, *, model_name=None, **kwargs) -> str`` (seed-compatible).

    Registering a name again replaces the factory and drops its cached instances.
    """
    registry.register(name, factory)
    get_default_router_deps().forget_provider(name)


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


def builtin_provider(name: str, deps: RouterDeps | None = None) -> BaseProvider | None:
    """The built-in provider `name` as the router would use it, or None when it is not ready
    (tool not on PATH, key not set, package missing, disabled) or `name` is no built-in.

    Never raises for a missing tool: `describe_llm_providers()` says why one is not ready.
    """
    if name not in registry.BUILTIN_PROVIDERS:
        return None
    deps = deps if deps is not None else get_default_router_deps()
    try:
        provider = deps.get_provider(name, deps.current_settings())
        return provider if provider.available().ok else None
    except Exception as exc:  # not installed, not configured, a readiness check that broke: not ready
        log.debug("built-in provider %s is not ready: %s", name, exc)
        return None


def response_cache_key(
    *,
    provider: str,
    model_name: str | None,
    prompt: Any,
    kwargs: Mapping[str, Any] | None = None,
    deps: RouterDeps | None = None,
) -> str:
    """The request key of a call, from its arguments alone (no provider is looked up or built).

    The model identity keyed is ``PROVIDER/MODEL`` (or ``PROVIDER`` with no model): the identity
    the router uses for every seed-style provider when the call names the model (a provider's
    own `default_model` is not known without constructing it: pass it as `model_name`). Built-ins
    that pin more into their identity key by that instead (echo: ``echo``; an OpenAI-compatible
    API adds its base URL; hf_local a digest of the weights), which `node.complete(...).key` reports. Reserved keyword arguments
    and parameters equal to their defaults do not change the key; any other change does. The
    default model and the key strategy (cid or sha256) come from the settings, as in the router.
    """
    from node.requests import build_request, request_key_for

    deps = deps if deps is not None else get_default_router_deps()
    settings = deps.current_settings()
    request = build_request(prompt, model_name=model_name, kwargs=dict(kwargs or {}), default_model=settings.model)
    identity = f"{provider}/{request.model}" if request.model else provider
    return request_key_for(request, identity, settings.cache_key)
