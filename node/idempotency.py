"""Request ids made idempotent at a daemon's front door: a repeated request gets the first one's Result.

A client that lost its connection sends its request again on a new one, with the same request id
(`node.remote.Client._run`); a program may do the same by hand. Whatever happened to the first
copy, the caller must receive one answer, and the node should not compute it twice:

    repeat of ...                  answered with
    ───────────────────────────    ──────────────────────────────────────────────────────────────
    a request still running        its Result once it has one (the repeat waits without a slot,
                                   within its own deadline); if it ends without one, the repeat
                                   runs the request itself
    a request finished recently    its Result, at once (RECENT_SECONDS; RECENT_RESULTS and
                                   RECENT_BYTES kept at most, oldest forgotten first)
    anything else                  a run of its own

A request repeats another when it has the same id and the same `fingerprint` (everything that
determines the answer), whoever sends it: a client peer without a fixed identity reconnects with a
new one, so the caller's peer id cannot be part of it. Request ids are random 128-bit values
(uuid4) unless a caller chooses one, so no other caller lands on one by chance. The same id with
another prompt is another request. Only Results are remembered: a failure is never replayed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import trio

from node.requests import Request, Result, evolve

__all__ = ["RECENT_BYTES", "RECENT_RESULTS", "RECENT_SECONDS", "Flight", "RecentRequests", "RecentStatistics",
           "RequestIdentity", "fingerprint"]

RECENT_SECONDS = 300.0  # a retry comes within seconds; five minutes covers a client's reconnect and backoff
RECENT_RESULTS = 4096  # finished requests remembered at most: a few minutes of a busy node
RECENT_BYTES = 64 * 1024 * 1024  # their text and response bytes at most (one response may be 4 MiB)

RequestIdentity = tuple[str, str]  # (request id, fingerprint)


def fingerprint(request: Request, provider: str | None, local_only: bool) -> str:
    """A digest of what determines the answer: the normalized request but for its id and its timeout
    (a retry may have less time left), the provider the caller named, and whether only local
    providers may serve. The repr of the whole frozen Request, so a field added to it later is
    covered without a change here; two equal requests whose reprs differ (chat messages with their
    keys in another order) only miss a replay, and run."""
    same = evolve(request, request_id="", timeout=0.0)
    return hashlib.sha256(repr((same, provider, local_only)).encode()).hexdigest()


class Flight:
    """The first request with an identity while it runs: repeats wait on `done`, then read `result`."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Result | None = None  # None once done: it failed, or its caller went away


@dataclass(frozen=True)
class RecentStatistics:
    running: int  # requests running now that a repeat would wait for
    remembered: int  # finished requests whose Result a repeat would get
    remembered_bytes: int
    joined: int  # repeats that waited for a running request and got its Result
    replayed: int  # repeats answered at once with a finished request's Result


class RecentRequests:
    """The requests a front door is running and those it finished recently, by identity.

    `running` holds one flight per distinct request admitted or queued here, so admission bounds
    it; `finished` is bounded by count, bytes and age. Time is trio's clock, passed in as `now`.
    """

    def __init__(self, *, max_results: int = RECENT_RESULTS, max_bytes: int = RECENT_BYTES,
                 max_age: float = RECENT_SECONDS) -> None:
        self.max_results, self.max_bytes, self.max_age = max_results, max_bytes, max_age
        self._running: dict[RequestIdentity, Flight] = {}
        self._finished: OrderedDict[RequestIdentity, tuple[float, Result, int]] = OrderedDict()  # oldest first
        self._bytes = 0
        self.joined = 0
        self.replayed = 0

    def replay(self, identity: RequestIdentity, now: float) -> Result | None:
        """The Result of a request with this identity finished less than `max_age` ago, if any."""
        while self._finished and now - next(iter(self._finished.values()))[0] >= self.max_age:
            self._forget_oldest()
        entry = self._finished.get(identity)
        if entry is None:
            return None
        self.replayed += 1
        return entry[1]

    def running(self, identity: RequestIdentity) -> Flight | None:
        return self._running.get(identity)

    def start(self, identity: RequestIdentity) -> Flight:
        """This request runs: repeats from now on wait for it."""
        assert identity not in self._running, "a repeat of a running request waits for it"
        flight = self._running[identity] = Flight()
        return flight

    def finish(self, identity: RequestIdentity, flight: Flight, result: Result | None, now: float) -> None:
        """The request ended, with `result` or without one: remember a Result, wake the repeats."""
        if self._running.get(identity) is flight:
            del self._running[identity]
        if result is not None:
            self._remember(identity, result, now)
        flight.result = result
        flight.done.set()

    def _remember(self, identity: RequestIdentity, result: Result, now: float) -> None:
        size = len(result.text) + len(result.response)  # what the entry keeps alive, roughly
        if identity in self._finished:
            self._bytes -= self._finished.pop(identity)[2]
        self._finished[identity] = (now, result, size)
        self._bytes += size
        while len(self._finished) > self.max_results or self._bytes > self.max_bytes:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, (_, _, size) = self._finished.popitem(last=False)
        self._bytes -= size

    def statistics(self) -> RecentStatistics:
        return RecentStatistics(running=len(self._running), remembered=len(self._finished),
                                remembered_bytes=self._bytes, joined=self.joined, replayed=self.replayed)

    def __repr__(self) -> str:
        return (f"<RecentRequests {len(self._running)} running, {len(self._finished)}/{self.max_results} "
                f"remembered, {self.joined} joined, {self.replayed} replayed>")
