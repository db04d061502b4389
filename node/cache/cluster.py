"""The cluster tier: an answer any member computed, found through a signed record in the DHT.

    lookup(key)   record under /accelmesh/<key> (ClusterDHT.get_record, validated)  ─┐ within
                  bytes from the record's publisher, else from the CID's providers   │ `budget`
                  (one fetch per CID at a time), checked against the CID             ─┘ (the record)
                  → kept in the local store by the router, announced (provide) here
    publish(key, cid)   queued; the publisher task signs the record, puts it, announces the CID,
                        off the request path, batched, within the DHT's ADD_PROVIDER limit

Who may write: the DHT refuses streams from non-members (node.mesh.dht), every record is
validated (signature, publisher, time window: protocols/records.py) when it arrives and again
when it is read, and the bytes are hashed against the CID before anyone uses them. A member can
still sign a record mapping a key to a self-consistent wrong answer; docs/cache.md says what
protects against that (`verify=k`; removing the member).

A record's `seq` is the wall clock in milliseconds (at least one more than the last one this
process signed), so a node restarted with the same identity publishes records that win over its
old ones without persisting a counter.

Everything this needs is passed in: the DHT (`ClusterDHT`'s interface), a `fetch(peer, cid)`
callable (`node.cache.exchange`), the identity that signs, and `penalise(peer)`, which tells the
backend manager that a peer served bytes that fail their CID.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from node.errors import ProviderError
from protocols.records import CacheRecord, Identity, sign_cache_record

__all__ = ["ClusterCache", "ClusterHit", "ClusterStatistics", "LOOKUP_BUDGET", "FETCH_TIMEOUT", "RECORD_TTL",
           "PROVIDES_PER_WINDOW", "PROVIDE_WINDOW", "MAX_PENDING"]

log = logging.getLogger(__name__)

LOOKUP_BUDGET = 0.1  # seconds a lookup may take to find a record before the request runs (docs/cache.md)
FETCH_TIMEOUT = 2.0  # seconds to fetch one block from one peer, once a record says who has it
RECORD_TTL = 24 * 3600.0  # seconds a record is valid; republished at 90% of it
PROVIDES_PER_WINDOW = 10  # announcements per PROVIDE_WINDOW: the DHT accepts 10 ADD_PROVIDER per peer per 10 s
PROVIDE_WINDOW = 10.0
MAX_PENDING = 10_000  # publications queued at most; more are dropped (counted), the answers stay local
FETCH_PEERS = 4  # peers asked for one block at most (publisher first, then providers)


class DHT(Protocol):
    def alone(self) -> bool: ...  # no member to ask
    async def get_record(self, request_key: str) -> CacheRecord | None: ...
    async def put_record(self, record: CacheRecord) -> None: ...
    async def provide(self, cid: str) -> None: ...
    async def find_providers(self, cid: str) -> list[str]: ...


Fetch = Callable[[str, str], Awaitable["bytes | None"]]  # (peer id, cid) -> verified bytes, None if it has none


@dataclass(frozen=True)
class ClusterHit:
    data: bytes  # canonical response bytes, checked against `cid`
    cid: str
    served_from: str  # the peer the bytes came from


@dataclass(frozen=True)
class ClusterStatistics:
    lookups: int  # lookups that asked the DHT (coalesced ones not counted twice)
    hits: int
    misses: int  # no record within the budget
    fetch_failures: int  # a record, but no peer delivered matching bytes
    published: int  # records put in the DHT
    announced: int  # provider announcements made
    pending: int  # publications and announcements waiting in the queue
    dropped: int  # publications dropped because the queue was full

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Flight:
    __slots__ = ("done", "hit")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.hit: ClusterHit | None = None


class ClusterCache:
    """The cluster tier of one daemon. `run` (in the daemon's nursery) publishes; `lookup` is called
    by the router on a local miss; `publish` after an inference it may share."""

    def __init__(self, *, dht: DHT, fetch: Fetch, identity: Identity, penalise: Callable[[str], None],
                 budget: float = LOOKUP_BUDGET, fetch_timeout: float = FETCH_TIMEOUT, ttl: float = RECORD_TTL,
                 provides_per_window: int = PROVIDES_PER_WINDOW, provide_window: float = PROVIDE_WINDOW,
                 max_pending: int = MAX_PENDING, wall: Callable[[], float] = time.time) -> None:
        self.dht, self.fetch, self.identity, self.penalise = dht, fetch, identity, penalise
        self.budget, self.fetch_timeout, self.ttl = budget, fetch_timeout, ttl
        self.provides_per_window, self.provide_window = provides_per_window, provide_window
        self.max_pending, self.wall = max_pending, wall
        self._flights: dict[str, _Flight] = {}  # lookups in progress, by request key (single flight)
        self._records: OrderedDict[str, str] = OrderedDict()  # request key -> cid, to put (oldest first)
        self._provides: OrderedDict[str, None] = OrderedDict()  # CIDs to announce
        self._published: dict[str, tuple[str, float]] = {}  # request key -> (cid, when to republish, wall)
        self._wake = trio.Event()
        self._seq = 0
        self.lookups = self.hits = self.misses = self.fetch_failures = 0
        self.published = self.announced = self.dropped = 0

    # -- lookups -------------------------------------------------------------------------------

    def alone(self) -> bool:
        """A cluster of one: no member to ask, so no lookup (the router skips them)."""
        return self.dht.alone()

    async def lookup(self, key: str) -> ClusterHit | None:
        """The answer under request key `key` from the cluster, or None (no record within the budget,
        or no peer delivered bytes that match its CID). Identical concurrent lookups share one."""
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            return flight.hit
        flight = self._flights[key] = _Flight()
        try:
            flight.hit = await self._lookup(key)
        finally:
            del self._flights[key]
            flight.done.set()
        return flight.hit

    async def _lookup(self, key: str) -> ClusterHit | None:
        self.lookups += 1
        record = None
        with trio.move_on_after(self.budget):
            record = await self.dht.get_record(key)
        if record is None:
            self.misses += 1
            return None
        hit = await self._fetch(record)
        if hit is None:
            self.fetch_failures += 1
            return None
        self.hits += 1
        self.announce(record.cid)  # this node holds the bytes now (the router keeps them locally)
        return hit

    async def _fetch(self, record: CacheRecord) -> ClusterHit | None:
        """The record's bytes: from its publisher first, then from the CID's providers."""
        tried = {self.identity.peer_id}
        hit = await self._fetch_from([record.publisher], record.cid, tried)
        if hit is None:
            hit = await self._fetch_from(await self._providers(record.cid), record.cid, tried)
        return hit

    async def _fetch_from(self, peers: list[str], cid: str, tried: set[str]) -> ClusterHit | None:
        for peer in peers:
            if peer in tried or len(tried) > FETCH_PEERS:
                continue
            tried.add(peer)
            data = None
            try:
                with trio.move_on_after(self.fetch_timeout):
                    data = await self.fetch(peer, cid)
            except ProviderError as exc:
                log.warning("cluster cache: %s could not serve %s: %s", peer, cid, exc.message)
                if "CIDMismatch" in exc.message:
                    self.penalise(peer)  # bytes that fail their CID: counted against its health
                continue
            if data is not None:
                return ClusterHit(data, cid, peer)
        return None

    async def _providers(self, cid: str) -> list[str]:
        with trio.move_on_after(self.fetch_timeout):
            return await self.dht.find_providers(cid)
        return []

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, key: str, cid: str) -> None:
        """Share an answer this node computed: its record and its CID, queued (never blocks)."""
        if key not in self._records and self._pending() >= self.max_pending:
            self.dropped += 1
            return
        self._records[key] = cid
        self.announce(cid)
        self._wake.set()

    def announce(self, cid: str) -> None:
        """Tell the cluster this node holds `cid` (queued)."""
        if cid in self._provides or self._pending() < self.max_pending:
            self._provides[cid] = None
            self._wake.set()

    def _pending(self) -> int:
        return len(self._records) + len(self._provides)

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, int(self.wall() * 1000))
        return self._seq

    async def _put(self, key: str, cid: str) -> None:
        now_ms = int(self.wall() * 1000)
        record = sign_cache_record(self.identity, key=key, cid=cid, created=now_ms,
                                   expires=now_ms + int(self.ttl * 1000), seq=self._next_seq())
        try:
            await self.dht.put_record(record)
        except Exception as exc:  # the DHT's own errors: the answer stays local, the record is retried later
            log.warning("cluster cache: could not publish the record for %s: %s", key, exc)
            self._published[key] = (cid, self.wall() + min(60.0, self.ttl / 2))
            return
        self.published += 1
        self._published[key] = (cid, self.wall() + 0.9 * self.ttl)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Publish what is queued: every record at once, announcements `provides_per_window` per
        `provide_window`; republish records before they expire. Runs until cancelled."""
        task_status.started()
        window_started, provided = trio.current_time(), 0
        while True:
            await self._flush_records()
            now = trio.current_time()
            if now - window_started >= self.provide_window:
                window_started, provided = now, 0
            while self._provides and provided < self.provides_per_window:
                cid, _ = self._provides.popitem(last=False)
                provided += 1
                try:
                    await self.dht.provide(cid)
                    self.announced += 1
                except Exception as exc:  # announcements are a fallback: the record names the publisher
                    log.debug("cluster cache: could not announce %s: %s", cid, exc)
            self._wake = trio.Event()
            if self._records:
                continue
            wait = self._republish_in()
            if self._provides:  # waiting for the next window
                wait = min(wait, window_started + self.provide_window - trio.current_time())
            with trio.move_on_after(max(0.0, wait)):
                await self._wake.wait()

    async def _flush_records(self) -> None:
        due = [k for k, (_, at) in self._published.items() if at <= self.wall() and k not in self._records]
        for key in due:  # republished before it expires, and announced again (receivers forget after 48 h)
            self._records[key] = self._published[key][0]
            self.announce(self._published[key][0])
        while self._records:
            key, cid = self._records.popitem(last=False)
            await self._put(key, cid)

    def _republish_in(self) -> float:
        if not self._published:
            return math.inf
        return max(0.0, min(at for _, at in self._published.values()) - self.wall())

    async def drain(self) -> None:
        """Put every queued record now (a daemon stopping); announcements still queued are dropped
        (the records name this node, so its answers stay findable while it runs)."""
        await self._flush_records()

    def statistics(self) -> ClusterStatistics:
        return ClusterStatistics(self.lookups, self.hits, self.misses, self.fetch_failures, self.published,
                                 self.announced, self._pending(), self.dropped)

    def __repr__(self) -> str:
        s = self.statistics()
        return (f"<ClusterCache lookups={s.lookups} hits={s.hits} published={s.published} "
                f"announced={s.announced} pending={s.pending} budget={self.budget:g}s>")
