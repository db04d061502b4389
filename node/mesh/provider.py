"""The `mesh` provider: send a prompt to a cluster peer that serves it, and stream the answer back.

Registered as `mesh`, first in the fallback chain of every daemon. It picks among the nodes of
the peer table, this node included, those with a ready provider for the task (and the model,
when one is named), that satisfy the request's constraints (`on_peers`, `accelerator`), in
round-robin order; it sends the request over `/accelmesh/infer/1.0.0` with `hops = 2`, so
the serving node answers with its local providers only and never forwards it again; and on a
retryable failure before the first chunk it tries the next node (at most `MAX_ATTEMPTS`
failures; a node that answers busy answers at once, so every eligible one may be asked). When
every node asked was busy it raises `ClusterBusy` (the caller hears `busy` and the smallest
`retry_after`). While another node serves, the request gives its slot on this node back
(the router takes it back before any local provider works on it).

The answer keeps the serving node's exact response bytes, checked against their CID, and its
request key: the entry node cannot key the request itself, since it does not know which
model (which weights) will answer until a node has answered.

The mesh does not import the router: the daemon gives the provider a `node` that knows its
peer table, its host and how to run a request locally.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from node.errors import AllProvidersFailed, ModelNotFound, ProviderError, ProviderFailed, ProviderUnavailable
from node.providers.base import LOCAL_SLOT, BaseProvider, Completion, ProviderRequest, Readiness, RemoteAnswer
from node.mesh.service import ClusterBusy, RemoteError, wire_timeout_ms
from protocols.inference.messages import MAX_HOPS, ChatMessage, Request, Result  # noqa: F401 (Result: typing)

__all__ = [
    "MeshProvider",
    "DetachedMesh",
    "Candidate",
    "eligible",
    "RoundRobin",
    "LOCAL_ONLY",
    "MAX_ATTEMPTS",
    "FORWARDED_HOPS",
]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # failed nodes before the mesh gives up (the router then falls back); busy ones don't count
FORWARDED_HOPS = MAX_HOPS  # a request the mesh forwards arrives with this many hops: served locally only

# Set while a request that came from another node is being served: the mesh must not forward it again.
LOCAL_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("accelmesh_local_only", default=False)


@dataclass(frozen=True)
class Candidate:
    """A node that could serve: its peer id, its providers (name, tasks, models, ready) and accelerator kinds."""

    peer_id: str
    providers: tuple[tuple[str, tuple[str, ...], tuple[str, ...], bool], ...]
    accelerators: frozenset[str]
    is_self: bool = False


def eligible(candidates: Iterable[Candidate], task: str, model: str | None, on_peers: Sequence[str] = (),
             accelerator: str | None = None) -> list[Candidate]:
    """The candidates that can serve `task` (and `model`) under the constraints, sorted by peer id."""
    out = []
    for c in candidates:
        if on_peers and c.peer_id not in on_peers:
            continue
        if accelerator and accelerator not in c.accelerators:
            continue
        if any(ready and task in tasks and (model is None or model in models)
               for _, tasks, models, ready in c.providers):
            out.append(c)
    return sorted(out, key=lambda c: c.peer_id)


class RoundRobin:
    """Round robin over whichever candidates are eligible this time."""

    def __init__(self) -> None:
        self.turn = 0

    def order(self, candidates: list[Candidate]) -> list[Candidate]:
        if not candidates:
            return []
        start = self.turn % len(candidates)
        self.turn += 1
        return candidates[start:] + candidates[:start]


class MeshNode(Protocol):
    """What the mesh provider needs from its daemon."""

    peer_id: str
    streams: Any  # node.mesh.service.StreamPool

    def candidates(self) -> list[Candidate]: ...
    def run_local(self, request: Request) -> AsyncIterator[Any]: ...


class MeshProvider(BaseProvider):
    name = "mesh"
    routes_remotely = True

    def __init__(self, node: MeshNode) -> None:
        self.node = node
        self.rotation = RoundRobin()
        self.served_by: dict[str, int] = {}  # requests answered, by peer id

    def available(self) -> Readiness:
        if LOCAL_ONLY.get():
            return Readiness(False, "a request forwarded by another node is served locally only (hop limit)")
        nodes = [c for c in self.node.candidates() if any(p[3] for p in c.providers)]
        if not nodes:
            return Readiness(False, "no node of the cluster has a ready provider yet")
        return Readiness(True, f"{len(nodes)} node(s) with a ready provider")

    def models(self) -> tuple[str, ...]:
        return tuple(sorted({m for c in self.node.candidates() for _, _, models, ready in c.providers if ready
                             for m in models}))

    def model_identity(self, model: str | None) -> str:
        return f"mesh/{model}" if model else "mesh"

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        nodes = self.rotation.order(eligible(self.node.candidates(), request.task, request.model,
                                             request.on_peers, request.accelerator))
        if not nodes:
            what = f"model {request.model!r}" if request.model else f"task {request.task!r}"
            constraints = [f"on {', '.join(request.on_peers)}"] if request.on_peers else []
            constraints += [f"with a {request.accelerator} accelerator"] if request.accelerator else []
            raise ModelNotFound(self.name, f"no node of the cluster serves {what}"
                                           + (f" ({'; '.join(constraints)})" if constraints else ""))
        failures, busy, failed = [], [], 0
        for node in nodes:
            if failed >= MAX_ATTEMPTS:
                break
            emitted = False
            try:
                async with aclosing(self._ask(node, request)) as items:
                    async for item in items:
                        emitted = emitted or isinstance(item, str)
                        yield item
                return
            except ProviderError as exc:
                if emitted or not exc.retryable:
                    raise
                failures.append(f"{node.peer_id[-8:]}: {exc.message}")
                if isinstance(exc, RemoteError) and exc.code == "busy":
                    busy.append(exc.retry_after or 1.0)  # a full node answers at once: every one may be asked
                else:
                    failed += 1
                log.info("mesh: %s failed (%s); trying the next node", node.peer_id, exc)
        if busy and not failed:
            raise ClusterBusy(self.name, f"every eligible node is busy ({len(busy)} asked)", retry_after=min(busy))
        raise ProviderFailed(self.name, "every node tried failed: " + "; ".join(failures), retryable=True)

    def _forward(self, request: ProviderRequest, node: Candidate) -> Request:
        """The request as the serving node gets it: with a model named, addressed to the provider
        that advertised it there; without one, to the serving node's own chain."""
        provider = None
        if request.model is not None:
            provider = next((name for name, tasks, models, ready in node.providers
                             if ready and request.task in tasks and request.model in models), None)
        return Request(
            id=(request.request_id or uuid.uuid4().hex)[:64], task=request.task, prompt=request.prompt,
            messages=tuple(ChatMessage(str(m["role"]), str(m["content"])) for m in request.messages)
            if request.messages is not None else None,
            model=request.model, provider=provider, params=dict(request.params), stream=True, hops=FORWARDED_HOPS,
            accelerator=request.accelerator,  # the serving node keeps to providers on that kind of device
            cache=request.cache_mode, timeout_ms=wire_timeout_ms(request.timeout),
        )

    async def _ask(self, node: Candidate, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        forwarded = self._forward(request, node)
        if node.is_self:
            items = self._local(forwarded)  # the router holds this node's slot around the local provider
        else:
            slot = LOCAL_SLOT.get()
            if slot is not None:
                slot.hand_off()  # while the other node serves, this node's slot is free for other work
            items = self._remote(node.peer_id, forwarded)
        async with aclosing(items) as answers:
            async for item in answers:
                if isinstance(item, str):
                    yield item
                    continue
                answer = _answer(item)
                self.served_by[answer.peer] = self.served_by.get(answer.peer, 0) + 1
                body = _decode(answer.response)
                yield Completion(
                    text=body.get("text", ""), model=body["model"], finish_reason=body["finish_reason"],
                    prompt_tokens=body["usage"].get("prompt_tokens"),
                    completion_tokens=body["usage"].get("completion_tokens"), remote=answer,
                )

    async def _local(self, request: Request) -> AsyncIterator[Any]:
        """This node serving: a failure here is one node's failure, so the next node may still serve."""
        try:
            async with aclosing(self.node.run_local(request)) as items:
                async for item in items:
                    yield item
        except (ProviderError, AllProvidersFailed) as exc:
            raise ProviderFailed("this node", str(exc), retryable=True) from exc

    async def _remote(self, peer_id: str, request: Request) -> AsyncIterator[str | Result]:
        async with aclosing(self.node.streams.request(peer_id, request)) as items:
            async for item in items:
                yield item

    def statistics(self) -> dict[str, Any]:
        return {"served_by": dict(self.served_by)}


def _answer(item: Any) -> RemoteAnswer:
    """A RemoteAnswer from a protocol Result (a peer) or a router Result (this node)."""
    return RemoteAnswer(response=item.response, cid=item.cid, key=item.key, peer=item.peer, provider=item.provider,
                        cache=item.cache, served_from=item.served_from)


def _decode(data: bytes) -> dict[str, Any]:
    from protocols.canonical import decode_response

    return decode_response(data, trusted=True)


class DetachedMesh(BaseProvider):
    """`mesh` outside a daemon: never ready, and says how to get one."""

    name = "mesh"

    def available(self) -> Readiness:
        return Readiness(False, "the mesh needs a daemon: run `accelmesh daemon` (it routes through the mesh), "
                                "or submit with node.connect() / `accelmesh generate --data-dir DIR`")

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        raise ProviderUnavailable(self.name, self.available().reason)
        yield  # pragma: no cover - makes this an async generator
