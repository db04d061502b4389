"""The front door: every daemon entry point turns its request into one RequestContext and runs it here.

    entry point                               front door                      router
    ─────────────────────────────────────     ───────────────────────────     ──────────────────────────
    `accelmesh generate --data-dir` (CLI),    RequestContext(request,         router.arun(request,
      node.connect(data_dir=): control    ─►    provider, deadline, hops,  ─►   slot=, local_only=)
    node.connect(peer=), client peers,          caller, entry)                 ├─► local providers
      other nodes forwarding: infer       ─►  admission: a slot, the          └─► the mesh (other nodes,
    the HTTP API (a later issue)          ─►    queue, or Busy at once             or this one: run_local)

One request, one context: what to answer (`request`: validated and normalized exactly as an
in-process call's arguments are), who asked and through which door, by when (`deadline`, on
trio's clock: time spent in the queue counts), and how far it has travelled (`hops`: a request
another node forwarded is served by local providers only). The router holds the admission slot
around work done by a local provider; the mesh hands it back while another node serves.

A request id is idempotent here (node.idempotency): a repeat of a request, same id, same question, waits for the first one's Result or replays it, and never computes a second answer.

In-process calls with no daemon (`node.generate_text`) go straight to the router: no admission.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from node import router
from node.admission import Admission, Slot
from node.deps import RouterDeps
from node.errors import DeadlineExceeded
from node.idempotency import RecentRequests, RequestIdentity, fingerprint
from node.metrics import Served, outcome_of
from node.requests import Request, Result, evolve
from node.wire import FORWARDED_HOPS, request_from_wire, result_to_wire
from protocols.inference.messages import Request as WireRequest
from protocols.inference.messages import Result as WireResult

__all__ = ["ENTRY_POINTS", "FrontDoor", "RequestContext"]

log = logging.getLogger(__name__)

ENTRY_POINTS = ("control", "infer", "http")  # the doors a request can come in by
SELF = "mesh"  # not a door: this node's own mesh chose it to serve a request admitted here


@dataclass(frozen=True)
class RequestContext:
    request: Request  # what to answer: task, prompt or messages, model, params, cache mode, constraints
    provider: str | None  # the provider the caller named (None: this node's chain)
    deadline: float  # trio.current_time() by which the answer must be complete
    hops: int  # network crossings so far; FORWARDED_HOPS: served by local providers only
    caller: str  # the peer id that sent it
    entry: str  # one of ENTRY_POINTS, or SELF
    stream: bool = True  # False: the caller wants the answer whole (only the Result is yielded)
    repeatable: bool = True  # False: this node made the request id, so no repeat can carry it (no replay)

    @property
    def local_only(self) -> bool:
        return self.hops >= FORWARDED_HOPS


class FrontDoor:
    """Admits and runs every request a daemon receives. It needs the node's admission, the
    router's deps and this node's peer id, and nothing else of the daemon."""

    def __init__(self, *, admission: Admission, deps: RouterDeps, peer_id: str,
                 recent: RecentRequests | None = None, record: Callable[[Served], None] | None = None) -> None:
        self.admission, self.deps, self.peer_id = admission, deps, peer_id
        self.recent = recent if recent is not None else RecentRequests()  # request ids made idempotent
        self.record = record  # each finished request, for the metrics (node.metrics.Metrics.record)

    def context(self, message: WireRequest, *, caller: str, entry: str) -> RequestContext:
        """The context of a request that arrived now as a protocol message."""
        request = request_from_wire(message, default_model=self.deps.current_settings().model)
        return RequestContext(request=request, provider=message.provider,
                              deadline=trio.current_time() + request.timeout, hops=message.hops,
                              caller=caller, entry=entry)

    async def run(self, ctx: RequestContext) -> AsyncIterator[str | Result]:
        """Admit `ctx` (a slot now, a place in the queue, or Busy), then answer it: text chunks,
        then one Result naming the peer that computed it. Time in the queue counts against the
        deadline: a request still waiting when it passes ends with DeadlineExceeded. A repeat of a
        request running or recently finished here gets that one's answer instead (`_repeated`)."""
        started, first, result, error = trio.current_time(), None, None, None
        try:
            identity = (ctx.request.request_id, fingerprint(ctx.request, ctx.provider, ctx.local_only)
                        ) if ctx.repeatable else None
            earlier = await self._repeated(ctx, identity) if identity is not None else None
            if earlier is not None:  # node.idempotency: the caller gets that request's answer, not a second one
                result = earlier
                if earlier.text:
                    yield earlier.text
                yield earlier
                return
            flight = self.recent.start(identity) if identity is not None else None
            try:
                async with self._admitted(ctx) as slot, aclosing(self._answer(ctx, slot)) as items:
                    async for item in items:
                        if first is None:
                            first = trio.current_time()
                        if isinstance(item, Result):
                            item = result = self._computed_here(item)  # kept even if our caller stops listening now
                        yield item
            finally:
                if identity is not None:
                    self.recent.finish(identity, flight, result, trio.current_time())
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._finished(ctx, started, first, result, None if result is not None else error)

    def _finished(self, ctx: RequestContext, started: float, first: float | None, result: Result | None,
                  error: BaseException | None) -> None:
        """One log line per request (its id, how it ended, who answered), and the metrics."""
        now = trio.current_time()
        outcome = outcome_of(error if result is None else None)
        if result is None and error is None:
            outcome = "cancelled"  # the caller stopped listening before the answer
        if log.isEnabledFor(logging.INFO):  # (else nothing is formatted: the hot path of a quiet daemon)
            self._log(ctx, (now - started) * 1000, outcome, result, error)
        if self.record is not None:
            self.record(Served(
                entry=ctx.entry, outcome=outcome, provider=result.provider if result else None,
                peer=(result.peer or self.peer_id) if result else None, seconds=now - started,
                first_seconds=(first if first is not None else now) - started,
                tokens=int(result.usage.get("completion_tokens", 0)) if result else 0))

    def _log(self, ctx: RequestContext, ms: float, outcome: str, result: Result | None,
             error: BaseException | None) -> None:
        request_id = ctx.request.request_id
        if result is not None:
            log.info("request %s by %s: %s from %s via %s (%s) in %.1f ms", request_id, ctx.entry, result.cache,
                     (result.peer or self.peer_id)[-8:], result.provider, ctx.request.task, ms,
                     extra={"request_id": request_id, "entry": ctx.entry, "peer": result.peer,
                            "provider": result.provider, "cache": result.cache, "outcome": outcome})
        else:
            log.info("request %s by %s: %s%s", request_id, ctx.entry, outcome,
                     f" ({type(error).__name__}: {error})" if isinstance(error, Exception) else "",
                     extra={"request_id": request_id, "entry": ctx.entry, "outcome": outcome})

    async def _repeated(self, ctx: RequestContext, identity: RequestIdentity) -> Result | None:
        """The Result of the request `ctx` repeats: one finished recently, or one running now (waited
        for within ctx's deadline, holding no slot). None: ctx runs, as the first of its identity."""
        while True:
            result = self.recent.replay(identity, trio.current_time())
            if result is not None:
                return result
            flight = self.recent.running(identity)
            if flight is None:
                return None
            with trio.move_on_at(ctx.deadline):
                await flight.done.wait()
            if not flight.done.is_set():
                raise DeadlineExceeded(ctx.request.timeout)
            if flight.result is not None:
                self.recent.joined += 1
                return flight.result
            # It ended without a Result: its caller went away, or it failed. Either way this repeat
            # runs the request itself (the loop: unless another repeat started it first) rather
            # than raise the first one's error: an exception object belongs to the task that raised
            # it (raising it here too would mix two tracebacks), the error classes share no
            # constructor to copy one faithfully, and the failure may be one a second try gets past
            # (busy, a peer lost, the first's shorter deadline). A failure that is the request's own
            # (invalid, no such provider) fails again at once.

    @asynccontextmanager
    async def _admitted(self, ctx: RequestContext) -> AsyncIterator[Slot]:
        slot = self.admission.enter_now()
        if slot is None:  # none free: the queue, within the deadline
            with trio.move_on_at(ctx.deadline) as waiting:
                slot = await self.admission.enter()
            if waiting.cancelled_caught:
                raise DeadlineExceeded(ctx.request.timeout)  # it waited its whole deadline in the queue
        async with self.admission.hold(slot):
            yield slot

    async def run_local(self, message: WireRequest, slot: Slot | None) -> AsyncIterator[str | Result]:
        """The mesh choosing this node: `message` as it would be forwarded, served by this node's
        local providers within the slot the request already holds (no second admission). Request
        ids are not checked again: `run` did, when it admitted the request this serves."""
        ctx = self.context(message, caller=self.peer_id, entry=SELF)
        async with aclosing(self._answer(ctx, slot)) as items:
            async for item in items:
                yield self._computed_here(item) if isinstance(item, Result) else item

    def _answer(self, ctx: RequestContext, slot: Slot | None) -> AsyncIterator[str | Result]:
        """The router's answer to `ctx` within what is left of its deadline (a generator to close)."""
        remaining = ctx.deadline - trio.current_time()
        if remaining <= 0:
            raise DeadlineExceeded(ctx.request.timeout)
        return router.arun(evolve(ctx.request, timeout=remaining), provider=ctx.provider, deps=self.deps, slot=slot,
                           local_only=ctx.local_only, chunks=ctx.stream)

    def _computed_here(self, result: Result) -> Result:
        """`result` naming this node as the one that computed it, unless a peer did."""
        return result if result.peer else evolve(result, peer=self.peer_id)

    def runner(self, entry: str) -> Any:
        """The inference server's runner for requests coming in by `entry` (node.mesh.server)."""
        if entry not in ENTRY_POINTS:
            raise ValueError(f"unknown entry point {entry!r}; one of {', '.join(ENTRY_POINTS)}")

        async def run_wire(message: WireRequest, caller: str) -> AsyncIterator[str | WireResult]:
            async with aclosing(self.run(self.context(message, caller=caller, entry=entry))) as items:
                async for item in items:
                    yield result_to_wire(item, peer=self.peer_id) if isinstance(item, Result) else item

        return run_wire
