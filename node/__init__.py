"""accelmesh: a peer-to-peer LLM inference mesh, and on one machine an LLM router.

    import node
    node.generate_text("Hello", provider="echo")        # -> "echo: Hello"

The public API is re-exported here and imported on first use, so `import node` stays light
(no torch, transformers or libp2p; no I/O).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "generate_text": "node.router",
    "agenerate_text": "node.router",
    "stream_text": "node.router",
    "astream_text": "node.router",
    "complete": "node.router",
    "acomplete": "node.router",
    "Result": "node.router",
    "embed": "node.embeddings",
    "aembed": "node.embeddings",
    "register_llm_provider": "node.api",
    "get_llm_provider": "node.api",
    "list_llm_providers": "node.api",
    "describe_llm_providers": "node.api",
    "clear_llm_router_caches": "node.api",
    "llm_router_available": "node.api",
    "LLMProvider": "node.api",
    "builtin_provider": "node.api",
    "response_cache_key": "node.api",
    "RouterDeps": "node.deps",
    "RemoteCacheProtocol": "node.deps",
    "get_default_router_deps": "node.deps",
    "set_default_router_deps": "node.deps",
    "ProviderInfo": "node.providers.base",
    "Readiness": "node.providers.base",
    "Settings": "node.config",
    "connect": "node.remote",
    "Client": "node.remote",
    "HttpClient": "node.http.client",
    "load_settings": "node.config",
}
_ERRORS = (
    "AccelmeshError", "ConfigError", "InvalidRequest", "CacheMiss", "DeadlineExceeded", "ProviderError",
    "ProviderNotFound", "ProviderUnavailable", "ProviderAuthError", "ModelNotFound", "RateLimited",
    "ProviderTimeout", "ProviderFailed", "AllProvidersFailed", "Busy", "Disagreement", "DaemonError",
)
_EXPORTS.update(dict.fromkeys(_ERRORS, "node.errors"))

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'node' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from node.api import (
        LLMProvider,
        builtin_provider,
        clear_llm_router_caches,
        describe_llm_providers,
        get_llm_provider,
        list_llm_providers,
        llm_router_available,
        register_llm_provider,
        response_cache_key,
    )
    from node.config import Settings, load_settings
    from node.deps import RemoteCacheProtocol, RouterDeps, get_default_router_deps, set_default_router_deps
    from node.embeddings import aembed, embed
    from node.errors import *  # noqa: F403
    from node.http.client import HttpClient
    from node.providers.base import ProviderInfo, Readiness
    from node.remote import Client, connect
    from node.router import (
        Result,
        acomplete,
        agenerate_text,
        astream_text,
        complete,
        generate_text,
        stream_text,
    )
