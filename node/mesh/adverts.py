"""Capability adverts: every node knows, within seconds, what every other node serves and how busy it is.

Pure parts (tested without a network):

- `PeerTable`: the newest valid advert per peer. It refuses forged (signer is not the subject),
  tampered, replayed (not a higher `seq`), expired and newer-major-version adverts, counts
  every refusal by reason, and forgets a peer whose newest advert arrived `ttl` seconds ago
  (its own clock: silent peers leave the table even when their last advert is still "valid").
  Only a *new* advert (a higher `seq`, which only its subject can sign) renews a peer: copies of
  the advert already held come from relays (gossip, the anti-entropy pull, a peer's answer to
  GetAdvert) and say nothing about whether the subject is alive, so they renew nothing; and
  no entry outlives its advert's own expiry (plus the 60 s clock-skew allowance).
- `LoadPublisher`: when a changed load is worth republishing (it moved to another
  power-of-two bucket), at most once per `min_interval`.
- `build_advert`: this node's advert from plain values, signed, within the wire's bounds
  (named in `protocols.advert.messages`): what does not fit is left out.

Gathering those values (blocking, in a worker thread): `AdvertBuilder` reads them from the
callables the daemon hands it each time an advert is signed; `local_offer` lists the local
providers (ready or not).

I/O part, `AdvertService`: signs and publishes this node's advert on the gossipsub topic
periodically and on change; drains the subscription in its own task (ignoring our own
messages); validates gossip before gossipsub relays it; serves `/accelmesh/advert/1.0.0`; and
right after a connection opens asks the new peer for its advert and every advert it knows,
so a newcomer is known at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from node.providers.base import DISABLED
from protocols.advert.messages import (
    MAX_ACCELERATOR_NAME_CHARS,
    MAX_ACCELERATORS,
    MAX_ADDR_CHARS,
    MAX_ADDRS,
    MAX_ADVERT_BYTES,
    MAX_CAPACITY,
    MAX_MODEL_IDENTITY_CHARS,
    MAX_MODEL_NAME_CHARS,
    MAX_MODELS,
    MAX_PROVIDER_NAME_CHARS,
    MAX_PROVIDERS,
    PROTOCOL_ID,
    PROTOCOL_VERSION,
    TOPIC,
    Accelerator,
    Advert,
    GetAdvert,
    Load,
    ProviderEntry,
    check_newer,
    decode_advert,
    encode_advert,
    sign_advert,
    verify_advert,
)
from protocols.codec import decode, encode
from protocols.errors import (
    BadSignature,
    ExpiredRecord,
    ProtocolError,
    StaleRecord,
    UnsupportedVersion,
)
from protocols.framing import encode_frame
from protocols.records import CLOCK_SKEW_MS, Identity

__all__ = ["PeerEntry", "PeerTable", "PeerTableStatistics", "LoadPublisher", "AdvertService", "AdvertBuilder",
           "REJECTIONS", "MAX_GOSSIP_RPC_BYTES", "build_advert", "local_offer", "software_version", "provider_json",
           "known_identities", "accelerator_json"]

log = logging.getLogger(__name__)

REJECTIONS = ("forged", "bad_signature", "replayed", "expired", "unsupported_version", "malformed", "own")
# A copy of an advert already held (the same seq from gossip and from a direct fetch) is not a
# refusal: it is counted as a duplicate, and it does not renew the peer (see PeerTable).
# The largest inbound pubsub RPC accepted. py-libp2p 0.8.1 packs many messages into one RPC (an
# IWANT reply carries every wanted advert in one RPC; outbound RPCs are split only at its
# RpcQueue's 1 MiB, `libp2p.pubsub.rpc_queue.DefaultMaxMessageSize`), and on an inbound RPC over
# this limit `Pubsub.continuously_read_stream` resets the stream and drops the sending peer from
# pubsub (`_handle_dead_peer`): with 128 KiB, two or three large adverts in one reply would cut
# an honest peer off. Each advert inside is still checked against MAX_ADVERT_BYTES.
MAX_GOSSIP_RPC_BYTES = 1024 * 1024
MAX_KNOWN_IN_ANSWER = 256  # adverts relayed in one answer to GetAdvert(known=True)


@dataclass
class PeerEntry:
    advert: Advert
    data: bytes  # the signed bytes as received (relayed unchanged)
    last_seen: float  # our wall clock, seconds
    received: float  # our monotonic clock, seconds: when this advert (this seq) first arrived
    valid_until: float = math.inf  # our monotonic clock: received + ttl, capped by the advert's own expiry

    def to_json(self) -> dict[str, Any]:
        a = self.advert
        return {
            "peer_id": a.peer_id,
            "addrs": list(a.addrs),
            "providers": [provider_json(p) for p in a.providers],
            "accelerators": [accelerator_json(x) for x in a.accelerators],
            "capacity": a.capacity,
            "queue": a.queue,
            "load": {"in_flight": a.load.in_flight, "queued": a.load.queued},
            "version": software_version(a.software),
            "last_seen": round(self.last_seen, 3),
        }  # `peers` adds the backend manager's view: health, cooldown_until, latency_ms, rtt_ms, ...


def software_version(software: str) -> str:
    """The version part of an advert's `software` ("accelmesh/0.1.0" -> "0.1.0"): what `info`,
    `status` and daemon.json call `version`, so every `version` field means the same thing."""
    return software.split("/", 1)[1] if software.startswith("accelmesh/") else software


def provider_json(p: ProviderEntry) -> dict[str, Any]:
    """One advertised provider as `info --json` and `peers --json` show it: `capacity` null is
    unlimited; `identities` maps each model whose identity is known to it (empty: none known, or a
    sender older than 1.2); `default_model` null: not said."""
    return {"name": p.name, "tasks": list(p.tasks), "models": list(p.models), "ready": p.ready,
            "capacity": p.capacity, "identities": dict(known_identities(p)), "default_model": p.default_model}


def known_identities(p: ProviderEntry) -> list[tuple[str, str]]:
    """(model, identity) for each advertised model whose identity is known, in the advert's order."""
    return [(m, i) for m, i in zip(p.models, p.identities or ()) if i]


def accelerator_json(x: Accelerator) -> dict[str, Any]:
    """One advertised device as `info --json` and `peers --json` show it (`cores` only when known)."""
    out = {"kind": x.kind, "name": x.name, "memory_total": x.memory_total, "memory_free": x.memory_free,
           "index": x.index}
    if x.cores is not None:
        out["cores"] = x.cores
    return out


@dataclass(frozen=True)
class PeerTableStatistics:
    peers: int
    accepted: int
    duplicates: int
    rejected: dict[str, int]
    expired: int


class PeerTable:
    """The newest valid, signed advert of every peer. Pure: callers pass the clocks."""

    def __init__(self, own_peer_id: str, ttl: float, *, wall: Callable[[], float] = time.time) -> None:
        self.own = own_peer_id
        self.ttl = ttl
        self._wall = wall
        self._peers: dict[str, PeerEntry] = {}
        # Peers that expired: the seq of their last advert, and until when (wall clock) that advert
        # could still verify. Survivors keep relaying it; only a newer one brings the peer back.
        self._gone: dict[str, tuple[int, float]] = {}
        self.accepted = 0
        self.expired = 0
        self.duplicates = 0
        self.rejected = dict.fromkeys(REJECTIONS, 0)
        self.changed = trio.Event()

    def offer(self, data: bytes, now: float) -> Advert | None:
        """Take advert bytes from gossip or a peer; the advert if it is new and valid, else None."""
        wall_ms = int(self._wall() * 1000)
        try:
            advert, fields = decode_advert(data)
            if advert.peer_id == self.own:
                self.rejected["own"] += 1
                return None
            verify_advert(advert, wall_ms, fields)
            current = self._peers.get(advert.peer_id)
            if current is not None and current.data == data:
                self.duplicates += 1  # a relayed copy: proves nothing about the subject, renews nothing
                return None
            gone = self._gone.get(advert.peer_id)
            if current is None and gone is not None and advert.seq <= gone[0]:
                self.duplicates += 1  # the expired peer's last advert, relayed again: it stays gone
                return None
            check_newer(current.advert if current else None, advert)
        except ProtocolError as exc:
            self.refused(exc)
            return None
        wall = self._wall()
        left = (advert.expires + CLOCK_SKEW_MS) / 1000 - wall  # what verify_advert would still accept
        self._peers[advert.peer_id] = PeerEntry(advert, data, wall, now, now + min(self.ttl, left))
        self.accepted += 1
        self._touch()
        return advert

    def refused(self, exc: ProtocolError) -> str:
        """Count (and log, when it smells of an attack) an advert refused here or by the gossip validator."""
        reason = _reason(exc)
        self.rejected[reason] += 1
        if reason in ("forged", "bad_signature", "unsupported_version"):
            log.warning("refused an advert (%s): %s", reason, exc, extra={"reason": reason})
        return reason

    def expire(self, now: float) -> list[str]:
        """Forget peers with no new advert for `ttl` seconds (or whose advert expired); their ids."""
        gone = [peer for peer, entry in self._peers.items() if now > entry.valid_until]
        for peer in gone:
            advert = self._peers.pop(peer).advert
            self._gone[peer] = (advert.seq, (advert.expires + CLOCK_SKEW_MS) / 1000)
        wall = self._wall()
        for peer in [p for p, (_, until) in self._gone.items() if until < wall]:
            del self._gone[peer]  # its advert no longer verifies anywhere: bounded memory
        self.expired += len(gone)
        if gone:
            self._touch()
        return gone

    def _touch(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def get(self, peer: str) -> PeerEntry | None:
        return self._peers.get(peer)

    def entries(self) -> list[PeerEntry]:
        return sorted(self._peers.values(), key=lambda e: e.advert.peer_id)

    def __contains__(self, peer: object) -> bool:
        return peer in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def statistics(self) -> PeerTableStatistics:
        return PeerTableStatistics(len(self._peers), self.accepted, self.duplicates,
                                   {k: v for k, v in self.rejected.items() if v}, self.expired)

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<PeerTable {s.peers} peers, accepted={s.accepted} rejected={s.rejected} expired={s.expired}>"


def _reason(exc: ProtocolError) -> str:
    if isinstance(exc, BadSignature):
        return "forged" if "not the subject" in str(exc) else "bad_signature"
    if isinstance(exc, StaleRecord):
        return "replayed"
    if isinstance(exc, ExpiredRecord):
        return "expired"
    if isinstance(exc, UnsupportedVersion):
        return "unsupported_version"
    return "malformed"


def load_bucket(n: int) -> int:
    """0, 1, 2-3, 4-7, ...: load changes within a bucket are not worth a new advert."""
    return 0 if n <= 0 else int(math.log2(n)) + 1


class LoadPublisher:
    """Decides when a load change is republished: a new bucket, at most once per `min_interval` seconds."""

    def __init__(self, min_interval: float) -> None:
        self.min_interval = min_interval
        self.published: tuple[int, int] = (0, 0)
        self.last = -math.inf

    def due(self, in_flight: int, queued: int, now: float) -> bool:
        changed = (load_bucket(in_flight), load_bucket(queued)) != (
            load_bucket(self.published[0]), load_bucket(self.published[1]))
        return changed and now - self.last >= self.min_interval

    def mark(self, in_flight: int, queued: int, now: float) -> None:
        self.published, self.last = (in_flight, queued), now


# ---------------------------------------------------------------------------------------
# This node's advert


def build_advert(
    identity: Identity,
    *,
    addrs: Sequence[str],
    providers: Iterable[ProviderEntry],
    accelerators: Iterable[Any],
    capacity: int,
    queue: int,
    load: tuple[int, int],
    ttl: float,
    seq: int,
    software: str,
    created: int,
) -> Advert:
    """This node's advert, signed, within the wire's bounds (`protocols.advert.messages`).

    What does not fit is left out, not cut: a cut model or provider name would name another one,
    a cut address would not dial. Only device names are cut (a shorter GPU name misleads no one).
    A provider capacity the wire cannot carry is left out too (unlimited): above MAX_CAPACITY the
    node's own `capacity` is the tighter bound anyway, and 0 or less is no cap (echo's `concurrency = 0`).
    A model left out takes its identity with it; an identity that does not fit is sent as "" (not
    known: a cut identity would key requests for another model); a default model that does not fit
    is left out (not said).
    `accelerators` are `node.accelerators.Accelerator`s (or anything with the same fields);
    `created` is Unix time in milliseconds and the advert expires `ttl` seconds later.
    """
    offered = [p for p in providers if _fits(p.name, MAX_PROVIDER_NAME_CHARS)][:MAX_PROVIDERS]

    def carried(cap: int | None) -> int | None:  # a provider's capacity, if the wire can carry it
        return cap if type(cap) is int and 1 <= cap <= MAX_CAPACITY else None

    def entry(p: ProviderEntry) -> ProviderEntry:
        named = zip(p.models, p.identities if p.identities is not None else [""] * len(p.models))
        models = [(m, i if _fits(i, MAX_MODEL_IDENTITY_CHARS) else "") for m, i in named
                  if _fits(m, MAX_MODEL_NAME_CHARS)][:MAX_MODELS]
        default = p.default_model if p.default_model and _fits(p.default_model, MAX_MODEL_NAME_CHARS) else None
        return ProviderEntry(p.name, tuple(p.tasks), tuple(m for m, _ in models), p.ready, carried(p.capacity),
                             tuple(i for _, i in models), default)

    return sign_advert(
        identity,
        addrs=tuple([a for a in addrs if _fits(a, MAX_ADDR_CHARS)][:MAX_ADDRS]),
        providers=tuple(entry(p) for p in offered),
        accelerators=tuple(Accelerator(a.kind, a.name[:MAX_ACCELERATOR_NAME_CHARS], a.memory_total, a.memory_free,
                                       a.index, a.cores)
                           for a in list(accelerators)[:MAX_ACCELERATORS]),
        capacity=capacity, queue=queue, load=Load(*load),
        software=software, protocol=PROTOCOL_VERSION, seq=seq, created=created,
        expires=created + int(ttl * 1000),
    )


def _fits(text: str, limit: int) -> bool:
    """Whether `text` fits a wire string bound of `limit` (the codec's bounds count characters)."""
    return len(text) <= limit


def local_offer(names: Iterable[str], get_provider: Callable[[str], Any]) -> list[ProviderEntry]:
    """The local providers this node offers, one entry per registered name, ready or not.

    Blocking (readiness checks may run subprocesses). The mesh itself is not offered, nor a
    provider switched off in the settings (`enabled = false`); a provider that cannot be built
    is offered as not ready, with no tasks or models (and no capacity: unlimited). Each entry
    carries the provider's `capacity()` (None: unlimited), the identity of each model as far as it
    is known without loading anything (`advertised_identity`; "" where not), and its `default_model()`.
    """
    out = []
    for name in names:
        if name == "mesh":
            continue
        try:
            provider = get_provider(name)
            readiness = provider.available()
            if not readiness.ok and readiness.reason == DISABLED:
                continue
            models = tuple(provider.models())
            out.append(ProviderEntry(name, tuple(provider.tasks), models, readiness.ok, provider.capacity(),
                                     tuple(_advertised_identity(provider, m) for m in models),
                                     provider.default_model() or None))
        except Exception as exc:  # a provider that cannot be built is advertised as not ready
            log.debug("provider %s: %s", name, exc)
            out.append(ProviderEntry(name, (), (), False))
    return out


def _advertised_identity(provider: Any, model: str) -> str:
    """The identity the advert carries for `model`: "" when it is not known (or telling it fails)."""
    try:
        identity = provider.advertised_identity(model)
    except Exception as exc:  # an identity that cannot be told is not known; the provider is still offered
        log.debug("provider %s: no identity for %r: %s", getattr(provider, "name", "?"), model, exc)
        return ""
    return identity if isinstance(identity, str) else ""


@dataclass(frozen=True)
class AdvertBuilder:
    """What this node advertises, read each time an advert is signed: `builder(seq)` is `AdvertService`'s
    `build`, `builder.offer_signature()` its `offer_signature`. Blocking: call both in a worker thread."""

    identity: Identity
    addrs: Callable[[], Sequence[str]]
    offer: Callable[[], Sequence[ProviderEntry]]  # e.g. `local_offer` over the provider registry
    accelerators: Callable[[], Sequence[Any]]  # e.g. a `node.accelerators.AcceleratorDetector`
    load: Callable[[], tuple[int, int]]  # (in flight, queued)
    capacity: int
    queue: int
    ttl: float
    software: str
    wall: Callable[[], float] = time.time

    def __call__(self, seq: int) -> Advert:
        return build_advert(self.identity, addrs=self.addrs(), providers=self.offer(),
                            accelerators=self.accelerators(), capacity=self.capacity, queue=self.queue,
                            load=self.load(), ttl=self.ttl, seq=seq, software=self.software,
                            created=int(self.wall() * 1000))

    def offer_signature(self) -> list[tuple[str, bool, tuple[str, ...], tuple[str, ...], str | None]]:
        """What this node serves (providers, readiness, models, their identities, the default model):
        a change is published at once, so an identity that becomes known (a model loaded) reaches
        peers within seconds, not at the next periodic advert."""
        return [(p.name, p.ready, tuple(p.models), tuple(p.identities or ()), p.default_model) for p in self.offer()]


# ---------------------------------------------------------------------------------------
# The service


class AdvertService:
    """Publishes this node's advert and keeps the peer table current. Runs inside the daemon's nursery."""

    def __init__(
        self,
        host: Any,
        guard: Any,
        table: PeerTable,
        build: Callable[[int], Advert],
        *,
        interval: float,
        load_interval: float,
        load: Callable[[], tuple[int, int]],
        load_changed: Callable[[], trio.Event],
        is_member: Callable[[str], bool],
        offer_signature: Callable[[], Any] | None = None,
        pinged: Callable[[str, float | None], None] | None = None,
    ) -> None:
        self.host, self.guard, self.table, self.build = host, guard, table, build
        self.interval, self.load = interval, load
        self.load_changed = load_changed
        self.is_member = is_member
        self.offer_signature = offer_signature  # what we serve (providers, models, readiness), to spot changes
        self.pinged = pinged  # told each ping's round trip in ms (None: it failed): the backend manager's active health
        self.loads = LoadPublisher(load_interval)
        self.current: Advert | None = None
        self.current_bytes = b""
        self._seq = 0
        self.published = 0
        self.bytes_published = 0
        self.received = 0  # adverts received (gossip and fetches), valid or not
        self.bytes_received = 0
        self.pubsub: Any = None
        self._nursery: trio.Nursery | None = None
        self._republish = trio.Event()
        self._stopping = False

    # -- our advert ----------------------------------------------------------------------

    def refresh(self) -> bytes:
        """Sign a new advert of this node (a higher seq each time) and keep it as current."""
        self._seq = max(self._seq + 1, int(time.time() * 1000))
        self.current = self.build(self._seq)
        self.current_bytes = encode_advert(self.current)
        return self.current_bytes

    def republish_soon(self) -> None:
        """Something this node advertises changed (providers, models): publish now."""
        self._republish.set()

    async def publish(self) -> None:
        data = await trio.to_thread.run_sync(self.refresh)  # provider readiness may run subprocesses
        in_flight, queued = self.load()
        self.loads.mark(in_flight, queued, trio.current_time())
        try:
            await self.pubsub.publish(TOPIC, data)
            self.published += 1
            self.bytes_published += len(data)
        except Exception as exc:  # no peers subscribed yet, or a transient pubsub error: next round
            log.debug("advert publish failed: %s", exc)

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB, PROTOCOL_ID_V11, GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.tools.anyio_service import background_trio_service

        router = GossipSub(
            # A high upper degree keeps a bootstrap node's many leaves in its mesh (a star is the usual shape);
            # beyond it, the anti-entropy pull below still reaches everyone within one interval.
            protocols=[PROTOCOL_ID_V11, GOSSIPSUB], degree=8, degree_low=6, degree_high=32, heartbeat_interval=1,
            spam_protection_enabled=False,  # its default of 10 messages/s per topic drops adverts silently (P4)
        )
        self.pubsub = Pubsub(self.host, router, max_inbound_rpc_size=MAX_GOSSIP_RPC_BYTES)
        self.pubsub.set_topic_validator(TOPIC, self._validate_gossip, False)
        for protocol in (PROTOCOL_ID_V11, GOSSIPSUB):
            self.host.set_stream_handler(protocol, self._gossip_stream)
        self.host.set_stream_handler(PROTOCOL_ID, self.guard.wrap(PROTOCOL_ID, self._serve, allowed=self.is_member,
                                                                    max_frame_size=MAX_ADVERT_BYTES))
        async with background_trio_service(self.pubsub), background_trio_service(router), \
                trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.pubsub.wait_until_ready()
            subscription = await self.pubsub.subscribe(TOPIC)
            self.host.get_network().register_notifee(_ConnectionWatcher(self))
            await trio.to_thread.run_sync(self.refresh)
            nursery.start_soon(self._drain, subscription)
            nursery.start_soon(self._publish_periodically)
            nursery.start_soon(self._publish_load_changes)
            nursery.start_soon(self._expire_and_ping)
            nursery.start_soon(self._pull_periodically)
            if self.offer_signature is not None:
                nursery.start_soon(self._watch_offer)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self._stopping = True  # before the pubsub service below stops

    async def _gossip_stream(self, stream: Any) -> None:
        """Pubsub's stream handler, minus a py-libp2p 0.8.1 shutdown race.

        Pubsub reads its streams in the swarm's tasks, not its own, and hands each message to its
        service's task nursery; a message arriving while that nursery closes raises RuntimeError
        ("Nursery is closed to new arrivals") in the swarm, which takes the whole host down with
        it. While this node stops, such a stream is reset instead.
        """
        try:
            await self.pubsub.stream_handler(stream)
        except RuntimeError as exc:
            if not (self._stopping or "closed to new arrivals" in str(exc)):
                raise
            await _reset_quietly(stream)

    def _validate_gossip(self, peer_id: Any, message: Any) -> bool:
        """gossipsub relays only adverts that verify (the table checks replays when it takes them)."""
        try:
            advert, fields = decode_advert(message.data)
            verify_advert(advert, int(time.time() * 1000), fields)
        except ProtocolError as exc:
            self.table.refused(exc)
            return False
        return True

    async def _drain(self, subscription: Any) -> None:
        own = self.host.get_id().to_bytes()
        while True:
            message = await subscription.get()
            if message.from_id == own:
                continue
            self.received += 1
            self.bytes_received += len(message.data)
            self.table.offer(message.data, trio.current_time())

    async def _publish_periodically(self) -> None:
        while True:
            await self.publish()
            with trio.move_on_after(self.interval):
                await self._republish.wait()
            self._republish = trio.Event()

    async def _publish_load_changes(self) -> None:
        while True:
            await self.load_changed().wait()
            in_flight, queued = self.load()
            now = trio.current_time()
            if self.loads.due(in_flight, queued, now):
                await self.publish()
            elif self.loads.due(in_flight, queued, now + self.loads.min_interval):
                # changed, but too soon after the last advert: publish when the interval is up
                await trio.sleep(self.loads.last + self.loads.min_interval - now)
                if self.loads.due(*self.load(), trio.current_time()):
                    await self.publish()

    async def _watch_offer(self) -> None:
        """Publish at once when what this node offers changes (a provider becomes ready, a model appears)."""
        assert self.offer_signature is not None
        last = await trio.to_thread.run_sync(self.offer_signature)
        while True:
            await trio.sleep(min(self.interval, 2.0))
            now = await trio.to_thread.run_sync(self.offer_signature)
            if now != last:
                last = now
                self.republish_soon()

    async def _pull_periodically(self) -> None:
        """Anti-entropy: each interval, fetch every advert one random connected peer knows.

        Gossip is fast but best effort (a mesh can miss a node); this bounds how stale any
        table can be to one interval, whatever the topology.
        """
        import random

        while True:
            await trio.sleep(self.interval * random.uniform(0.8, 1.2))
            peers = list(self.host.get_network().connections)
            if peers:
                await self._fetch_from(random.choice(peers), announce=False)

    async def _expire_and_ping(self) -> None:
        from libp2p.host.ping import PingService
        from libp2p.peer.id import ID

        ping = PingService(self.host)
        while True:
            await trio.sleep(min(self.interval, self.table.ttl / 3))
            self.table.expire(trio.current_time())
            for entry in self.table.entries():
                peer = ID.from_base58(entry.advert.peer_id)
                if not self.host.get_network().connections.get(peer):
                    continue  # not connected: a request would dial it, and its outcome tells
                rtt: float | None = None
                try:
                    with trio.fail_after(5):
                        rtts = await ping.ping(peer, ping_amt=1)
                    rtt = float(rtts[0]) if rtts else None
                except Exception:  # a failed ping: the peer is there but does not answer
                    rtt = None
                if self.pinged is not None:
                    self.pinged(entry.advert.peer_id, rtt)

    # -- the advert protocol -------------------------------------------------------------

    async def _serve(self, framed: Any, peer: str) -> None:
        frame = await framed.read_frame()
        if frame is None:
            return
        ask = decode(frame, GetAdvert)
        assert isinstance(ask, GetAdvert)
        await framed.write(encode_frame(self.current_bytes, MAX_ADVERT_BYTES))
        if ask.known:
            for entry in self.table.entries()[:MAX_KNOWN_IN_ANSWER]:
                if entry.advert.peer_id != peer:
                    await framed.write(encode_frame(entry.data, MAX_ADVERT_BYTES))

    async def fetch(self, peer_id: Any) -> int:
        """Ask a peer for its advert and the adverts it knows; the number of adverts taken."""
        from node.mesh.streams import FramedStream, StreamLimits

        taken = 0
        stream = await self.host.new_stream(peer_id, [PROTOCOL_ID])
        framed = FramedStream(stream, StreamLimits(max_frame_size=MAX_ADVERT_BYTES, idle_timeout=5.0))
        try:
            await framed.write(encode_frame(encode(GetAdvert(known=True))))
            for _ in range(MAX_KNOWN_IN_ANSWER + 1):
                frame = await framed.read_frame()
                if frame is None:
                    break
                self.received += 1
                self.bytes_received += len(frame)
                taken += self.table.offer(frame, trio.current_time()) is not None
        finally:
            await framed.close()
        return taken

    async def _fetch_from(self, peer_id: Any, announce: bool = True) -> None:
        """Take the peer's adverts; after a new connection, also tell the cluster about us through it."""
        if not self.is_member(str(peer_id)) or not await self._speaks_adverts(peer_id):
            return
        try:
            with trio.fail_after(10):
                await self.fetch(peer_id)
        except Exception as exc:  # a peer without the protocol (a client) or one that went away
            log.debug("no advert from %s: %s", peer_id, exc)
            return
        if not announce:
            return
        # Our advert from before this connection reached nobody new: publish again once the peer
        # has told gossipsub it subscribes, so the rest of the cluster learns us through it.
        with trio.move_on_after(5):
            await self.pubsub.wait_for_subscription(peer_id, TOPIC)
            await trio.sleep(0.05)  # let gossipsub graft the peer into the topic's mesh
        self.republish_soon()

    async def _speaks_adverts(self, peer_id: Any, wait: float = 3.0) -> bool:
        """Whether the peer serves the advert protocol, per identify (clients do not)."""
        peerstore = self.host.get_peerstore()
        with trio.move_on_after(wait):
            while True:
                try:
                    protocols = peerstore.get_protocols(peer_id) or []
                except Exception:  # not in the peerstore yet
                    protocols = []
                if protocols:
                    return PROTOCOL_ID in protocols
                await trio.sleep(0.02)
        return True  # identify said nothing in time: just ask

    def peer_connected(self, peer_id: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._fetch_from, peer_id)


class _ConnectionWatcher:
    """A libp2p network notifee: a new connection triggers an advert exchange."""

    def __init__(self, service: AdvertService) -> None:
        self.service = service

    async def connected(self, network: Any, conn: Any) -> None:
        self.service.peer_connected(conn.muxed_conn.peer_id)

    async def disconnected(self, network: Any, conn: Any) -> None:
        pass

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


async def _reset_quietly(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception:  # already gone
            pass
