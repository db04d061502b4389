"""The router: a prompt -> request key -> cache tiers -> providers in fallback order -> an answer.

For each candidate provider, in order (an explicit or configured provider is the only one):

1. compute the request key from the identity of the model that provider would use;
2. look the key up (memory, local store, remote cache) as `cache_policy` says for the cache mode;
3. on a miss, run the provider (identical concurrent requests run once: single flight);
4. encode the answer canonically, hash it into the response CID, store it, return it.

A provider that fails (a `ProviderError`) hands over to the next candidate while the
deadline lasts; a streaming answer falls back only before its first chunk; a `ProviderTimeout`
once the deadline has passed is the request's `DeadlineExceeded`. When every candidate failed
or was skipped, `AllProvidersFailed` lists each one with its cause.

One implementation, two thin shells. Every decision (candidates and constraints, the key, the
cache policy, what a lookup leads to, finishing an answer, what a failure means) lives in
`cache_policy`, `_Run` and `_Attempt`; the shells only do what differs: the synchronous one
(`complete`, behind `generate_text`) calls `provider.complete_sync` with no event loop, because
one hop into a trio loop costs more than a whole memory hit; the trio one (`arun`, behind
`aiter_request` and the async and streaming functions) streams with `provider.astream` under the
deadline, holds the admission slot, and runs remote-cache I/O in a thread. Generating the sync
shell from the async one (httpcore's unasync) was not chosen: the shells differ in more than
`await` (chunks, cancel scopes, the slot, threads), and the generated copy would still duplicate
the steps that are now written once.
"""

from __future__ import annotations

import functools
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, nullcontext
from dataclasses import dataclass
from typing import Any

from node._singleflight import Flight
from node.deps import RouterDeps, get_default_router_deps
from node.errors import (
    AllProvidersFailed,
    Busy,
    CacheMiss,
    DeadlineExceeded,
    Disagreement,
    InvalidRequest,
    ProviderError,
    ProviderFailed,
    ProviderTimeout,
    ProviderUnavailable,
)
from node.providers import registry
from node.providers.base import AdmissionSlot, BaseProvider, Completion
from node.requests import CACHE_MODES, PARAM_DEFAULTS, RESERVED_KWARGS, Request, Result, build_request, request_key_for
from protocols.canonical import decode_response, response_bytes
from protocols.cid import cid_of
from protocols.errors import MalformedMessage

__all__ = [  # Request, Result, build_request and the constants live in node.requests
    "RESERVED_KWARGS",
    "CACHE_MODES",
    "PARAM_DEFAULTS",
    "Request",
    "Result",
    "CachePolicy",
    "cache_policy",
    "build_request",
    "complete",
    "acomplete",
    "arun",
    "aiter_request",
    "generate_text",
    "agenerate_text",
    "stream_text",
    "astream_text",
]

# ---------------------------------------------------------------------------------------
# Provider resolution


# Why a provider that routes to other nodes is left out of a request run with `local_only`.
_LOCAL_ONLY = "a request forwarded by another node is served by local providers only (hop limit)"


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


def _serving(deps: RouterDeps, settings: Any, serves: Callable[[BaseProvider], bool]) -> list[str]:
    """Registered providers (the mesh aside) for which `serves(provider)` holds: those that list a
    model, or serve a task. A provider that cannot be built serves nothing (the chain reports why)."""
    out = []
    for name in registry.names():
        if name == "mesh":
            continue
        try:
            if serves(deps.get_provider(name, settings)):
                out.append(name)
        except Exception:
            continue
    return out


def _candidates(
    name: str | None, deps: RouterDeps, settings: Any, model: str | None = None, *, local_only: bool = False,
    task: str = "generate",
) -> tuple[list[tuple[str, BaseProvider]], list[tuple[str, BaseException | str]], bool]:
    """(providers to try in order, providers skipped with their reason, whether one was named).

    With a model named, the providers that list it come right after the mesh, before the rest
    of the chain (which may still serve model ids it does not list, e.g. an OpenAI-compatible API).
    With `local_only`, providers that route to other nodes are left out, with the reason. Only
    providers serving `task` are candidates: for `embed`, the mesh (if in the chain) and then every
    registered provider that computes embeddings; for text, the chain less those that do not.
    """
    chosen = name or (settings.provider if task != "embed" else None)
    if chosen:
        provider = deps.get_provider(chosen, settings)
        if local_only and provider.routes_remotely:
            raise ProviderUnavailable(chosen, _LOCAL_ONLY)
        if task not in provider.tasks:  # never will: a bad request (400), not a provider down (503)
            raise InvalidRequest(f"provider {chosen!r} does not serve task {task!r} (it serves "
                                 f"{', '.join(provider.tasks)})")
        readiness = provider.available()
        if not readiness.ok:
            raise ProviderUnavailable(chosen, readiness.reason)
        return [(chosen, provider)], [], True
    ready: list[tuple[str, BaseProvider]] = []
    skipped: list[tuple[str, BaseException | str]] = []
    order = _chain(settings)
    if task == "embed":
        order = [*(["mesh"] if order[:1] == ["mesh"] else []), *_serving(deps, settings, lambda p: task in p.tasks)]
    if model:
        listing = _serving(deps, settings, lambda p: model in p.models())
        head = ["mesh"] if order[:1] == ["mesh"] else []
        order = [*head, *listing, *(n for n in order if n not in listing and n not in head)]
    for candidate in order:
        if not registry.is_registered(candidate):
            skipped.append((candidate, "not installed"))
            continue
        try:
            provider = deps.get_provider(candidate, settings)
            if local_only and provider.routes_remotely:
                skipped.append((candidate, _LOCAL_ONLY))
                continue
            readiness = provider.available()
        except Exception as exc:  # a provider that cannot even be built is skipped, with the reason
            skipped.append((candidate, f"could not be constructed: {type(exc).__name__}: {exc}"))
            continue
        if task not in provider.tasks:
            continue  # (not a failure: this provider serves other tasks)
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

    `on_peers` and `verify` > 1 leave only a provider that routes to other nodes (the mesh, which
    picks among those peers, or asks several and compares their answers). `accelerator` leaves the
    mesh and the providers computing on that kind of device here (hf_local on its device, echo on
    the CPU; an API or CLI tool computes elsewhere).
    """
    if not (request.on_peers or request.accelerator or request.verify > 1):
        return candidates
    kept = []
    for name, provider in candidates:
        if provider.routes_remotely:
            kept.append((name, provider))
            continue
        if request.verify > 1:
            reason = (f"cannot honour verify={request.verify}: only the mesh asks several nodes "
                      "(submit through a daemon)")
        elif request.on_peers:
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
# Cache policy: which caches one attempt reads and writes (pure)


@dataclass(frozen=True)
class CachePolicy:
    """What one attempt does with the caches (INTERFACES.md "Cache modes")."""

    lookup: bool  # look the key up (memory, local store, remote cache) before running the provider
    store: bool  # keep the answer in this node's response cache
    publish: bool  # also hand the answer to the remote cache (`RouterDeps(remote_cache=...)`)
    share: bool  # a daemon publishes it to its cluster (a record in the DHT; not `private`, not `no-store`)
    coalesce: bool  # identical concurrent requests run the provider once (single flight)
    only_cached: bool  # a miss raises `CacheMiss` instead of running the provider


def cache_policy(
    mode: str, *, sampled: bool, enabled: bool, routes_remotely: bool, remote_cache: bool
) -> CachePolicy:
    """The cache policy for a request in cache `mode` tried at one provider.

    `sampled`: sampling without a seed (only `force` caches it; `only-if-cached` may still find
    a forced answer). `enabled`: the response cache is on (`response_cache`). `routes_remotely`:
    the provider hands the request to another node, which keys it with the model that answers,
    looks it up and says in which tier it found it, so the entry node neither looks up nor
    answers a miss itself. `remote_cache`: a remote cache is configured.
    """
    return _cache_policy(mode, bool(sampled), bool(enabled), bool(routes_remotely), bool(remote_cache))


@functools.cache  # at most 96 distinct arguments, and the answer is immutable
def _cache_policy(mode: str, sampled: bool, enabled: bool, routes_remotely: bool, remote_cache: bool) -> CachePolicy:
    if mode not in CACHE_MODES:
        raise InvalidRequest(f"cache mode {mode!r} is not one of {', '.join(CACHE_MODES)}")
    lookup = (enabled and not routes_remotely and mode != "no-cache"
              and (not sampled or mode in ("force", "only-if-cached")))
    store = enabled and mode not in ("no-store", "only-if-cached") and (not sampled or mode == "force")
    return CachePolicy(
        lookup=lookup,
        store=store,
        publish=store and mode != "private" and remote_cache,
        share=store and mode != "private",
        coalesce=lookup and store,  # waiting for another caller pays off only if it stores what we look up
        only_cached=mode == "only-if-cached" and not routes_remotely,
    )


# ---------------------------------------------------------------------------------------
# The steps both shells share: one request's way through its candidates, and one attempt at
# one provider (key, lookups, single flight, finishing an answer). The shells below decide
# nothing of their own: they call the provider and wait, each in its own way.


class _Run:
    """One request's way through its candidates: the deadline (on the shell's clock), the
    candidates, the failures so far, and what a failure means (fall back, or end the request)."""

    __slots__ = ("request", "deps", "settings", "now", "started", "deadline", "failures", "named", "candidates")

    def __init__(
        self, request: Request, provider: str | None, deps: RouterDeps, settings: Any, *,
        now: Callable[[], float], local_only: bool = False,
    ) -> None:
        self.request, self.deps, self.settings, self.now = request, deps, settings, now
        self.started = time.monotonic()  # for `Result.latency_ms`, whichever clock the deadline uses
        self.deadline = now() + request.timeout
        candidates, self.failures, self.named = _candidates(
            provider, deps, settings, request.model, local_only=local_only, task=request.task)
        self.candidates = _constrained(candidates, self.failures, self.named, request)

    def left(self) -> float:
        return self.deadline - self.now()

    def check_deadline(self) -> None:
        if self.now() >= self.deadline:
            raise DeadlineExceeded(self.request.timeout)

    def failed(self, name: str, exc: ProviderError, *, emitted: bool = False) -> None:
        """Count a provider's failure; raise what ends the request, or return to try the next one.

        A `ProviderTimeout` once the deadline has passed is the request's `DeadlineExceeded`; a
        named provider's error, or one after text was streamed to the caller, is raised as it is.
        """
        self.deps.count_failure(name)
        if isinstance(exc, ProviderTimeout) and self.now() >= self.deadline:
            raise DeadlineExceeded(self.request.timeout) from exc
        if self.named or emitted:
            raise exc
        self.failures.append((name, exc))
        _log().info("provider %s failed (%s); trying the next one", name, exc)

    def exhausted(self) -> AllProvidersFailed:
        return AllProvidersFailed(_in_chain_order(self.failures, self.settings))


class _Attempt:
    """One provider's try at a request: its key and cache policy, lookups, single flight, finishing."""

    __slots__ = ("request", "name", "provider", "deps", "started", "identity", "key", "policy", "cache", "flight",
                 "ahead", "cluster", "asks_cluster")

    def __init__(self, run: _Run, name: str, provider: BaseProvider) -> None:
        request, deps, settings = run.request, run.deps, run.settings
        self.request, self.name, self.provider, self.deps, self.started = request, name, provider, deps, run.started
        self.identity = provider.model_identity(request.model)
        self.key = request_key_for(request, self.identity, settings.cache_key)
        enabled = settings.response_cache
        self.policy = _cache_policy(  # (positional: the cached call is cheaper; cache_policy() names them)
            request.cache_mode, request.sampled, enabled, provider.routes_remotely, deps.remote_cache is not None)
        self.cache = deps.get_response_cache(settings) if enabled else None
        self.flight: Flight | None = None  # the single flight this attempt leads, until it lands
        self.ahead = self._keys_ahead(settings) if enabled else {}
        cluster = deps.cluster_cache  # a daemon's cluster tier: none to ask in a cluster of one
        self.cluster = cluster if cluster is not None and not cluster.alone() else None
        self.asks_cluster: bool = self.policy.lookup and self.cluster is not None  # (async: `cluster_get`)

    def _keys_ahead(self, settings: Any) -> dict[str, str]:
        """For a provider that sends the request to another node (the mesh): the request keys of the
        model identities the nodes that may serve it advertise (key -> identity), so this node can
        look them up (memory, local store, cluster) before it dispatches. Empty when the cache mode
        allows no lookup or an identity is not known."""
        request = self.request
        identities = getattr(self.provider, "identities", None)
        if identities is None or request.verify > 1 or request.on_peers or request.accelerator or not _cache_policy(
                request.cache_mode, request.sampled, True, False, False).lookup:
            return {}  # (verify=k: answers computed afresh; on_peers, accelerator: those nodes answer)
        known = identities(self.request.for_provider(0.0))
        return {request_key_for(self.request, identity, settings.cache_key): identity
                for identity in sorted(known or ())}

    # lookups ------------------------------------------------------------------------

    def local_lookup(self, key: str | None = None) -> tuple[bytes, str, str] | None:
        """Memory, then the local store, under `key` (default: this attempt's, if its policy looks up:
        a key given is one `ahead` already allowed)."""
        if self.cache is None or (key is None and not self.policy.lookup):
            return None
        hit = self.cache.lookup(key or self.key)
        return (hit.data, hit.cid, hit.tier) if hit else None

    async def cluster_get(self, key: str | None = None, identity: str | None = None) -> tuple[Any, ...] | None:
        """The cluster's answer under `key` (default: this attempt's) for the model `identity`, its
        bytes already checked against their CID, kept locally."""
        key, identity = key or self.key, identity or self.identity
        assert self.cluster is not None  # (asks_cluster, or a key ahead with a cluster to ask)
        hit = await self.cluster.lookup(key)
        if hit is None or not _answers(hit.data, identity, self.request.task, key):
            return None
        if self.cache is not None:
            self.cache.store(key, hit.data, hit.cid)
        return hit.data, hit.cid, "cluster", hit.served_from

    async def lookup_ahead(self) -> Result | None:
        """The mesh's answer found before dispatching (`ahead`): in memory, the local store, or the
        cluster, under the key of a model that would answer. A hit is no inference anywhere."""
        for key, identity in self.ahead.items():
            found = self.local_lookup(key)
            if found is None and self.cluster is not None:
                found = await self.cluster_get(key, identity)
            if found is not None:
                return self.hit(found, key=key)
        return None

    @property
    def asks_remote(self) -> bool:
        """Whether `remote_get` would ask the remote cache (blocking I/O: async code runs it in a thread)."""
        return self.policy.lookup and self.deps.remote_cache is not None

    def remote_get(self) -> tuple[bytes, str, str] | None:
        """The remote cache's answer, validated and kept locally; None if absent or unusable."""
        if not self.policy.lookup or self.deps.remote_cache is None:  # (asks_remote, inlined: the sync hot path)
            return None
        try:
            data = self.deps.remote_cache.get(self.key)
        except Exception as exc:  # a third-party cache must not fail the request
            _log().warning("remote cache get(%s) failed: %s", self.key, exc)
            return None
        if not isinstance(data, (bytes, bytearray)):
            return None
        data = bytes(data)
        if not _answers(data, self.identity, self.request.task, self.key):
            return None
        cid = cid_of(data)
        if self.cache is not None:
            self.cache.store(self.key, data, cid)
        return data, cid, "cluster"

    def after_lookup(self, found: tuple[bytes, str, str] | None) -> Result | Flight | None:
        """What follows a lookup: the hit as a `Result`; or `CacheMiss` (only-if-cached); or the
        flight another caller leads, to wait for and then look up again; or None: run the
        provider now (leading the flight when coalescing; `land()` ends it)."""
        if found is not None:
            return self.hit(found)
        if self.policy.only_cached:
            raise CacheMiss(self.key)  # (through the mesh, the serving node looks up and says)
        if not self.policy.coalesce:
            return None
        leader, flight = self.deps.inflight.join(self.key)
        if not leader:
            return flight
        self.flight = flight
        return None

    def hit(self, found: tuple[Any, ...], *, key: str | None = None) -> Result:
        """`found`: (bytes, cid, tier), and for a cluster hit the peer that supplied the bytes."""
        data, cid, tier = found[:3]
        body = decode_response(data, trusted=tier != "cluster")  # cluster bytes were fully checked
        self.deps.count(tier)
        return Result(
            text=body.get("text", ""), provider=self.name, model=body["model"], cache=tier, key=key or self.key,
            cid=cid, request_id=self.request.request_id, latency_ms=(time.monotonic() - self.started) * 1000.0,
            finish_reason=body["finish_reason"], usage=body["usage"], response=data,
            served_from=found[3] if len(found) > 3 else None, embedding=_vector(body),
        )

    # running and finishing ----------------------------------------------------------

    def finish(self, completion: Completion) -> tuple[Result, bytes]:
        """The provider's answer as a `Result` and its canonical bytes, stored as the policy says."""
        if completion.remote is not None:
            return self._finish_remote(completion)
        embedding = None
        if self.request.task == "embed":
            if completion.embedding is None:
                raise ProviderFailed(self.name, "answered an embedding request without an embedding")
            embedding = tuple(completion.embedding)  # (equal to the canonical bytes' floats: -0.0 == 0.0)
        data = response_bytes(
            task=self.request.task, model=self.identity, text=None if embedding is not None else completion.text,
            embedding=embedding, finish_reason=completion.finish_reason, usage=completion.usage,
        )
        cid = cid_of(data)
        if self.policy.store and self.cache is not None:
            self.cache.store(self.key, data, cid)
        tier = "miss" if self.policy.lookup else "bypass"
        self.deps.count(tier, inference=True)
        result = Result(
            text=completion.text, provider=self.name, model=self.identity, cache=tier, key=self.key, cid=cid,
            request_id=self.request.request_id, latency_ms=(time.monotonic() - self.started) * 1000.0,
            finish_reason=completion.finish_reason, usage=completion.usage, response=data,
            embedding=embedding,
        )
        return result, data

    def _finish_remote(self, completion: Completion) -> tuple[Result, bytes]:
        """An answer another node computed: keep its exact bytes (already checked against the CID)."""
        remote = completion.remote
        assert remote is not None
        body = decode_response(remote.response, trusted=True)
        if self.policy.store and self.cache is not None:
            self.cache.store(remote.key, remote.response, remote.cid)
        # Not counted here: the node that answered counts its tier (and its inference).
        result = Result(
            text=completion.text, provider=remote.provider, model=body["model"], cache=remote.cache, key=remote.key,
            cid=remote.cid, request_id=self.request.request_id,
            latency_ms=(time.monotonic() - self.started) * 1000.0, finish_reason=body["finish_reason"],
            usage=body["usage"], response=remote.response, peer=remote.peer, served_from=remote.served_from,
            agreed=remote.agreed, embedding=_vector(body),
        )
        return result, remote.response

    def land(self) -> None:
        """The provider run is over, answered or not: wake whoever waits on the flight it led."""
        if self.flight is not None:
            self.deps.inflight.finish(self.key, self.flight)
            self.flight = None

    def remote_set(self, key: str, data: bytes) -> None:
        """Publish to the remote cache (blocking I/O: async code runs it in a thread)."""
        try:
            self.deps.remote_cache.set(key, data)
        except Exception as exc:  # a third-party cache must not fail the request
            _log().warning("remote cache set(%s) failed: %s", key, exc)


def _log() -> Any:
    import logging

    return logging.getLogger("node.router")


# Errors that mean the same whichever provider raised them (the mesh relays a serving node's):
# they end the request as they are, instead of becoming one provider's failure.
def _answers(data: bytes, identity: str, task: str, key: str) -> bool:
    """Whether cached bytes from elsewhere (a remote cache, the cluster) answer `task` with the model
    `identity`: a record can only promise bytes that hash to its CID, not what they answer."""
    try:
        body = decode_response(data)
    except MalformedMessage as exc:
        _log().warning("cached value for %s rejected: %s", key, exc)
        return False
    if body["model"] != identity or body["task"] != task:
        _log().warning("cached value for %s answers %s/%s, not %s", key, body["task"], body["model"], identity)
        return False
    return True


def _vector(body: dict[str, Any]) -> tuple[float, ...] | None:
    """A decoded response's embedding (task embed), else None."""
    embedding = body.get("embedding")
    return tuple(embedding) if embedding is not None else None


_PASS_THROUGH = (ProviderError, CacheMiss, DeadlineExceeded, InvalidRequest, Busy, Disagreement)


def _provider_failed(name: str, exc: Exception) -> ProviderFailed:
    """Any other exception a provider raised is that provider's failure."""
    return ProviderFailed(name, f"{type(exc).__name__}: {exc}")


def _in_chain_order(failures: list[tuple[str, Any]], settings: Any) -> list[tuple[str, Any]]:
    position = {name: i for i, (name, _) in enumerate(failures)}
    order = {name: i for i, name in enumerate(_chain(settings))}
    return sorted(failures, key=lambda item: (order.get(item[0], len(order)), position[item[0]]))


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


# ---------------------------------------------------------------------------------------
# The synchronous shell: calls `complete_sync` directly, no event loop


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
    request, deps, settings = _prepare(prompt, provider, model_name, deps, kwargs)
    return _run_sync(request, provider, deps, settings)


def _run_sync(request: Request, provider: str | None, deps: RouterDeps, settings: Any) -> Result:
    """`arun` for synchronous code, without chunks: the same steps, on the monotonic clock."""
    run = _Run(request, provider, deps, settings, now=time.monotonic)
    for name, candidate in run.candidates:
        run.check_deadline()
        try:  # (keying inside the try: a provider may refuse the model, ModelNotFound)
            return _attempt_sync(_Attempt(run, name, candidate), run)
        except ProviderError as exc:
            run.failed(name, exc)
    raise run.exhausted()


def _attempt_sync(attempt: _Attempt, run: _Run) -> Result:
    while True:
        step = attempt.after_lookup(attempt.local_lookup() or attempt.remote_get())
        if step is None:
            break
        if isinstance(step, Result):
            return step
        attempt.deps.inflight.wait(step, run.left())
        run.check_deadline()
    try:
        try:
            completion = attempt.provider.complete_sync(attempt.request.for_provider(run.left()))
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            raise _provider_failed(attempt.name, exc) from exc
        result, data = attempt.finish(completion)
    finally:
        attempt.land()
    if attempt.policy.publish:
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
# The trio shell: streams with `astream`, holds the admission slot around local work


async def arun(
    request: Request,
    *,
    provider: str | None,
    deps: RouterDeps,
    slot: AdmissionSlot | None = None,
    local_only: bool = False,
    chunks: bool = True,
) -> AsyncIterator[str | Result]:
    """Run an already-built `Request`: yield text chunks as they come, then exactly one `Result`.

    `slot` (a daemon's admission slot; None in-process) is held with `slot.local()` (taken back
    first if it was handed off) while a local provider works, and handed to every provider as
    `ProviderRequest.slot` (the mesh gives it back while another node serves). `local_only` leaves
    out providers that route to other nodes (a request forwarded by another node: the hop limit).
    `chunks=False`
    (a caller that wants the answer whole): the Result alone, the provider's stream read to its
    end under one deadline instead of one per chunk. Use with `contextlib.aclosing` when you may
    stop early; closing cancels the provider.
    """
    import trio

    run = _Run(request, provider, deps, deps.current_settings(), now=trio.current_time, local_only=local_only)
    for name, candidate in run.candidates:
        run.check_deadline()
        emitted = False
        try:  # (keying inside the try: a provider may refuse the model, ModelNotFound)
            async with aclosing(_attempt_async(_Attempt(run, name, candidate), run, slot, chunks)) as items:
                async for item in items:
                    emitted = emitted or isinstance(item, str)
                    yield item
            return
        except ProviderError as exc:
            run.failed(name, exc, emitted=emitted)
    raise run.exhausted()


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
    request, deps, _ = _prepare(prompt, provider, model_name, deps, kwargs)
    async with aclosing(arun(request, provider=provider, deps=deps)) as items:
        async for item in items:
            yield item


async def _attempt_async(attempt: _Attempt, run: _Run, slot: AdmissionSlot | None,
                         chunks: bool = True) -> AsyncIterator[str | Result]:
    import trio

    if attempt.ahead:  # the mesh: an answer already cached here or in the cluster needs no node
        ahead = await attempt.lookup_ahead()
        if ahead is not None:
            if chunks:
                yield ahead.text
            yield ahead
            return
    while True:
        found: tuple[Any, ...] | None = attempt.local_lookup()
        if found is None and attempt.asks_remote:
            found = await trio.to_thread.run_sync(attempt.remote_get)
        if found is None and attempt.asks_cluster and not attempt.policy.coalesce:
            found = await attempt.cluster_get()
        step = attempt.after_lookup(found)
        if step is None and attempt.asks_cluster and attempt.policy.coalesce:
            # This attempt leads the key's flight: it alone asks the cluster; the others wait and then
            # find what it kept (one lookup and at most one inference per key on this node).
            try:
                found = await attempt.cluster_get()
            except BaseException:
                attempt.land()
                raise
            if found is not None:
                attempt.land()
                hit = attempt.hit(found)
                if chunks:
                    yield hit.text
                yield hit
                return
        if step is None:
            break
        if isinstance(step, Result):
            if chunks:
                yield step.text
            yield step
            return
        await attempt.deps.inflight.await_(step, run.deadline)
        run.check_deadline()
    try:
        holds_slot = slot is not None and not attempt.provider.routes_remotely
        if holds_slot and not slot.held:  # the mesh handed it off: taken back through the queue, within the deadline
            with trio.move_on_at(run.deadline) as waiting:
                await slot.take_back()
            if waiting.cancelled_caught:
                raise DeadlineExceeded(run.request.timeout)
        async with slot.local() if holds_slot else nullcontext():
            stream = attempt.provider.astream(attempt.request.for_provider(run.left(), slot=slot))
            completion: Completion | None = None
            try:
                while completion is None:
                    with trio.move_on_at(run.deadline) as scope:
                        try:
                            item = await stream.__anext__()
                            while not chunks and not isinstance(item, Completion):  # (whole: one deadline for all)
                                item = await stream.__anext__()
                        except StopAsyncIteration:
                            break
                        except _PASS_THROUGH:
                            raise
                        except Exception as exc:
                            raise _provider_failed(attempt.name, exc) from exc
                    if scope.cancelled_caught:
                        raise DeadlineExceeded(run.request.timeout)
                    if isinstance(item, Completion):
                        completion = item
                    else:
                        yield item
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()  # type: ignore[attr-defined]
            if completion is None:
                raise ProviderFailed(attempt.name, "stream ended without a completion")
            result, data = attempt.finish(completion)
    finally:
        attempt.land()
    if attempt.policy.publish:
        await trio.to_thread.run_sync(attempt.remote_set, result.key, data)
    if attempt.policy.share and attempt.deps.cluster_cache is not None and completion.remote is None:
        attempt.deps.cluster_cache.publish(result.key, result.cid)  # queued: off the request path
    yield result


async def acomplete(
    prompt: Any,
    *,
    provider: str | None = None,
    model_name: str | None = None,
    deps: RouterDeps | None = None,
    **kwargs: Any,
) -> Result:
    """Answer a prompt inside a trio loop and say where the answer came from."""
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
