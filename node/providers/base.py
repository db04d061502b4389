"""What a provider is: the interface the router calls, and the adapter for seed-style objects.

A seed-style provider is any object with ``generate(prompt, *, model_name=None, **kwargs) -> str``.
It may also offer ``agenerate`` (async), ``stream`` / ``astream`` (text chunks),
``available() -> Readiness | bool`` and a ``default_model`` attribute. `adapt()` wraps such an
object in `PlainProvider`, so the router only ever talks to `BaseProvider`:

- ``astream(request)`` yields text deltas (``str``) and ends with exactly one `Completion`;
- ``complete_sync(request)`` answers without an event loop (the fast path of `generate_text`);
- ``available()`` says whether the prerequisites are really there, and if not, why;
- ``model_identity(model)`` names the model that will answer, for the request key;
- ``capacity()`` says how many requests it runs at once (None: no cap of its own), for the advert;
- ``advertised_identity(model)`` is ``model_identity(model)`` when that is already known (cheap, no
  weights read), else None, for the advert (peers key a request with it before they send it).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

from node.errors import InvalidRequest, ProviderError, ProviderFailed, ProviderUnavailable
from protocols.vocabulary import ACCELERATOR_KINDS  # noqa: F401 (re-exported: what `accelerator=` may name)

__all__ = [
    "ACCELERATOR_KINDS",
    "AdmissionSlot",
    "Readiness",
    "READY",
    "ProviderInfo",
    "Completion",
    "ProviderRequest",
    "RemoteAnswer",
    "BaseProvider",
    "PlainProvider",
    "adapt",
    "DisabledProvider",
    "DISABLED",
    "messages_to_text",
]


class AdmissionSlot(Protocol):
    """A daemon's admission slot as a request carries it (node.admission.Slot): the router holds it
    around work a local provider does; a provider that routes elsewhere hands it back meanwhile."""

    held: bool  # False while handed off

    def hand_off(self) -> None: ...

    async def take_back(self) -> None: ...

    def local(self) -> AbstractAsyncContextManager[None]: ...


class Readiness(NamedTuple):
    """Whether a provider can serve now; `reason` says why not (or what it runs on)."""

    ok: bool
    reason: str


READY = Readiness(True, "ready")


@dataclass(frozen=True)
class ProviderInfo:
    name: str
    ready: bool
    reason: str
    models: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ready": self.ready, "reason": self.reason, "models": list(self.models)}


@dataclass(frozen=True)
class RemoteAnswer:
    """An answer computed by another node: its exact response bytes (checked against `cid`) and where."""

    response: bytes
    cid: str
    key: str  # the request key the serving node computed (its model identity, its weights)
    peer: str  # the peer that computed it
    provider: str  # the provider that answered there
    cache: str  # the tier the serving node found it in
    served_from: str | None = None
    agreed: tuple[str, ...] = ()  # verify=k: the nodes that computed this same response CID


@dataclass(frozen=True)
class Completion:
    """A provider's finished answer."""

    text: str
    model: str | None = None
    finish_reason: str = "stop"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    remote: RemoteAnswer | None = None  # set by providers that route to other nodes (the mesh)
    embedding: tuple[float, ...] | None = None  # task "embed": the vector (text is "")

    @property
    def usage(self) -> dict[str, int]:
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        return {k: v for k, v in usage.items() if v is not None}


@dataclass(frozen=True)
class ProviderRequest:
    """One request as a provider sees it: reserved arguments already taken out."""

    task: str  # "generate", "chat" or "embed"
    prompt: str | None
    messages: tuple[Mapping[str, Any], ...] | None
    model: str | None
    params: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = 120.0  # seconds left when the provider is called
    request_id: str = ""
    # Routing constraints and the cache mode, for providers that send the request elsewhere.
    on_peers: tuple[str, ...] = ()
    accelerator: str | None = None
    strategy: str | None = None
    cache_mode: str = "default"
    verify: int = 1  # nodes that must return the same response CID (only the mesh can ask several)
    # In a daemon, the request's admission slot (node.admission.Slot); None in-process. The router
    # holds it (`slot.local()`) around a local provider's work; a provider that routes to another
    # node frees it with `slot.hand_off()` while that node serves. Not part of the request's identity.
    slot: AdmissionSlot | None = field(default=None, compare=False, repr=False)

    @property
    def sampled(self) -> bool:
        """Sampling without a seed: the answer may differ each time (`is_sampled`)."""
        return is_sampled(self.params)

    @property
    def text(self) -> str:
        """The prompt, or chat messages joined as plain text for providers without chat."""
        if self.prompt is not None:
            return self.prompt
        return messages_to_text(self.messages or ())

    @property
    def last_user_message(self) -> str:
        for message in reversed(self.messages or ()):
            if message.get("role") == "user":
                return str(message.get("content", ""))
        return self.text


def is_sampled(params: Mapping[str, Any]) -> bool:
    """Sampling without a seed (temperature > 0, no seed): the answer may differ each time, so it is
    not cached, and an answer broken off mid-stream cannot be resumed on another node."""
    return float(params.get("temperature", 0.0)) > 0.0 and params.get("seed") is None


def messages_to_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The documented plain join used when a provider has no chat format: ``role: content`` lines."""
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


class BaseProvider:
    """Base of the built-in providers. Subclasses implement `astream` (and may add a sync path)."""

    name: ClassVar[str] = "base"
    tasks: ClassVar[tuple[str, ...]] = ("generate", "chat")
    # True for a provider that hands the request to another node (the mesh): the entry node cannot
    # key the request before it knows which model will answer, so it skips its own lookups.
    routes_remotely: ClassVar[bool] = False

    def available(self) -> Readiness:
        return READY

    def models(self) -> tuple[str, ...]:
        return ()

    def default_model(self) -> str | None:
        models = self.models()
        return models[0] if models else None

    def accelerator(self) -> str | None:
        """The kind of device this provider computes on here (cuda, rocm, mps, cpu); None when it
        computes elsewhere (an API, a command-line tool's service). Read for `accelerator=`."""
        return None

    def capacity(self) -> int | None:
        """How many requests this provider runs at once (at least 1), or None when it has no cap of
        its own (an API, a command-line tool: unlimited here; the node's `max_concurrent` still
        bounds it). Advertised per provider (`ProviderEntry.capacity`) for peers balancing load."""
        return None

    def model_identity(self, model: str | None) -> str:
        """What goes into the request key for the model that will answer."""
        model = model or self.default_model()
        return f"{self.name}/{model}" if model else self.name

    def advertised_identity(self, model: str | None) -> str | None:
        """`model_identity(model)` if it is known without loading or reading weights, else None.

        Read each time this node's advert is built (`ProviderEntry.identities`), so it must stay
        cheap: a provider whose identity needs its weights (hf_local) overrides it to answer only
        what it already knows. The default is `model_identity`, a name for every other provider."""
        return self.model_identity(model)

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        raise NotImplementedError  # pragma: no cover - every provider overrides it
        yield  # noqa: unreachable - makes this an async generator for type checkers

    async def acomplete(self, request: ProviderRequest) -> Completion:
        completion = None
        async for item in self.astream(request):
            if isinstance(item, Completion):
                completion = item
        if completion is None:
            raise ProviderFailed(self.name, "stream ended without a completion")
        return completion

    def complete_sync(self, request: ProviderRequest) -> Completion:
        """Answer from plain synchronous code. The default runs `acomplete` in its own trio loop."""
        import trio

        return trio.run(self.acomplete, request)

    # The seed's plain interface, so a built-in provider can be used directly.
    def generate(self, prompt: str, *, model_name: str | None = None, **kwargs: Any) -> str:
        request = ProviderRequest(task="generate", prompt=prompt, messages=None, model=model_name, params=kwargs)
        return self.complete_sync(request).text

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class PlainProvider(BaseProvider):
    """Adapter for any object with ``generate(prompt, *, model_name=None, **kwargs) -> str``."""

    def __init__(self, name: str, obj: Any) -> None:
        if not callable(getattr(obj, "generate", None)) and not callable(getattr(obj, "agenerate", None)):
            raise InvalidRequest(f"provider {name!r}: {type(obj).__name__} has no generate(prompt, ...) method")
        self.name = name  # type: ignore[misc]  # instance attribute shadows the ClassVar on purpose
        self.obj = obj

    def available(self) -> Readiness:
        check = getattr(self.obj, "available", None)
        if check is None:
            return READY
        try:
            result = check() if callable(check) else check
        except Exception as exc:  # a third-party readiness check must not break provider listing
            return Readiness(False, f"available() raised {type(exc).__name__}: {exc}")
        if isinstance(result, tuple) and len(result) == 2:
            return Readiness(bool(result[0]), str(result[1]))
        return READY if result else Readiness(False, "available() returned false")

    def default_model(self) -> str | None:
        model = getattr(self.obj, "default_model", None)
        return model if isinstance(model, str) and model else None

    def models(self) -> tuple[str, ...]:
        default = self.default_model()
        return (default,) if default else ()

    def _kwargs(self, request: ProviderRequest) -> dict[str, Any]:
        kwargs = dict(request.params)
        if request.messages is not None:
            kwargs["messages"] = [dict(m) for m in request.messages]
        return kwargs

    def _call(self, fn: Any, request: ProviderRequest) -> Any:
        try:
            return fn(request.text, model_name=request.model, **self._kwargs(request))
        except ProviderError:
            raise
        except Exception as exc:  # third-party code: any failure is this provider's failure
            raise ProviderFailed(self.name, f"{type(exc).__name__}: {exc}") from exc

    def _completion(self, text: Any, request: ProviderRequest) -> Completion:
        if not isinstance(text, str):
            raise ProviderFailed(self.name, f"generate() returned {type(text).__name__}, expected str")
        return Completion(text=text, model=request.model or self.default_model())

    def complete_sync(self, request: ProviderRequest) -> Completion:
        if callable(getattr(self.obj, "generate", None)):
            return self._completion(self._call(self.obj.generate, request), request)
        return super().complete_sync(request)

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        import trio

        astream, stream = getattr(self.obj, "astream", None), getattr(self.obj, "stream", None)
        agenerate = getattr(self.obj, "agenerate", None)
        if callable(astream):
            parts = []
            async for chunk in self._call(astream, request):
                parts.append(str(chunk))
                yield str(chunk)
            yield self._completion("".join(parts), request)
        elif callable(stream):
            iterator: Iterator[Any] = iter(self._call(stream, request))
            parts = []
            while True:
                chunk = await trio.to_thread.run_sync(_next_or_none, iterator, self.name, abandon_on_cancel=True)
                if chunk is None:
                    break
                parts.append(str(chunk))
                yield str(chunk)
            yield self._completion("".join(parts), request)
        elif callable(agenerate) and inspect.iscoroutinefunction(agenerate):
            text = await self._call(agenerate, request)
            completion = self._completion(text, request)
            yield completion.text
            yield completion
        else:
            text = await trio.to_thread.run_sync(self._call, self.obj.generate, request, abandon_on_cancel=True)
            completion = self._completion(text, request)
            yield completion.text
            yield completion


def _next_or_none(iterator: Iterator[Any], name: str) -> Any:
    try:
        return next(iterator)
    except StopIteration:
        return None
    except ProviderError:
        raise
    except Exception as exc:
        raise ProviderFailed(name, f"{type(exc).__name__}: {exc}") from exc


DISABLED = "disabled"  # the readiness reason of a built-in provider switched off in the settings


class DisabledProvider(BaseProvider):
    """A built-in provider switched off in the settings (`enabled = false`): never ready, never advertised."""

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]  # instance attribute shadows the ClassVar on purpose

    def available(self) -> Readiness:
        return Readiness(False, DISABLED)

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        raise ProviderUnavailable(self.name, DISABLED)
        yield  # pragma: no cover - makes this an async generator

    def complete_sync(self, request: ProviderRequest) -> Completion:
        raise ProviderUnavailable(self.name, DISABLED)


def adapt(name: str, obj: Any) -> BaseProvider:
    """Wrap `obj` for the router unless it already is a `BaseProvider`."""
    return obj if isinstance(obj, BaseProvider) else PlainProvider(name, obj)
