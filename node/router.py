"""The router: a prompt -> request key -> cache tiers -> providers in fallback order -> an answer.

For each candidate provider, in order (an explicit or configured provider is the only one):

1. compute the request key from the identity of the model that provider would use;
2. look the key up (memory, local store, remote cache) unless the cache mode skips lookups;
3. on a miss, run the provider (identical concurrent requests run once: single flight);
4. encode the answer canonically, hash it into the response CID, store it, return it.

A provider that fails (a `ProviderError`) hands over to the next candidate while the
deadline lasts; a streaming answer falls back only before its first chunk. When every
candidate failed or was skipped, `AllProvidersFailed` lists each one with its cause.

Two executors share these steps: a synchronous one (`complete`, behind `generate_text`) that
calls providers directly with no event loop, and a trio one (`aiter_request`, behind the
async and streaming functions).
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from node.deps import RouterDeps, get_default_router_deps
from node.errors import (
    AllProvidersFailed,
    CacheMiss,
    DeadlineExceeded,
    InvalidRequest,
    ProviderError,
    ProviderFailed,
    ProviderTimeout,
    ProviderUnavailable,
)
from node.providers import registry
from node.providers.base import ACCELERATOR_KINDS, LOCAL_SLOT, BaseProvider, Completion, ProviderRequest
from protocols.canonical import canonicalize, decode_response, request_bytes, response_bytes
from protocols.cid import cid_of, request_key
from protocols.errors import MalformedMessage, NotCanonical

__all__ = [
    "RESERVED_KWARGS",
    "CACHE_MODES",
    "Request",
    "Result",
    "build_request",
    "complete",
    "acomplete",
    "aiter_request",
    "generate_text",
    "agenerate_text",
    "stream_text",
    "astream_text",
]

# Never sent to a provider, never part of a request key (INTERFACES.md "Python API").
RESERVED_KWARGS = frozenset({"timeout", "cache", "stream", "request_id", "deps", "on_peers", "accelerator", "strategy"})
CACHE_MODES = ("default", "no-store", "no-cache", "only-if-cached", "force", "private")
# A parameter equal to its default is dropped before keying, so spelling it out keeps the key.
PARAM_DEFAULTS: Mapping[str, Any] = {
    "temperature": 0.0,
    "top_p": 1.0,
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
_FLOAT_PARAMS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty"})


# ---------------------------------------------------------------------------------------
# Requests and results


@dataclass(frozen=True)
class Request:
    """A normalized request: what determines the answer, and how to get it."""

    task: str  # "generate" (a prompt) or "chat" (messages)
    prompt: str | None
    messages: tuple[Mapping[str, Any], ...] | None
    model: str | None  # explicit model, else the configured default, else None (provider's default)
    params: Mapping[str, Any]  # non-reserved keyword arguments, defaults dropped
    cache_mode: str = "default"
    timeout: float = 120.0
    request_id: str = ""
    on_peers: tuple[str, ...] = ()
    accelerator: str | None = None
    strategy: str | None = None

    @property
    def sampled(self) -> bool:
        """Sampling without a seed: the answer may differ each time, so it is not cached."""
        return float(self.params.get("temperature", 0.0)) > 0.0 and self.params.get("seed") is None

    def for_provider(self, timeout: float) -> ProviderRequest:
        return ProviderRequest(
            task=self.task, prompt=self.prompt, messages=self.messages, model=self.model,
            params=dict(self.params), timeout=timeout, request_id=self.request_id, on_peers=self.on_peers,
            accelerator=self.accelerator, strategy=self.strategy, cache_mode=self.cache_mode,
        )


@dataclass(frozen=True)
class Result:
    """An answer and where it came from (INTERFACES.md `--json` shape)."""

    text: str
    provider: str
    model: str  # identity of the model that answered (what the request key covered)
    cache: str  # tier: memory, local, cluster, miss, bypass
    key: str  # request key
    cid: str  # response CID
    request_id: str
    latency_ms: float
    finish_reason: str = "stop"
    usage: Mapping[str, int] = field(default_factory=dict)
    peer: str | None = None  # peer id that computed the answer (set when a daemon handled it)
    served_from: str | None = None  # peer that supplied a cluster hit
    response: bytes = field(default=b"", repr=False)  # the canonical response bytes (their CID is `cid`)

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "provider": self.provider,
            "model": self.model,
            "cache": self.cache,
            "key": self.key,
            "cid": self.cid,
            "request_id": self.request_id,
            "peer": self.peer,
            "served_from": self.served_from,
            "latency_ms": round(self.latency_ms, 3),
        }


def _messages(value: Sequence[Any]) -> tuple[Mapping[str, Any], ...]:
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"messages[{i}] must be a mapping with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}] needs string 'role' and 'content'")
        out.append(dict(message))
    if not out:
        raise InvalidRequest("messages must not be empty")
    return tuple(out)


def _params(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, value in kwargs.items():
        if value is None:
            continue
        if name in _FLOAT_PARAMS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
            value = float(value)
        if name == "temperature" and value < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {value!r}")
        if name == "top_p" and not 0.0 < value <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {value!r}")
        if name in ("max_tokens", "seed", "n") and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequest(f"{name} must be an integer, got {value!r}")
        if name == "max_tokens" and value < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {value!r}")
        if name == "stop":
            value = [value] if isinstance(value, str) else list(value)
            if not all(isinstance(s, str) for s in value):
                raise InvalidRequest("stop must be a string or a list of strings")
            if not value:
                continue
        if name in PARAM_DEFAULTS and value == PARAM_DEFAULTS[name]:
            continue
        params[name] = value
    try:
        return canonicalize(params)  # type: ignore[no-any-return]
    except NotCanonical as exc:
        raise InvalidRequest(f"keyword argument {exc.path}: {exc.reason}") from None


def build_request(
    prompt: Any,
    *,
    model_name: str | None,
    kwargs: Mapping[str, Any],
    default_model: str | None = None,
    default_timeout: float = 120.0,
) -> Request:
    """Split reserved arguments from parameters, validate them, drop defaults."""
    reserved = {k: v for k, v in kwargs.items() if k in RESERVED_KWARGS}
    params = _params({k: v for k, v in kwargs.items() if k not in RESERVED_KWARGS})
    if isinstance(prompt, str):
        task, text, messages = "generate", prompt, None
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        task, text, messages = "chat", None, _messages(prompt)
    else:
        raise InvalidRequest(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if model_name is not None and not isinstance(model_name, str):
        raise InvalidRequest(f"model_name must be a string, got {type(model_name).__name__}")

    mode = reserved.get("cache")
    if mode is None or mode is True:
        mode = "default"
    elif mode is False:
        mode = "no-cache"
    if mode not in CACHE_MODES:
        raise InvalidRequest(f"cache mode {mode!r} is not one of {', '.join(CACHE_MODES)}")
    timeout = reserved.get("timeout")
    timeout = default_timeout if timeout is None else timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidRequest(f"timeout must be a positive number of seconds, got {timeout!r}")
    on_peers = reserved.get("on_peers") or ()
    on_peers = (on_peers,) if isinstance(on_peers, str) else on_peers
    if not isinstance(on_peers, (list, tuple)) or not all(isinstance(p, str) and p for p in on_peers):
        raise InvalidRequest(f"on_peers must be a peer id or a list of peer ids, got {on_peers!r}")
    accelerator = reserved.get("accelerator")
    if accelerator is not None and accelerator not in ACCELERATOR_KINDS:
        raise InvalidRequest(f"accelerator must be one of {', '.join(ACCELERATOR_KINDS)}, got {accelerator!r}")
    return Request(
        task=task,
        prompt=text,
        messages=messages,
        model=model_name or default_model,
        params=params,
        cache_mode=mode,
        timeout=float(timeout),
        request_id=str(reserved.get("request_id") or uuid.uuid4().hex),
        on_peers=tuple(on_peers),
        accelerator=accelerator,
        strategy=reserved.get("strategy"),
    )


# ---------------------------------------------------------------------------------------
# Provider resolution


def _chain(settings: Any) -> list[str]:
    """The fallback chain: [mesh if enabled], [providers registered here], the configured order."""
    order = list(settings.fallback_order)
    if settings.sources.get("fallback_order", "default") == "default":
        # Providers registered in this process go first: registering one is a statement of intent.
        mine = registry.user_registered()
        order = [*mine, *(n for n in order if n not in mine)]
    if settings.enable_mesh and "mesh" not in order:
        order.insert(0, "mesh")
    return order


def _serving(deps: RouterDeps, settings: Any, model: str) -> list[str]:
    """Registered providers (the mesh aside) that list `model` among the models they serve."""
    out = []
    for name in registry.names():
        if name == "mesh":
            continue
        try:
            if model in deps.get_provider(name, settings).models():
                out.append(name)
        except Exception:  # a provider that cannot be built lists nothing; the chain reports why
            continue
    return out


def _candidates(
    name: str | None, deps: RouterDeps, settings: Any, model: str | None = None
) -> tuple[list[tuple[str, BaseProvider]], list[tuple[str, BaseException | str]], bool]:
    """(providers to try in order, providers skipped with their reason, whether one was named).

    With a model named, the providers that list it come right after the mesh, before the rest
    of the chain (which may still serve model ids it does not list, e.g. an OpenAI-compatible API).
    """
    chosen = name or settings.provider
    if chosen:
        provider = deps.get_provider(chosen, settings)
        readiness = provider.available()
        if not readiness.ok:
            raise ProviderUnavailable(chosen, readiness.reason)
        return [(chosen, provider)], [], True
    ready: list[tuple[str, BaseProvider]] = []
    skipped: list[tuple[str, BaseException | str]] = []
    order = _chain(settings)
    if model:
        listing = _serving(deps, settings, model)
        head = ["mesh"] if order[:1] == ["mesh"] else []
        order = [*head, *listing, *(n for n in order if n not in listing and n not in head)]
    for candidate in order:
        if not registry.is_registered(candidate):
            skipped.append((candidate, "not installed"))
            continue
        try:
            provider = deps.get_provider(candidate, settings)
            readiness = provider.available()
        except Exception as exc:  # a provider that cannot even be built is skipped, with the reason
            skipped.append((candidate, f"could not be constructed: {type(exc).__name__}: {exc}"))
            continue
        if readiness.ok:
            ready.append((candidate, provider))
        else:
            skipped.append((candidate, f"not ready: {readiness.reason}"))
    return ready, skipped, False


def _constrained(
    candidates: list[tuple[str, BaseProvider]], skipped: list[tuple[str, BaseException | str]], named: bool,
    request: Request,
) -> list[tuple[str, BaseProvider]]:
    """The candidates that can honour the request's constraints; the others join `skipped`, with why.

    `on_peers` leaves only a provider that routes to other nodes (the mesh, which picks among
    those peers). `accelerator` leaves the mesh and the providers computing on that kind of
    device here (hf_local on its device, echo on the CPU; an API or CLI tool computes elsewhere).
    """
    if not (request.on_peers or request.accelerator):
        return candidates
    kept = []
    for name, provider in candidates:
        if provider.routes_remotely:
            kept.append((name, provider))
            continue
        if request.on_peers:
            reason = "cannot honour on_peers: only the mesh chooses who serves (submit through a daemon)"
        else:
            here = provider.accelerator()
            if here == request.accelerator:
                kept.append((name, provider))
                continue
            reason = (f"computes on {here}, not {request.accelerator}" if here
                      else f"does not compute on a local {request.accelerator} accelerator")
        if named:
            raise ProviderUnavailable(name, reason)
        skipped.append((name, reason))
    return kept


# ---------------------------------------------------------------------------------------
# One attempt at one provider: key, lookups, single flight, store.


class _Attempt:
    def __init__(self, request: Request, name: str, provider: BaseProvider, deps: RouterDeps, settings: Any) -> None:
        self.request, self.name, self.provider, self.deps = request, name, provider, deps
        self.identity = provider.model_identity(request.model)
        canonical = request_bytes(
            task=request.task, model=self.identity, prompt=request.prompt,
            messages=request.messages, params=request.params,
        )
        self.key = request_key(canonical, settings.cache_key)
        mode, enabled = request.cache_mode, settings.response_cache
        self.lookup = enabled and mode != "no-cache" and (not request.sampled or mode in ("force", "only-if-cached"))
        if provider.routes_remotely:
            self.lookup = False  # the serving node keys, looks up and answers (its tier comes back)
        self.store = enabled and mode not in ("no-store", "only-if-cached") and (not request.sampled or mode == "force")
        self.publish = self.store and mode != "private" and deps.remote_cache is not None
        self.coalesce = self.lookup and self.store
        self.cache = deps.get_response_cache(settings) if enabled else None

    # lookups ------------------------------------------------------------------------

    def local_lookup(self) -> tuple[bytes, str, str] | None:
        if not self.lookup or self.cache is None:
            return None
        hit = self.cache.lookup(self.key)
        return (hit.data, hit.cid, hit.tier) if hit else None

    def remote_get(self) -> tuple[bytes, str, str] | None:
        """The remote cache's answer, validated and kept locally; None if absent or unusable."""
        remote = self.deps.remote_cache
        if not self.lookup or remote is None:
            return None
        try:
            data = remote.get(self.key)
        except Exception as exc:  # a third-party cache must not fail the request
            _log().warning("remote cache get(%s) failed: %s", self.key, exc)
            return None
        if not isinstance(data, (bytes, bytearray)) or not self._valid(bytes(data)):
            return None
        data = bytes(data)
        cid = cid_of(data)
        if self.cache is not None:
            self.cache.store(self.key, data, cid)
        return data, cid, "cluster"

    def _valid(self, data: bytes) -> bool:
        try:
            body = decode_response(data)
        except MalformedMessage as exc:
            _log().warning("remote cache value for %s rejected: %s", self.key, exc)
            return False
        if body["model"] != self.identity or body["task"] != self.request.task:
            _log().warning("remote cache value for %s answers %s/%s, not %s", self.key,
                           body["task"], body["model"], self.identity)
            return False
        return True

    def lookup_sync(self, started: float) -> Result | None:
        found = self.local_lookup() or self.remote_get()
        return self.hit(found, started) if found else None

    async def alookup(self, started: float) -> Result | None:
        import trio

        found = self.local_lookup()
        if found is None and self.lookup and self.deps.remote_cache is not None:
            found = await trio.to_thread.run_sync(self.remote_get)
        return self.hit(found, started) if found else None

    def hit(self, found: tuple[bytes, str, str], started: float) -> Result:
        data, cid, tier = found
        body = decode_response(data, trusted=tier != "cluster")  # cluster bytes were fully checked
        self.deps.count(tier)
        return Result(
            text=body.get("text", ""), provider=self.name, model=body["model"], cache=tier, key=self.key,
            cid=cid, request_id=self.request.request_id, latency_ms=(time.monotonic() - started) * 1000.0,
            finish_reason=body["finish_reason"], usage=body["usage"], response=data,
        )

    # finishing ----------------------------------------------------------------------

    def finish(self, completion: Completion, started: float) -> tuple[Result, bytes]:
        if completion.remote is not None:
            return self.finish_remote(completion, started)
        data = response_bytes(
            task=self.request.task, model=self.identity, text=completion.text,
            finish_reason=completion.finish_reason, usage=completion.usage,
        )
        cid = cid_of(data)
        if self.store and self.cache is not None:
            self.cache.store(self.key, data, cid)
        tier = "miss" if self.lookup else "bypass"
        self.deps.count(tier, inference=True)
        result = Result(
            text=completion.text, provider=self.name, model=self.identity, cache=tier, key=self.key, cid=cid,
            request_id=self.request.request_id, latency_ms=(time.monotonic() - started) * 1000.0,
            finish_reason=completion.finish_reason, usage=completion.usage, response=data,
        )
        return result, data

    def finish_remote(self, completion: Completion, started: float) -> tuple[Result, bytes]:
        """An answer another node computed: keep its exact bytes (already checked against the CID)."""
        remote = completion.remote
        assert remote is not None
        body = decode_response(remote.response, trusted=True)
        if self.store and self.cache is not None:
            self.cache.store(remote.key, remote.response, remote.cid)
        # Not counted here: the node that answered counts its tier (and its inference).
        result = Result(
            text=completion.text, provider=remote.provider, model=body["model"], cache=remote.cache, key=remote.key,
            cid=remote.cid, request_id=self.request.request_id, latency_ms=(time.monotonic() - started) * 1000.0,
            finish_reason=body["finish_reason"], usage=body["usage"], response=remote.response, peer=remote.peer,
            served_from=remote.served_from,
        )
        return result, remote.response

    def remote_set(self, key: str, data: bytes) -> None:
        try:
            self.deps.remote_cache.set(key, data)
        except Exception as exc:  # a third-party cache must not fail the request
            _log().warning("remote cache set(%s) failed: %s", key, exc)


def _log() -> Any:
    import logging

    return logging.getLogger("node.router")


# Errors that mean the same whichever provider raised them (the mesh relays a serving node's):
# they end the request as they are, instead of becoming one provider's failure.
_PASS_THROUGH = (ProviderError, CacheMiss, DeadlineExceeded, InvalidRequest)


def _as_provider_error(name: str, exc: Exception) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    return ProviderFailed(name, f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------
# The synchronous executor


def _refuse_inside_trio(function: str, alternative: str) -> None:
    if "trio" not in sys.modules:
        return
    import trio

    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return
    raise InvalidRequest(
        f"{function}() blocks and cannot run inside a trio event loop; use `await node.{alternative}(...)`"
    )


def _prepare(
    prompt: Any, provider: str | None, model_name: str | None, deps: RouterDeps | None, kwargs: dict[str, Any]
) -> tuple[Request, RouterDeps, Any]:
    deps = deps if deps is not None else get_default_router_deps()
    settings = deps.current_settings()
    request = build_request(
        prompt, model_name=model_name, kwargs=kwargs, default_model=settings.model,
        default_timeout=settings.request_timeout,
    )
    return request, deps, settings


def complete(
    prompt: Any,
    *,
    provider: str | None = None,
    model_name: str | None = None,
    deps: RouterDeps | None = None,
    **kwargs: Any,
) -> Result:
    """Answer a prompt synchronously and say where the answer came from."""
    _refuse_inside_trio("complete", "acomplete")
    started = time.monotonic()
    request, deps, settings = _prepare(prompt, provider, model_name, deps, kwargs)
    deadline = started + request.timeout
    candidates, failures, named = _candidates(provider, deps, settings, request.model)
    candidates = _constrained(candidates, failures, named, request)
    for name, candidate in candidates:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(request.timeout)
        try:
            # Inside the try: a provider may refuse the model while keying it (ModelNotFound).
            attempt = _Attempt(request, name, candidate, deps, settings)
            return _attempt_sync(attempt, deadline, started)
        except ProviderError as exc:
            deps.count_failure(name)
            if isinstance(exc, ProviderTimeout) and time.monotonic() >= deadline:
                raise DeadlineExceeded(request.timeout) from exc  # as on the async path: the request is over
            if named:
                raise
            failures.append((name, exc))
            _log().info("provider %s failed (%s); trying the next one", name, exc)
    raise AllProvidersFailed(_in_chain_order(failures, settings))


def _in_chain_order(failures: list[tuple[str, Any]], settings: Any) -> list[tuple[str, Any]]:
    position = {name: i for i, (name, _) in enumerate(failures)}
    order = {name: i for i, name in enumerate(_chain(settings))}
    return sorted(failures, key=lambda item: (order.get(item[0], len(order)), position[item[0]]))


def _attempt_sync(attempt: _Attempt, deadline: float, started: float) -> Result:
    inflight, flight, leader = attempt.deps.inflight, None, False
    while True:
        hit = attempt.lookup_sync(started)
        if hit is not None:
            return hit
        if attempt.request.cache_mode == "only-if-cached" and not attempt.provider.routes_remotely:
            raise CacheMiss(attempt.key)  # (through the mesh, the serving node looks up and says)
        if not attempt.coalesce:
            break
        leader, flight = inflight.join(attempt.key)
        if leader:
            break
        if not inflight.wait(flight, deadline - time.monotonic()):
            raise DeadlineExceeded(attempt.request.timeout)
    try:
        try:
            completion = attempt.provider.complete_sync(attempt.request.for_provider(deadline - time.monotonic()))
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            raise _as_provider_error(attempt.name, exc) from exc
        result, data = attempt.finish(completion, started)
    finally:
        if leader and flight is not None:
            inflight.finish(attempt.key, flight)
    if attempt.publish:
        attempt.remote_set(result.key, data)
    return result


def generate_text(
    prompt: Any,
    *,
    provider: str | None = None,
    model_name: str | None = None,
    deps: RouterDeps | None = None,
    **kwargs: Any,
) -> str:
    """Generate text for `prompt` (a string, or a list of chat messages). Seed-compatible.

    Blocking; inside a trio event loop use `agenerate_text`.
    """
    _refuse_inside_trio("generate_text", "agenerate_text")
    return complete(prompt, provider=provider, model_name=model_name, deps=deps, **kwargs).text


# ---------------------------------------------------------------------------------------
# The trio executor


async def aiter_request(
    prompt: Any,
    *,
    provider: str | None = None,
    model_name: str | None = None,
    deps: RouterDeps | None = None,
    **kwargs: Any,
) -> AsyncIterator[str | Result]:
    """Yield text chunks as they come, then exactly one `Result`.

    Use with `contextlib.aclosing` when you may stop early; closing cancels the provider.
    """
    import trio

    started = time.monotonic()
    request, deps, settings = _prepare(prompt, provider, model_name, deps, kwargs)
    deadline = trio.current_time() + request.timeout
    candidates, failures, named = _candidates(provider, deps, settings, request.model)
    candidates = _constrained(candidates, failures, named, request)
    for name, candidate in candidates:
        if trio.current_time() >= deadline:
            raise DeadlineExceeded(request.timeout)
        emitted = False
        try:
            attempt = _Attempt(request, name, candidate, deps, settings)
            async for item in _attempt_async(attempt, deadline, started):
                emitted = emitted or isinstance(item, str)
                yield item
            return
        except ProviderError as exc:
            deps.count_failure(name)
            if named or emitted:
                raise
            failures.append((name, exc))
            _log().info("provider %s failed (%s); trying the next one", name, exc)
    raise AllProvidersFailed(_in_chain_order(failures, settings))


async def _attempt_async(attempt: _Attempt, deadline: float, started: float) -> AsyncIterator[str | Result]:
    import trio

    inflight, flight, leader = attempt.deps.inflight, None, False
    while True:
        hit = await attempt.alookup(started)
        if hit is not None:
            yield hit.text
            yield hit
            return
        if attempt.request.cache_mode == "only-if-cached" and not attempt.provider.routes_remotely:
            raise CacheMiss(attempt.key)  # (through the mesh, the serving node looks up and says)
        if not attempt.coalesce:
            break
        leader, flight = inflight.join(attempt.key)
        if leader:
            break
        await inflight.await_(flight, deadline)
        if trio.current_time() >= deadline:
            raise DeadlineExceeded(attempt.request.timeout)
    try:
        async with _local_slot(attempt.provider):
            request = attempt.request.for_provider(deadline - trio.current_time())
            stream = attempt.provider.astream(request)
            completion: Completion | None = None
            try:
                while completion is None:
                    with trio.move_on_at(deadline) as scope:
                        try:
                            item = await stream.__anext__()
                        except StopAsyncIteration:
                            break
                        except (*_PASS_THROUGH, trio.Cancelled):
                            raise
                        except Exception as exc:
                            raise _as_provider_error(attempt.name, exc) from exc
                    if scope.cancelled_caught:
                        raise DeadlineExceeded(attempt.request.timeout)
                    if isinstance(item, Completion):
                        completion = item
                    else:
                        yield item
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()  # type: ignore[attr-defined]
            if completion is None:
                raise ProviderFailed(attempt.name, "stream ended without a completion")
            result, data = attempt.finish(completion, started)
    finally:
        if leader and flight is not None:
            inflight.finish(attempt.key, flight)
    if attempt.publish:
        await trio.to_thread.run_sync(attempt.remote_set, result.key, data)
    yield result


def _local_slot(provider: BaseProvider) -> AbstractAsyncContextManager[Any]:
    """In a daemon, the request's admission slot, held while a local provider works (the mesh
    routes elsewhere and needs none); in-process, nothing."""
    slot = LOCAL_SLOT.get()
    if slot is None or provider.routes_remotely:
        return nullcontext()
    return slot.local()


async def acomplete(
    prompt: Any,
    *,
    provider: str | None = None,
    model_name: str | None = None,
    deps: RouterDeps | None = None,
    **kwargs: Any,
) -> Result:
    """Answer a prompt inside a trio loop and say where the answer came from."""
    from contextlib import aclosing

    async with aclosing(aiter_request(prompt, provider=provider, model_name=model_name, deps=deps, **kwargs)) as it:
        async for item in it:
            if isinstance(item, Result):
                return item
    raise ProviderFailed(provider or "router", "no result")  # pragma: no cover - aiter_request always ends with one


async def agenerate_text(
    prompt: Any,
    *,
    provider: str | None = None,
    model_name: str | None = None,
    deps: RouterDeps | None = None,
    **kwargs: Any,
) -> str:
    """`generate_text` for trio code."""
    return (await acomplete(prompt, provider=provider, model_name=model_name, deps=deps, **kwargs)).text


async def astream_text(
    prompt: Any,
    *,
    provider: str | None = None,
    model_name: str | None = None,
    deps: RouterDeps | None = None,
    **kwargs: Any,
) -> AsyncIterator[str]:
    """Yield the answer's text chunks as they come (a cache hit arrives as one chunk)."""
    from contextlib import aclosing

    async with aclosing(aiter_request(prompt, provider=provider, model_name=model_name, deps=deps, **kwargs)) as it:
        async for item in it:
            if isinstance(item, str):
                yield item


def stream_text(
    prompt: Any,
    *,
    provider: str | None = None,
    model_name: str | None = None,
    deps: RouterDeps | None = None,
    **kwargs: Any,
) -> Iterator[str]:
    """Iterate over the answer's text chunks from synchronous code.

    A private trio loop runs in a worker thread; breaking out of the loop (or closing the
    iterator) cancels the provider.
    """
    _refuse_inside_trio("stream_text", "astream_text")
    for item in iter_request_sync(prompt, provider=provider, model_name=model_name, deps=deps, **kwargs):
        if isinstance(item, str):
            yield item


def iter_request_sync(prompt: Any, **kwargs: Any) -> Iterator[str | Result]:
    """`aiter_request` for synchronous code: chunks, then one `Result`."""
    import trio

    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=64)
    stop = threading.Event()
    box: dict[str, Any] = {}
    started = threading.Event()

    async def produce() -> None:
        from contextlib import aclosing

        with trio.CancelScope() as scope:
            box["cancel"], box["token"] = scope.cancel, trio.lowlevel.current_trio_token()
            started.set()
            try:
                async with aclosing(aiter_request(prompt, **kwargs)) as it:
                    async for item in it:
                        await trio.to_thread.run_sync(_put, items, ("item", item), stop)
            except Exception as exc:
                _put(items, ("error", exc), stop)
                return
        _put(items, ("end", None), stop)

    thread = threading.Thread(target=trio.run, args=(produce,), name="accelmesh-stream", daemon=True)
    thread.start()
    started.wait()
    try:
        while True:
            kind, value = items.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        try:
            trio.from_thread.run_sync(box["cancel"], trio_token=box["token"])
        except trio.RunFinishedError:
            pass
        thread.join()


def _put(items: queue.Queue[tuple[str, Any]], item: tuple[str, Any], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            items.put(item, timeout=0.05)
            return
        except queue.Full:
            continue
