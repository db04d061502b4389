"""The `mesh` provider: send a prompt to a cluster node that serves it, and stream the answer back.

Registered as `mesh`, first in the fallback chain of every daemon. The backend manager
(`node.mesh.manager.BackendManager`) plans each request: the nodes of the peer table, this node
included, that can serve it under its constraints, in the order of its load-balancing strategy,
cooling nodes last. The mesh sends the request over `/accelmesh/infer/1.0.0` with `hops = 2`, so
the serving node answers with its local providers only and never forwards it again; and on a
retryable failure before the first chunk it tries the next node (at most `MAX_ATTEMPTS`
failures; a node that answers busy answers at once, so every eligible one may be asked). Every
attempt is reported to the manager (in flight, timings, outcome), which is how it learns who is
fast, who is loaded and who fails. When every node asked was busy it raises `ClusterBusy` (the
caller hears `busy` and the smallest `retry_after`). While another node serves, the request
gives its admission slot on this node back (`request.slot.hand_off()`; the router takes it back
before any local provider works on it).

The answer keeps the serving node's exact response bytes, checked against their CID, and its
request key: the entry node cannot key the request itself, since it does not know which
model (which weights) will answer until a node has answered.

The mesh does not import the router and is never handed the daemon: it gets this node's peer
id, the backend manager (which reads a read-only view of who could serve), a callable that runs
a request on this node's local providers (`run_local`, the front door's), and the stream pool
to other nodes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import trio

from node.errors import AllProvidersFailed, Busy, ModelNotFound, ProviderError, ProviderFailed, ProviderUnavailable
from node.mesh.errors import ClusterBusy
from node.mesh.manager import Attempt, BackendManager, Candidate, capacity_for
from node.providers.base import AdmissionSlot, BaseProvider, Completion, ProviderRequest, Readiness, RemoteAnswer
from node.requests import Result
from node.wire import FORWARDED_HOPS, request_to_wire, result_from_wire
from protocols.inference.messages import Request as WireRequest

__all__ = ["MeshProvider", "MeshStatistics", "DetachedMesh", "MAX_ATTEMPTS"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # failed nodes before the mesh gives up (the router then falls back); busy ones don't count


RunLocal = Callable[[WireRequest, "AdmissionSlot | None"], AsyncIterator["str | Result"]]  # (request as forwarded, slot)


@dataclass(frozen=True)
class MeshStatistics:
    """A snapshot of the mesh provider (`MeshProvider.statistics()`)."""

    served_by: Mapping[str, int]  # requests answered, by the peer id of the node that answered (a copy)

    def to_json(self) -> dict[str, Any]:
        return {"served_by": dict(self.served_by)}


class MeshProvider(BaseProvider):
    name = "mesh"
    routes_remotely = True

    def __init__(self, *, peer_id: str, manager: BackendManager, run_local: RunLocal, pool: Any) -> None:
        self.peer_id = peer_id
        self.manager = manager  # who serves each request, and what each node's answers taught us
        self.run_local = run_local  # this node's local providers (the front door's run_local)
        self.pool = pool  # keep-alive streams to other nodes (node.mesh.pool.StreamPool)
        self.served_by: dict[str, int] = {}  # requests answered, by peer id

    def available(self) -> Readiness:
        nodes = [c for c in self.manager.candidates() if any(p.ready for p in c.providers)]
        if not nodes:
            return Readiness(False, "no node of the cluster has a ready provider yet")
        return Readiness(True, f"{len(nodes)} node(s) with a ready provider")

    def models(self) -> tuple[str, ...]:
        return tuple(sorted({m for c in self.manager.candidates() for p in c.providers if p.ready
                             for m in p.models}))

    def model_identity(self, model: str | None) -> str:
        return f"mesh/{model}" if model else "mesh"

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        nodes = self.manager.plan(request)
        if not nodes:
            what = f"model {request.model!r}" if request.model else f"task {request.task!r}"
            constraints = [f"on {', '.join(request.on_peers)}"] if request.on_peers else []
            constraints += [f"with a {request.accelerator} accelerator"] if request.accelerator else []
            raise ModelNotFound(self.name, f"no node of the cluster serves {what}"
                                           + (f" ({'; '.join(constraints)})" if constraints else ""))
        deadline = self.manager.clock() + request.timeout
        failures, busy, failed = [], [], 0
        for node in nodes:
            if failed >= MAX_ATTEMPTS:
                break
            emitted = False
            try:
                capacity = capacity_for(node, request.task, request.model)
                with self.manager.attempt(node.peer_id, deadline, capacity) as attempt:
                    async with aclosing(self._ask(node, request, attempt)) as items:
                        async for item in items:
                            emitted = emitted or isinstance(item, str)
                            yield item
                return
            except Busy as exc:  # a full node (this one too) answers at once: every one may be asked
                if emitted:
                    raise
                failures.append(f"{node.peer_id[-8:]}: busy")
                busy.append(exc.retry_after)
                log.info("mesh: %s is busy; trying the next node", node.peer_id)
            except ProviderError as exc:
                if emitted or not exc.retryable:
                    raise
                failures.append(f"{node.peer_id[-8:]}: {exc.message}")
                failed += 1
                log.info("mesh: %s failed (%s); trying the next node", node.peer_id, exc)
        if busy and not failed:
            raise ClusterBusy(self.name, f"every eligible node is busy ({len(busy)} asked)", retry_after=min(busy))
        raise ProviderFailed(self.name, "every node tried failed: " + "; ".join(failures), retryable=True)

    def _forward(self, request: ProviderRequest, node: Candidate) -> WireRequest:
        """The request as the serving node gets it: with a model named, addressed to the provider
        that advertised it there; without one, to the serving node's own chain. The forwarded
        hops make the serving node use its local providers only."""
        provider = None
        if request.model is not None:
            provider = next((p.name for p in node.providers
                             if p.ready and request.task in p.tasks and request.model in p.models), None)
        return request_to_wire(request, provider=provider, hops=FORWARDED_HOPS)

    async def _ask(self, node: Candidate, request: ProviderRequest,
                   attempt: Attempt) -> AsyncIterator[str | Completion]:
        forwarded = self._forward(request, node)
        if node.is_self:
            items = self._local(forwarded, request.slot)  # the router holds the slot around the local provider
        else:
            if request.slot is not None:
                request.slot.hand_off()  # while the other node serves, this node's slot is free for other work
            items = self._remote(node.peer_id, forwarded)
        async with aclosing(items) as answers:
            async for item in answers:
                if isinstance(item, str):
                    attempt.chunk()
                    yield item
                    continue
                answer = RemoteAnswer(response=item.response, cid=item.cid, key=item.key, peer=item.peer,
                                      provider=item.provider, cache=item.cache, served_from=item.served_from)
                self.served_by[answer.peer] = self.served_by.get(answer.peer, 0) + 1
                attempt.answered()
                yield Completion(
                    text=item.text, model=item.model, finish_reason=item.finish_reason,
                    prompt_tokens=item.usage.get("prompt_tokens"),
                    completion_tokens=item.usage.get("completion_tokens"), remote=answer,
                )

    async def _local(self, request: WireRequest, slot: AdmissionSlot | None) -> AsyncIterator[str | Result]:
        """This node serving: a failure here is one node's failure, so the next node may still serve."""
        try:
            async with aclosing(self.run_local(request, slot)) as items:
                async for item in items:
                    yield item
        except (ProviderError, AllProvidersFailed) as exc:
            raise ProviderFailed("this node", str(exc), retryable=True) from exc

    async def _remote(self, peer_id: str, request: WireRequest) -> AsyncIterator[str | Result]:
        started = trio.current_time()
        async with aclosing(self.pool.request(peer_id, request)) as items:
            async for item in items:
                if isinstance(item, str):
                    yield item
                else:  # (its bytes were checked against its CID as it arrived)
                    yield result_from_wire(item, request_id=request.id,
                                           latency_ms=(trio.current_time() - started) * 1000.0)

    def statistics(self) -> MeshStatistics:
        return MeshStatistics(served_by=dict(self.served_by))

    def __repr__(self) -> str:
        s = self.statistics()
        served = {peer[-8:]: n for peer, n in s.served_by.items()}
        return (f"<MeshProvider peer={self.peer_id[-8:]} manager={self.manager!r} pool={self.pool!r} "
                f"served_by={served}>")


class DetachedMesh(BaseProvider):
    """`mesh` outside a daemon: never ready, and says how to get one."""

    name = "mesh"

    def available(self) -> Readiness:
        return Readiness(False, "the mesh needs a daemon: run `accelmesh daemon` (it routes through the mesh), "
                                "or submit with node.connect() / `accelmesh generate --data-dir DIR`")

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        raise ProviderUnavailable(self.name, self.available().reason)
        yield  # pragma: no cover - makes this an async generator
