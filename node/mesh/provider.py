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

import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import trio

from node.errors import (
    AllProvidersFailed,
    Busy,
    DeadlineExceeded,
    Disagreement,
    ModelNotFound,
    ProviderError,
    ProviderFailed,
    ProviderUnavailable,
)
from node.mesh.errors import ClusterBusy, LivenessTimeout, StreamInterrupted
from node.mesh.manager import Attempt, BackendManager, Candidate, HedgeRule, capacity_for, eligible, identities_for
from node.providers.base import AdmissionSlot, BaseProvider, Completion, ProviderRequest, Readiness, RemoteAnswer
from node.requests import Result
from node.wire import FORWARDED_HOPS, request_to_wire, result_from_wire
from protocols.inference.messages import Request as WireRequest
from protocols.vocabulary import ACCELERATOR_KINDS, TASKS

__all__ = ["MeshProvider", "MeshStatistics", "DetachedMesh", "MAX_ATTEMPTS"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # failed nodes before the mesh gives up (the router then falls back); busy ones don't count
BACKOFF_BASE = 0.01  # seconds before the next node after a first failure (jittered 0.5-1.5x, doubling)
BACKOFF_MAX = 0.5  # ... and at most this


async def _resumed(items: AsyncIterator[str | Completion], delivered: str,
                   peer: str) -> AsyncIterator[str | Completion]:
    """A replay of an answer of which `delivered` already reached the caller: its text must begin with
    `delivered` (else `StreamInterrupted`), and only what follows is passed on."""
    replayed = ""
    async with aclosing(items) as answers:
        async for item in answers:
            if not isinstance(item, str):
                if not item.text.startswith(delivered):
                    raise StreamInterrupted("mesh", f"the replay on {peer[-8:]} differs from what was delivered",
                                            delivered=len(delivered))
                yield item
                continue
            before, replayed = len(replayed), replayed + item
            if not (replayed.startswith(delivered) or delivered.startswith(replayed)):
                raise StreamInterrupted("mesh", f"the replay on {peer[-8:]} differs from what was delivered",
                                        delivered=len(delivered))
            if len(replayed) > len(delivered):
                yield replayed[max(before, len(delivered)):]


def _compute(node: Candidate) -> str:
    """The kind of device a node computes on: its best accelerator (cuda, rocm, mps, then cpu)."""
    return next((kind for kind in ACCELERATOR_KINDS if kind in node.accelerators), "cpu")


@dataclass(frozen=True)
class _Vote:
    """One node's fresh answer to a verified request."""

    node: str  # peer id of the node asked (it computed the answer: verified asks skip every cache)
    group: tuple[str, str]  # (request key, kind of compute): only answers of one group are compared
    completion: Completion

    @property
    def cid(self) -> str:
        assert self.completion.remote is not None
        return self.completion.remote.cid


def _agreeing(votes: list[_Vote]) -> list[_Vote]:
    """The largest set of votes of one group for one response CID (the earliest such set on a tie)."""
    tally: dict[tuple[tuple[str, str], str], list[_Vote]] = {}
    for vote in votes:
        tally.setdefault((vote.group, vote.cid), []).append(vote)
    return max(tally.values(), key=len, default=[])


def _outvoted(votes: list[_Vote]) -> list[str]:
    """The nodes whose answer differs from one at least two other nodes of their group agree on; none
    in a group where two answers each have two or more (a tie of majorities proves nothing)."""
    by_group: dict[tuple[str, str], dict[str, list[str]]] = {}
    for vote in votes:
        by_group.setdefault(vote.group, {}).setdefault(vote.cid, []).append(vote.node)
    out = []
    for cids in by_group.values():
        majorities = [cid for cid, nodes in cids.items() if len(nodes) >= 2]
        if len(majorities) == 1:
            out += [node for cid, nodes in cids.items() if cid != majorities[0] for node in nodes]
    return out


def _disputed(votes: list[_Vote]) -> bool:
    """Whether two answers of one group differ."""
    groups: dict[tuple[str, str], set[str]] = {}
    for vote in votes:
        groups.setdefault(vote.group, set()).add(vote.cid)
    return any(len(cids) > 1 for cids in groups.values())


async def _put_back(first: str | Completion, rest: AsyncIterator[str | Completion]) -> AsyncIterator[str | Completion]:
    """`first`, then the rest of the answer it came from."""
    async with aclosing(rest) as items:
        yield first
        async for item in items:
            yield item


RunLocal = Callable[[WireRequest, "AdmissionSlot | None"], AsyncIterator["str | Result"]]  # (request as forwarded, slot)


@dataclass(frozen=True)
class MeshStatistics:
    """A snapshot of the mesh provider (`MeshProvider.statistics()`)."""

    served_by: Mapping[str, int]  # requests answered, by the peer id of the node that answered (a copy)
    hedged: int = 0  # requests that sent a second copy (`mesh.hedge_after`)

    def to_json(self) -> dict[str, Any]:
        return {"served_by": dict(self.served_by), "hedged": self.hedged}


class MeshProvider(BaseProvider):
    name = "mesh"
    tasks = TASKS  # every task: the nodes that advertise it serve it
    routes_remotely = True

    def __init__(self, *, peer_id: str, manager: BackendManager, run_local: RunLocal, pool: Any,
                 max_attempts: int = MAX_ATTEMPTS, hedge_after: HedgeRule = None) -> None:
        self.peer_id = peer_id
        self.max_attempts = max_attempts  # nodes that may fail one request before the mesh gives up
        self.hedge_after = hedge_after  # when a second copy goes to another node (`mesh.hedge_after`; None: never)
        self.hedged = 0  # requests that sent a second copy
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

    def identities(self, request: ProviderRequest) -> set[str] | None:
        """The model identities the nodes that may serve `request` advertise for it (usually one), so
        that the entry node can key the request and look it up before it dispatches; None when one
        of them has not said (`node.mesh.manager.identities_for`)."""
        nodes = eligible(self.manager.candidates(), request.task, request.model, request.on_peers,
                         request.accelerator)
        return identities_for(nodes, request.task, request.model) or None

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        """Serve `request` on the cluster: each node of the manager's plan in turn, retrying within
        the deadline (docs/reliability.md says when and how); with `verify` > 1, several nodes at once
        until enough agree (`_agreed`)."""
        if request.verify > 1:
            completion = await self._agreed(request)
            yield completion.text
            yield completion
            return
        clock = self.manager.clock
        deadline = clock() + request.timeout
        delivered = ""  # what the caller has seen: a replay elsewhere must begin with it
        failures: list[str] = []
        failed: set[str] = set()  # nodes that failed this request: not asked again
        planned_any = False
        while True:
            nodes = [n for n in self.manager.plan(request) if n.peer_id not in failed]
            planned_any = planned_any or bool(nodes) or bool(failed)
            if not planned_any:
                raise self._nobody_serves(request)
            busy: list[float] = []
            for node in nodes:
                if len(failed) >= self.max_attempts:
                    break
                if node.peer_id in failed:  # (failed meanwhile as a hedge's spare)
                    continue
                left = deadline - clock()
                if left <= 0:
                    raise DeadlineExceeded(request.timeout, "the mesh request")
                serving, attempt = node, dataclasses.replace(request, timeout=left)
                try:
                    spare = None if delivered else self._spare(nodes, node, failed)
                    if spare is None:
                        items = self._attempt(node, attempt, deadline, delivered)
                    else:
                        serving, items = await self._race(node, spare, attempt, deadline, failed, failures)
                    async with aclosing(items) as answers:
                        async for item in answers:
                            if isinstance(item, str):
                                delivered += item
                            yield item
                    return
                except Busy as exc:  # a full node (this one too) answers at once: every one may be asked
                    busy.append(exc.retry_after)
                    failures.append(f"{serving.peer_id[-8:]}: busy")
                    log.info("mesh: request %s: %s is busy; trying the next node", request.request_id,
                             serving.peer_id)
                except ProviderError as exc:
                    if not exc.retryable:
                        raise
                    if delivered and request.sampled:
                        raise StreamInterrupted(self.name, f"{serving.peer_id[-8:]} failed mid-answer "
                                                f"({exc.message}) and a sampled answer cannot be resumed elsewhere",
                                                delivered=len(delivered)) from exc
                    failed.add(serving.peer_id)
                    failures.append(f"{serving.peer_id[-8:]}: {exc.message}")
                    log.info("mesh: request %s: %s failed (%s); trying the next node", request.request_id,
                             serving.peer_id, exc)
                    await trio.sleep(min(max(0.0, deadline - clock()), self._backoff(len(failed))))
            if len(failed) >= self.max_attempts or not busy:
                break
            wait = min(busy)  # every node left is full: wait for the soonest slot, if the deadline allows
            if clock() + wait >= deadline:
                raise ClusterBusy(self.name, f"every eligible node is busy ({len(busy)} asked) and the deadline "
                                  f"comes before the soonest slot", retry_after=wait)
            log.info("mesh: request %s: every eligible node is busy; retrying in %.2f s", request.request_id, wait)
            await trio.sleep(wait)
        if delivered:
            raise StreamInterrupted(self.name, "every node tried failed mid-answer: " + "; ".join(failures),
                                    delivered=len(delivered))
        raise ProviderFailed(self.name, "every node tried failed: " + "; ".join(failures), retryable=True)

    def _spare(self, nodes: list[Candidate], node: Candidate, failed: set[str]) -> Candidate | None:
        """The node a hedged copy of a request on `node` goes to: the next one of the plan that has not
        failed it; None when hedging is off or no other node serves. Hedges are between other nodes:
        this node serving holds the request's admission slot, which a remote copy would hand off."""
        if self.hedge_after is None or node.is_self:
            return None
        after = nodes[nodes.index(node) + 1:]
        return next((n for n in after if n.peer_id not in failed and not n.is_self), None)

    async def _race(self, node: Candidate, spare: Candidate, request: ProviderRequest, deadline: float,
                    failed: set[str], failures: list[str]) -> tuple[Candidate, AsyncIterator[str | Completion]]:
        """Hedging: ask `node`; if its first chunk has not come within its hedge delay, ask `spare` too.
        The first to send a chunk wins and is returned (with that chunk put back in front of the rest);
        the other is cancelled, which resets its stream, so the node serving it stops and frees its slot.

        A node that fails before its rival wins is marked failed here. When both fail, `node`'s error
        is raised (the caller records it)."""
        delay = self.manager.hedge_delay(node.peer_id, self.hedge_after)
        first_try = self._attempt(node, request, deadline, "")
        if delay is None:
            return node, first_try
        send, receive = trio.open_memory_channel[tuple[Candidate, Any, Any]](2)

        async def first_item(candidate: Candidate, items: AsyncIterator[str | Completion]) -> None:
            try:
                item: Any = await items.__anext__()
            except Exception as exc:  # (StopAsyncIteration too: an answer that ended without a result)
                item = exc
            send.send_nowait((candidate, items, item))

        tries = [first_try]
        winner: tuple[Candidate, Any, Any] | None = None
        errors: list[tuple[Candidate, Exception]] = []
        raced = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first_item, node, first_try)
                racing = 1
                while racing and winner is None:
                    with trio.move_on_after(delay if len(tries) == 1 else math.inf) as waited:
                        candidate, items, item = await receive.receive()
                    if waited.cancelled_caught:  # no chunk from `node` within its delay: hedge
                        log.info("mesh: request %s: no chunk from %s within %.2f s; asking %s too",
                                 request.request_id, node.peer_id, delay, spare.peer_id)
                        self.hedged += 1
                        tries.append(self._attempt(spare, request, deadline, ""))
                        nursery.start_soon(first_item, spare, tries[-1])
                        racing += 1
                        continue
                    racing -= 1
                    if isinstance(item, Exception):
                        errors.append((candidate, item))  # (`node` failing before any hedge: ordinary failover)
                    else:
                        winner = (candidate, items, item)
                nursery.cancel_scope.cancel()  # the loser, still waiting for its first chunk
            raced = True
        finally:  # every try but the winner is closed, also when the request is cancelled meanwhile
            with trio.CancelScope(shield=True):
                for items in tries:
                    if not (raced and winner is not None and items is winner[1]):
                        await items.aclose()  # a loser that had its chunk too: closing resets its stream
        for candidate, exc in errors:
            if isinstance(exc, ProviderError) and exc.retryable and (winner is not None or candidate is spare):
                failed.add(candidate.peer_id)
                failures.append(f"{candidate.peer_id[-8:]}: {exc.message}")
        if winner is None:  # every try failed; `node`'s error is the caller's to record
            raise next(exc for candidate, exc in errors if candidate is node)
        candidate, items, item = winner
        return candidate, _put_back(item, items)

    async def _agreed(self, request: ProviderRequest) -> Completion:
        """`verify=k`: ask k nodes of the plan at once and compare the response CIDs they return; while
        no k agree, ask more (enough that k could agree), until they do or no node is left.

        Every node asked computes afresh (cache mode `no-cache`, or `no-store` when the caller said so,
        and an answer found in a cache is not a vote): a cached answer may have been computed by
        another node. Answers are compared within a group: the same request key (so the same model
        identity and weights) and the same kind of compute (a node's best accelerator: cuda, rocm,
        mps, then cpu), since greedy decoding on a GPU and on a CPU may legitimately differ. A node
        whose answer differs from one that at least two others of its group agree on is counted as
        failing (`BackendManager.disagreed`); one against one accuses nobody, it fails the request.
        """
        k, clock = request.verify, self.manager.clock
        deadline = clock() + request.timeout
        waiting = self.manager.plan(request)
        if len(waiting) < k:
            if not waiting:
                raise self._nobody_serves(request)
            raise ProviderFailed(self.name, f"verify={k} needs {k} nodes that serve this request; "
                                 f"{len(waiting)} do", retryable=False)
        fresh = dataclasses.replace(request, cache_mode="no-store" if request.cache_mode == "no-store" else "no-cache")
        votes: list[_Vote] = []
        failures: list[str] = []
        send, receive = trio.open_memory_channel[tuple[Candidate, "Completion | BaseException"]](len(waiting))

        async def ask(node: Candidate) -> None:
            try:
                answer: Completion | BaseException = await self._whole(node, fresh, deadline)
            except Exception as exc:  # that node's failure, whatever it is: the others may still agree
                answer = exc
            send.send_nowait((node, answer))

        agreed: list[_Vote] = []
        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                asking = 0
                while True:
                    agreed = _agreeing(votes)
                    if len(agreed) >= k:
                        break
                    while asking < k - len(agreed) and waiting:
                        nursery.start_soon(ask, waiting.pop(0))
                        asking += 1
                    if not asking:
                        break
                    node, answer = await receive.receive()
                    asking -= 1
                    if not isinstance(answer, Completion):
                        failures.append(f"{node.peer_id[-8:]}: {answer}")
                    elif answer.remote is None or answer.remote.cache not in ("miss", "bypass"):
                        failures.append(f"{node.peer_id[-8:]}: answered from a cache, not a vote")
                    else:
                        votes.append(_Vote(node.peer_id, (answer.remote.key, _compute(node)), answer))
                nursery.cancel_scope.cancel()  # agreed, or nobody left: the rest are not needed
        for peer in _outvoted(votes):
            log.warning("mesh: request %s: %s answered other than two or more agreeing nodes", request.request_id,
                        peer)
            self.manager.disagreed(peer)
        if len(agreed) >= k:
            completion = agreed[0].completion
            assert completion.remote is not None
            return dataclasses.replace(completion, remote=dataclasses.replace(
                completion.remote, agreed=tuple(vote.node for vote in agreed[:k])))
        if clock() >= deadline:
            raise DeadlineExceeded(request.timeout, f"verify={k} on the mesh")
        if _disputed(votes):
            raise Disagreement({vote.node: vote.cid for vote in votes}, k=k)
        answered = f"{len(votes)} node(s) answered alike" if votes else "no node answered"
        raise ProviderFailed(self.name, f"verify={k}: {answered}, and no other node was left to ask: "
                             + "; ".join(failures), retryable=True)

    async def _whole(self, node: Candidate, request: ProviderRequest, deadline: float) -> Completion:
        """`node`'s whole answer, for comparison. A node other than this one gets no admission slot
        to hand off: a verified request keeps its slot here while several nodes answer."""
        request = dataclasses.replace(request, timeout=max(0.001, deadline - self.manager.clock()),
                                      slot=request.slot if node.is_self else None)
        async with aclosing(self._attempt(node, request, deadline, "")) as items:
            async for item in items:
                if isinstance(item, Completion):
                    return item
        raise ProviderFailed(f"peer {node.peer_id[-8:]}", "the answer ended without a result", retryable=True)

    def _nobody_serves(self, request: ProviderRequest) -> ModelNotFound:
        what = f"model {request.model!r}" if request.model else f"task {request.task!r}"
        constraints = [f"on {', '.join(request.on_peers)}"] if request.on_peers else []
        constraints += [f"with a {request.accelerator} accelerator"] if request.accelerator else []
        return ModelNotFound(self.name, f"no node of the cluster serves {what}"
                                        + (f" ({'; '.join(constraints)})" if constraints else ""))

    def _backoff(self, failures: int) -> float:
        """Seconds to wait before the next node after `failures` failures: jittered, doubling, capped."""
        return min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** (failures - 1)) * self.manager.rng.uniform(0.5, 1.5)

    async def _attempt(self, node: Candidate, request: ProviderRequest, deadline: float,
                       delivered: str) -> AsyncIterator[str | Completion]:
        """One attempt on `node`, timed and reported to the manager, cut when no chunk comes within its
        liveness timeout; with text already `delivered`, a replay that skips what the caller has seen."""
        capacity = capacity_for(node, request.task, request.model)
        with self.manager.attempt(node.peer_id, deadline, capacity) as attempt:
            items = self._live(self._ask(node, request, attempt), node.peer_id)
            if delivered:
                items = _resumed(items, delivered, node.peer_id)
            async with aclosing(items) as answers:
                async for item in answers:
                    yield item

    async def _live(self, items: AsyncIterator[str | Completion], peer: str) -> AsyncIterator[str | Completion]:
        """`items` as they arrive, cut (`LivenessTimeout`) when the next one takes longer than the node's
        liveness timeout (`BackendManager.liveness`): chunks a replay skips count as arriving."""
        async with aclosing(items) as answers:
            while True:
                limit = self.manager.liveness(peer)
                try:
                    with trio.fail_after(limit if limit is not None else math.inf):
                        item = await answers.__anext__()
                except StopAsyncIteration:
                    return
                except trio.TooSlowError:
                    raise LivenessTimeout(f"peer {peer[-8:]}", f"no chunk within {limit:.2f} s "
                                          "(its liveness timeout)") from None
                yield item

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
        return MeshStatistics(served_by=dict(self.served_by), hedged=self.hedged)

    def __repr__(self) -> str:
        s = self.statistics()
        served = {peer[-8:]: n for peer, n in s.served_by.items()}
        return (f"<MeshProvider peer={self.peer_id[-8:]} manager={self.manager!r} pool={self.pool!r} "
                f"served_by={served}>")


class DetachedMesh(BaseProvider):
    """`mesh` outside a daemon: never ready, and says how to get one."""

    name = "mesh"
    tasks = TASKS

    def available(self) -> Readiness:
        return Readiness(False, "the mesh needs a daemon: run `accelmesh daemon` (it routes through the mesh), "
                                "or submit with node.connect() / `accelmesh generate --data-dir DIR`")

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        raise ProviderUnavailable(self.name, self.available().reason)
        yield  # pragma: no cover - makes this an async generator
