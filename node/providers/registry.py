"""The provider registry: names -> factories, with built-ins imported only when first used."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

from node.errors import ProviderNotFound

__all__ = ["BUILTIN_PROVIDERS", "register", "unregister", "factory_for", "names", "is_registered", "user_registered"]

# name -> "module:attribute" of a zero-argument factory; imported on first use so that
# `import node` stays light. Later issues add the real providers here.
BUILTIN_PROVIDERS: dict[str, str] = {
    "echo": "node.providers.echo:EchoProvider",
    "hf_local": "node.providers.hf_local:HFLocalProvider",
    "embed": "node.providers.embed:EmbedProvider",
    "openai_compatible": "node.providers.openai_compatible:OpenAICompatibleProvider",
    "openrouter": "node.providers.openai_compatible:OpenRouterProvider",
    "codex_cli": "node.providers.codex_cli:CodexCLIProvider",
    "copilot_cli": "node.providers.copilot_cli:CopilotCLIProvider",
    "gemini_cli": "node.providers.gemini_cli:GeminiCLIProvider",
    "claude_code": "node.providers.claude_code:ClaudeCodeProvider",
    "copilot_sdk": "node.providers.copilot_sdk:CopilotSDKProvider",
    "mesh": "node.mesh.provider:DetachedMesh",  # a daemon pins its live mesh provider in its RouterDeps
}

_lock = threading.Lock()
_registered: dict[str, Callable[[], Any]] = {}


def register(name: str, factory: Callable[[], Any]) -> None:
    """Register (or replace) a provider factory under `name`."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("provider name must be a non-empty string")
    if not callable(factory):
        raise TypeError(f"factory for provider {name!r} must be callable, got {type(factory).__name__}")
    with _lock:
        _registered[name] = factory


def unregister(name: str) -> None:
    with _lock:
        _registered.pop(name, None)


def names() -> list[str]:
    """Built-in names in their declared order, then user registrations in registration order."""
    with _lock:
        extra = [n for n in _registered if n not in BUILTIN_PROVIDERS]
    return [*BUILTIN_PROVIDERS, *extra]


def user_registered() -> list[str]:
    """Names registered with `register` that are not built-ins, in registration order."""
    with _lock:
        return [n for n in _registered if n not in BUILTIN_PROVIDERS]


def is_registered(name: str) -> bool:
    with _lock:
        return name in _registered or name in BUILTIN_PROVIDERS


def factory_for(name: str) -> Callable[[], Any]:
    with _lock:
        factory = _registered.get(name)
    if factory is not None:
        return factory
    target = BUILTIN_PROVIDERS.get(name)
    if target is None:
        raise ProviderNotFound(name, names())
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
