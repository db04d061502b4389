"""The cluster cache's DHT: py-libp2p's Kademlia (KadDHT, server mode) for the signed cache records
under `/accelmesh/<request key>` and for provider announcements of response CIDs.

KadDHT serves: its handler for `/ipfs/kad/1.0.0` answers GET_VALUE, PUT_VALUE, GET_PROVIDERS and
ADD_PROVIDER from its value store, provider store and routing table. What this module adds, and why:

- Validation. A `Validator` for the `accelmesh` namespace (every node registers it) runs
  `protocols.records.validate_cache_value` / `select_cache_value` on each inbound PUT, so a store
  holds only valid records, the best one per key. A value is validated *again* when read:
  KadDHT hands back a locally held value unchecked, and a record may have expired since.
- Membership. KadDHT's handler is wrapped: a stream from a non-member is reset before KadDHT
  reads it (no records, announcements or lookups from strangers). The routing table takes
  members only, and every request this module sends goes to members only.
- Lookups in two round trips for two hops. `KadDHT.get_value` walks to convergence with
  FIND_NODE before it sends any GET_VALUE (notes: p50 79 ms two hops away). `get_record` checks
  the local store, then sends GET_VALUE straight to the members closest to the key, ALPHA at a
  time, follows the closer peers each answer names, and stops at the first valid record;
  `find_providers` walks the same way with GET_PROVIDERS. Measured (tests/mesh/test_dht.py, five
  nodes in one process, two hops): p50 about 8 ms, the library's get_value 75 to 100 ms.
- Fewer frames per request. Opening a stream (multistream negotiation) costs more than the
  request on it (measured: 5.6 ms per GET_VALUE on a new stream, 2.1 ms on an open one), and
  KadDHT's handler answers request after request on one stream: lookups keep one stream per
  member open for REUSE_FOR seconds, requests taking turns on it, as go-libp2p-kad-dht's message
  sender does. Every read of a Yamux stream sends a window update, and KadDHT reads a length
  prefix a byte at a time and writes an answer's length and body apart: requests and answers
  here go out whole, inbound streams reach the handler through `_ServedStream`, which reads what
  has arrived and sends an answer in one frame. The library's limit of 12 inbound DHT streams per
  node (sized for floods from the open IPFS network; only members reach it here) becomes
  INBOUND_STREAMS, INBOUND_STREAMS_PER_PEER for one member.
- Placement. `put_record` and `provide` find the closest members with the same walk and store
  there (PUT_VALUE, ADD_PROVIDER). The library's own `put_value` cannot: its FIND_NODE walk is
  refused by py-libp2p peers for keys of more than 50 bytes that are not multihashes ("FIND_NODE
  key is not a valid PeerId"), which `/accelmesh/<CID>` is (70 bytes): measured, a record put at
  one end of a line of five reached the neighbour only.
- Cancellation. The caller bounds a lookup (`trio.move_on_after`). The library's request helpers
  close their stream in a `finally` that is cancelled with them: the FIN is never sent and the
  peer's handler waits forever, holding an inbound slot (measured: 100 cancelled
  `ValueStore._get_from_peer` calls left a peer at 12 of its 12 slots, refusing every DHT stream
  after). Here a walk's requests run in `run()`'s nursery and a stream is closed (answered) or
  reset (anything else, cancellation included) by a task of it: a cancelled lookup returns at
  once, never waiting on a shielded frame write. Inbound streams are reset after
  INBOUND_STREAM_LIFETIME, so a member that vanishes mid-request frees its slots too.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import multiaddr
import trio
from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import BUCKET_SIZE, format_time_rfc3339
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import _encode_key  # the key KadDHT files a CID's providers under
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import maybe_consume_signed_record, sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.records.record import make_signed_put_record
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_varint_prefixed

from protocols.errors import ProtocolError
from protocols.records import (
    CACHE_NAMESPACE,
    CacheRecord,
    cache_dht_key,
    encode_cache_record,
    select_cache_value,
    validate_cache_value,
)

__all__ = [
    "ALPHA",
    "MAX_ASKS",
    "ASK_TIMEOUT",
    "MAX_ANSWER_BYTES",
    "REUSE_FOR",
    "INBOUND_STREAMS",
    "INBOUND_STREAMS_PER_PEER",
    "INBOUND_STREAM_LIFETIME",
    "ADD_MEMBER_WAIT",
    "REFUSAL_REASONS",
    "CacheRecordValidator",
    "ClusterDHT",
    "DHTStatistics",
]

log = logging.getLogger(__name__)

ALPHA = 3  # requests in flight per walk (Kademlia's and go-libp2p's α; the library's 10 suits the open IPFS DHT)
MAX_ASKS = BUCKET_SIZE  # requests per walk at most: records and announcements are stored at the k=20 closest
ASK_TIMEOUT = 3.0  # seconds one member may take to answer one request before its turn goes to the next candidate
MAX_ANSWER_BYTES = 256 * 1024  # one answer: a 2 KiB record, 20 closer peers and 20 providers with their addresses
# (the library allows 4 MiB per DHT message)
READ_CHUNK = 64 * 1024  # bytes taken from a stream per read at most (reads return what has arrived)
REUSE_FOR = 5.0  # seconds a lookup stream to one member is reused after it was opened, then closed
REAP_INTERVAL = 1.0  # seconds between closing lookup streams past REUSE_FOR
INBOUND_STREAMS = 256  # DHT streams this node serves at once (the library's 12 would cap an active cluster at 12)
INBOUND_STREAMS_PER_PEER = 8  # of which from one member: its lookup stream, and a few puts and announcements
INBOUND_STREAM_LIFETIME = 10.0  # seconds an inbound DHT stream may stay open (> REUSE_FOR + ASK_TIMEOUT)
LOCAL_FRESH_MS = 10 * 60 * 1000  # a record held here younger than this is used as it is
RECHECK_BUDGET = 0.03  # seconds an older one waits for a newer record elsewhere before it is used
FAILURES_TO_DROP = 2  # requests in a row a member may fail before it leaves the routing table
ADD_MEMBER_WAIT = 2.0  # seconds to wait for a new member's addresses (identify) before adding it to the table
PEER_ADDR_TTL = 600  # seconds the addresses named in an answer stay in the peerstore (as the library keeps them)
CLEANUP_TIMEOUT = 5.0  # seconds a background close or reset of a stream may take
REFUSAL_REASONS = ("non_member", "over_limit", "invalid")  # streams reset for their sender; values refused

T = TypeVar("T")


def _now_ms(wall: Callable[[], float]) -> int:
    return int(wall() * 1000)


class CacheRecordValidator(Validator):  # type: ignore[misc]
    """The `accelmesh` namespace for KadDHT: the pure validator and selector of protocols/records.py.

    `on_invalid` is called for each value refused (an inbound PUT, a value the library fetched)."""

    def __init__(self, *, wall: Callable[[], float] = time.time, on_invalid: Callable[[], None] | None = None) -> None:
        self.wall, self.on_invalid = wall, on_invalid

    def validate(self, key: str, value: bytes) -> None:
        try:
            validate_cache_value(key, value, _now_ms(self.wall))
        except ProtocolError:
            if self.on_invalid is not None:
                self.on_invalid()
            raise

    def select(self, key: str, values: list[bytes]) -> int:
        # -1 (no valid value) would index the library's lists from the end; it calls select only
        # with values it has just validated, so 0 is never a wrong answer there.
        return max(0, select_cache_value(key, values, _now_ms(self.wall)))


@dataclass(frozen=True)
class DHTStatistics:
    records: int  # /accelmesh/ values in this node's store
    routing_peers: int  # members in the routing table
    gets: int  # get_record calls
    hits: int  # get_record calls that returned a record
    local_hits: int  # of which from this node's own store
    asks: int  # requests sent by walks (lookups and placement)
    streams_opened: int  # outbound DHT streams opened (lookup streams are reused)
    serving: int  # inbound DHT streams open now (members' lookup streams, puts, announcements)
    puts: int  # records put (a put beaten by the record already held here is not made, not counted)
    provides: int  # provider announcements
    refused: int  # streams reset for their sender, and values refused by validation
    refused_by_reason: Mapping[str, int] = field(default_factory=dict)  # REFUSAL_REASONS that happened
    dropped: int = 0  # members taken out of the routing table after failing FAILURES_TO_DROP requests in a row

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["refused_by_reason"] = dict(self.refused_by_reason)
        return out


@dataclass
class _LookupStream:
    lock: trio.Lock = field(default_factory=trio.Lock)  # one request at a time on the stream
    stream: Any = None  # open and in step (every answer read), or None
    opened: float = 0.0  # trio clock


class _Requests:
    """Requests to members over `/ipfs/kad/1.0.0`, one answer each.

    `reuse=True` (lookups): one stream per member, requests taking turns on it while it is younger
    than REUSE_FOR; a reused stream that fails (closed meanwhile) is retried once on a new one.
    `reuse=False` (puts, announcements, which a peer refuses by resetting): a stream per request.
    Streams are closed or reset by `spawn`ed tasks, so a cancelled request returns at once."""

    def __init__(self, host: Any, spawn: Callable[[Callable[[], Awaitable[Any]]], None]) -> None:
        self.host, self.spawn = host, spawn
        self._lookup: dict[ID, _LookupStream] = {}
        self.opened = 0

    async def request(self, peer: ID, data: bytes, *, reuse: bool) -> bytes:
        if not reuse:
            stream = await self._open(peer)
            answer = await self._exchange(stream, data)
            self.spawn(stream.close)
            return answer
        held = self._lookup.setdefault(peer, _LookupStream())
        async with held.lock:
            self._expire(held)
            if held.stream is not None:
                stream, held.stream = held.stream, None  # taken: it goes back only in step
                try:
                    answer = await self._exchange(stream, data)
                except Exception:  # closed meanwhile (the peer's lifetime limit, a lost connection): once more
                    pass
                else:
                    held.stream = stream
                    return answer
            stream = await self._open(peer)
            opened = trio.current_time()
            answer = await self._exchange(stream, data)
            held.stream, held.opened = stream, opened
            return answer

    def reap(self) -> None:
        """Close the idle lookup streams older than REUSE_FOR."""
        for held in self._lookup.values():
            if not held.lock.locked():
                self._expire(held)

    def _expire(self, held: _LookupStream) -> None:
        if held.stream is not None and trio.current_time() - held.opened >= REUSE_FOR:
            self.spawn(held.stream.close)
            held.stream = None

    async def _open(self, peer: ID) -> Any:
        stream = await self.host.new_stream(peer, [KAD_PROTOCOL_ID])  # resets the stream itself if it fails
        self.opened += 1
        return stream

    async def _exchange(self, stream: Any, data: bytes) -> bytes:
        try:
            await stream.write(data)  # one frame: KadDHT's helpers write the length and the message apart
            return await _read_answer(stream)
        except BaseException:  # failed or cancelled: out of step, reset it (off this path)
            self.spawn(stream.reset)
            raise


class _ServedStream:
    """An inbound stream as KadDHT's handler sees it: reads served from what has arrived, writes
    held until the handler next reads (or closes), so that an answer leaves in one frame.

    The handler reads a request's length prefix a byte at a time and writes an answer's length
    and body apart; each read of a Yamux stream sends a window update and each write is a frame
    of its own. Held writes cannot stall: the handler reads (or closes) whenever it waits for the
    peer. Everything else is the stream's own."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._received = b""
        self._pending = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        await self._flush()
        if not self._received:
            self._received = await self._stream.read(READ_CHUNK)
        if n is None or n < 0:
            n = len(self._received)
        data, self._received = self._received[:n], self._received[n:]
        return data

    async def write(self, data: bytes) -> None:
        self._pending += data

    async def close(self) -> None:
        await self._flush()
        await self._stream.close()

    async def reset(self) -> None:
        self._pending = b""
        await self._stream.reset()

    async def _flush(self) -> None:
        if self._pending:
            data, self._pending = self._pending, b""
            await self._stream.write(data)


async def _read_answer(stream: Any) -> bytes:
    """One varint-prefixed answer (at most MAX_ANSWER_BYTES), in as few reads as it arrives in.

    Each read of a Yamux stream sends the peer a window update, and the library's reader takes
    the length prefix a byte at a time. Reading whatever has arrived is safe here because a peer
    sends one answer per request; bytes beyond it put the stream out of step (ValueError)."""
    data = b""
    while True:
        chunk = await stream.read(READ_CHUNK)
        if not chunk:
            raise IncompleteReadError("the stream ended inside an answer", expected_bytes=1, received_bytes=len(data))
        data += chunk
        length, used = _varint(data[:10])
        if used == 0:
            continue  # the prefix is not complete yet
        if length > MAX_ANSWER_BYTES:
            raise MessageTooLarge(f"an answer of {length} bytes (limit {MAX_ANSWER_BYTES})")
        if len(data) > used + length:
            raise ValueError("bytes after the answer: the stream is out of step")
        if len(data) == used + length:
            return data[used:]


def _varint(data: bytes) -> tuple[int, int]:
    """(value, bytes used) of the unsigned varint `data` starts with; (0, 0) if it is incomplete."""
    value = 0
    for i, byte in enumerate(data):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, i + 1
    if len(data) >= 10:
        raise ValueError("a varint longer than 10 bytes")
    return 0, 0


class ClusterDHT:
    """KadDHT (SERVER mode) on this node's host, for the `/accelmesh/` namespace of signed cache records.

    Build it before peers connect (identify then lists `/ipfs/kad/1.0.0`), run `run` in a nursery,
    and call `add_member` for each connected member: the routing table is not filled on connect.
    """

    def __init__(self, host: Any, *, is_member: Callable[[str], bool], wall: Callable[[], float] = time.time) -> None:
        logging.getLogger("libp2p.kad_dht").setLevel(logging.ERROR)  # a WARNING per closed stream (notes P3)
        self.host, self.is_member, self.wall = host, is_member, wall
        self._me = host.get_id()
        self.kad = KadDHT(host, DHTMode.SERVER)  # registers its handler for /ipfs/kad/1.0.0 ...
        self.kad.register_validator(CACHE_NAMESPACE, CacheRecordValidator(wall=wall, on_invalid=self._refused_invalid))
        self.kad._inbound_limiter = trio.CapacityLimiter(INBOUND_STREAMS)
        host.set_stream_handler(KAD_PROTOCOL_ID, self._serve)  # ... which only members reach
        self._members_only_routing_table()
        self._nursery: trio.Nursery | None = None
        self._requests = _Requests(host, lambda close: self._running().start_soon(self._finish, close))
        self._inbound: dict[str, int] = {}  # DHT streams being served, by member
        self._refused: dict[str, int] = {}
        self._failures: dict[ID, int] = {}  # requests in a row that failed, by member
        self.gets = self.hits = self.local_hits = self.asks = self.puts = self.provides = self.dropped = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<ClusterDHT {self._me} members={s.routing_peers} records={s.records} refused={s.refused}>"

    # -- service -------------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the KadDHT service (its table maintenance) and the closing of this node's streams;
        `task_status.started()` once ready. Runs until cancelled."""
        async with background_trio_service(self.kad), trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                while True:
                    await trio.sleep(REAP_INTERVAL)
                    self._requests.reap()
            finally:
                self._nursery = None

    def _running(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("ClusterDHT.run() is not running")
        return self._nursery

    @staticmethod
    async def _finish(close: Callable[[], Awaitable[Any]]) -> None:
        with trio.move_on_after(CLEANUP_TIMEOUT):
            try:
                await close()
            except Exception:  # the peer reset it first, or the connection is gone: nothing left to free
                pass

    async def add_member(self, peer_id: str, addrs: Sequence[str] = ()) -> None:
        """Put a cluster member into the routing table; non-members are ignored. `addrs` (the ones
        its advert lists) let a member this node is not connected to be added, and dialed when a
        lookup needs it.

        Otherwise waits (up to ADD_MEMBER_WAIT) for the peer's addresses, which identify brings for
        a peer that dialed us. The library's server-mode check is skipped: identify lists only
        handlers registered before the connection, and a member runs this DHT by definition."""
        if not self.is_member(peer_id):
            return
        peer = ID.from_base58(peer_id)
        if peer == self._me:
            return
        if addrs and not self._addrs(peer):
            parsed = []
            for raw in addrs:
                try:
                    parsed.append(multiaddr.Multiaddr(raw))
                except Exception:  # an address we cannot parse is no address
                    continue
            if parsed:
                self.host.get_peerstore().add_addrs(peer, parsed, PEER_ADDR_TTL)
        with trio.move_on_after(ADD_MEMBER_WAIT):
            while not self._addrs(peer):
                await trio.sleep(0.01)
        if not await self.kad.add_peer(peer, skip_server_mode_check=True):
            log.debug("dht: member %s not added to the routing table (no addresses, or its bucket is full)", peer_id)

    def _addrs(self, peer: ID) -> list[Any]:
        try:
            return list(self.host.get_peerstore().addrs(peer))
        except Exception:  # PeerStoreError: not known (yet)
            return []

    def alone(self) -> bool:
        """Whether there is no member to ask (a cluster of one): the routing table is empty and no
        member is connected. Then a lookup can find only bytes this node already holds."""
        return self.kad.routing_table.size() == 0 and not any(
            self.is_member(str(peer)) for peer in self.host.get_connected_peers())

    # -- records -------------------------------------------------------------------------------

    async def get_record(self, request_key: str) -> CacheRecord | None:
        """The record under `cache_dht_key(request_key)`: this node's own if valid, else the first
        valid one a member answers with; None if there is none.

        Not bounded here: the caller bounds it (`trio.move_on_after`); cancelled, it stops at once."""
        self.gets += 1
        key = cache_dht_key(request_key)
        key_bytes = key.encode("utf-8")
        held = self._local_record(key, key_bytes)
        if held is not None and _now_ms(self.wall) - held.created < LOCAL_FRESH_MS:
            self.hits += 1
            self.local_hits += 1
            return held
        self._running()

        async def ask(peer: ID) -> tuple[CacheRecord | None, list[ID]]:
            answer = await self._ask(peer, Message.MessageType.GET_VALUE, key_bytes)
            closer = self._learn_peers(answer.closerPeers)
            if not (answer.HasField("record") and answer.record.value):
                return None, closer
            try:
                return validate_cache_value(key, answer.record.value, _now_ms(self.wall)), closer
            except ProtocolError as exc:
                self._refuse("invalid")
                log.debug("dht: %s answered an invalid record for %s: %s", peer, key, exc)
                return None, closer

        if held is None:
            record, _ = await self._walk(key_bytes, ask)
        else:  # an older record held here: a newer one may be elsewhere (a put this node missed); look briefly
            record = None
            with trio.move_on_after(RECHECK_BUDGET):
                record, _ = await self._walk(key_bytes, ask)
            record = self._newer(key, key_bytes, held, record)
            self.local_hits += record is held
        if record is not None:
            self.hits += 1
        return record

    def _newer(self, key: str, key_bytes: bytes, held: CacheRecord, found: CacheRecord | None) -> CacheRecord:
        """Of the record held here and one found elsewhere, the one every node would select (kept here)."""
        if found is None or found == held:
            return held
        values = [encode_cache_record(held), encode_cache_record(found)]
        if select_cache_value(key, values, _now_ms(self.wall)) != 1:
            return held
        self.kad.value_store.put(key_bytes, values[1])
        return found

    def _local_record(self, key: str, key_bytes: bytes) -> CacheRecord | None:
        held = self.kad.value_store.get(key_bytes)
        if held is None:
            return None
        try:
            return validate_cache_value(key, held.value, _now_ms(self.wall))
        except ProtocolError as exc:  # expired since it was stored, or put here past the validator
            self._refuse("invalid")
            self.kad.value_store.remove(key_bytes)
            log.debug("dht: dropped an invalid record held for %s: %s", key, exc)
            return None

    async def put_record(self, record: CacheRecord) -> None:
        """Store `record` here and at the (up to 20) members closest to its key.

        A ProtocolError for a record the validator refuses. A record older than the one held here
        (select rule) is not put: the newer one stays, here and at the peers."""
        self._running()
        key = cache_dht_key(record.key)
        key_bytes = key.encode("utf-8")
        value = encode_cache_record(record)
        now = _now_ms(self.wall)
        validate_cache_value(key, value, now)
        held = self.kad.value_store.get(key_bytes)
        if held is not None and held.value != value and select_cache_value(key, [value, held.value], now) != 0:
            log.debug("dht: not putting a record for %s: the one held here is newer", key)
            return
        signed = make_signed_put_record(key_bytes, value, self.host.get_private_key())  # as KadDHT stores one
        signed.timeReceived = format_time_rfc3339()
        self.kad.value_store.put_record(key_bytes, signed)  # (put() would have the library republish it, unfiltered)
        self.puts += 1
        put = Message()
        put.type = Message.MessageType.PUT_VALUE
        put.key = key_bytes
        put.record.CopyFrom(signed)
        put.record.ClearField("timeReceived")
        stored = await self._store_at_closest(key_bytes, Message.MessageType.GET_VALUE, put)
        log.debug("dht: record for %s stored at %d members", key, stored)

    # -- providers -----------------------------------------------------------------------------

    async def provide(self, cid: str) -> None:
        """Announce this node as a provider of `cid`, here and to the members closest to it."""
        self._running()
        key = _encode_key(cid)
        addrs = list(self.host.get_addrs())
        self.kad.provider_store.add_provider(key, PeerInfo(self._me, addrs))
        self.provides += 1
        announce = Message()
        announce.type = Message.MessageType.ADD_PROVIDER
        announce.key = key
        provider = announce.providerPeers.add()
        provider.id = self._me.to_bytes()
        provider.addrs.extend(a.to_bytes() for a in addrs)
        provider.signedRecord, _ = env_to_send_in_RPC(self.host)
        stored = await self._store_at_closest(key, Message.MessageType.GET_PROVIDERS, announce)
        log.debug("dht: %s announced to %d members", cid, stored)

    async def find_providers(self, cid: str) -> list[str]:
        """Members that announced `cid` (peer ids, deduplicated, this node left out): the ones this
        node was told about, else the first a walk finds. Not bounded here: the caller bounds it."""
        key = _encode_key(cid)
        local = self._provider_ids(self.kad.provider_store.get_providers(key))
        if local:
            return local
        self._running()

        async def ask(peer: ID) -> tuple[list[str] | None, list[ID]]:
            answer = await self._ask(peer, Message.MessageType.GET_PROVIDERS, key)
            closer = self._learn_peers(answer.closerPeers)
            found = [str(p) for p in self._learn_peers(answer.providerPeers)]
            return found or None, closer

        found, _ = await self._walk(key, ask)
        return list(dict.fromkeys(found or []))

    def _provider_ids(self, providers: list[PeerInfo]) -> list[str]:
        ids = [str(p.peer_id) for p in providers if p.peer_id != self._me]
        return [p for p in dict.fromkeys(ids) if self.is_member(p)]

    # -- walks ---------------------------------------------------------------------------------

    async def _walk(self, key: bytes, ask: Callable[[ID], Awaitable[tuple[T | None, list[ID]]]]
                    ) -> tuple[T | None, list[ID]]:
        """Ask the members closest to `key`, ALPHA at a time, closest first, adding the members each
        answer names, until an answer's result is not None, or MAX_ASKS requests went out, or
        nobody is left to ask. Returns that result (or None) and the members that answered.

        The requests run in `run()`'s nursery, so that the walk never waits for one to unwind: a
        request may be inside a frame write, which is shielded (node.mesh.host: a cancelled Yamux
        write would corrupt the connection). Once the walk returns, the requests still out finish
        in the background (within ASK_TIMEOUT), keeping their lookup streams in step for the next
        walk; a walk that is cancelled (or fails) cancels them."""
        nursery = self._running()
        seeds = self.kad.routing_table.find_local_closest_peers(key, BUCKET_SIZE)
        if not seeds:  # an empty table: the connected peers (members only, below)
            seeds = list(self.host.get_connected_peers())
        seen = {self._me}
        candidates = self._new_candidates(key, [], seeds, seen)
        # Members this node is connected to first (a stable sort keeps them closest first): one
        # answers in a millisecond, a dial costs a hundred, and in a cluster of fewer than
        # BUCKET_SIZE members every member holds every record.
        if not candidates:  # no member to ask (a cluster of one): nothing to set up
            return None, []
        connected = set(self.host.get_connected_peers())
        candidates.sort(key=lambda peer: peer not in connected)
        answered: list[ID] = []
        results_in, results_out = trio.open_memory_channel[tuple[ID, bool, Any, list[ID]]](math.inf)
        scopes: list[trio.CancelScope] = []
        in_flight = 0
        returned = False
        try:
            while True:
                while candidates and in_flight < ALPHA and len(scopes) < MAX_ASKS:
                    scopes.append(trio.CancelScope())
                    nursery.start_soon(self._ask_one, ask, candidates.pop(0), results_in, scopes[-1])
                    in_flight += 1
                    self.asks += 1
                if in_flight == 0:
                    returned = True
                    return None, answered
                peer, ok, found, closer = await results_out.receive()
                in_flight -= 1
                if ok:
                    answered.append(peer)
                if found is not None:
                    returned = True
                    return found, answered
                candidates = self._new_candidates(key, candidates, closer, seen)
        finally:
            results_out.close()
            if not returned:
                for scope in scopes:
                    scope.cancel()

    def _new_candidates(self, key: bytes, candidates: list[ID], peers: list[ID], seen: set[ID]) -> list[ID]:
        new = [p for p in dict.fromkeys(peers) if p not in seen and self.is_member(str(p))]
        seen.update(new)
        return sort_peer_ids_by_distance(key, candidates + new) if new else candidates

    async def _ask_one(self, ask: Callable[[ID], Awaitable[tuple[Any, list[ID]]]], peer: ID,
                       results: trio.MemorySendChannel[tuple[ID, bool, Any, list[ID]]],
                       scope: trio.CancelScope) -> None:
        outcome: tuple[ID, bool, Any, list[ID]] = (peer, False, None, [])
        with scope:
            try:
                with trio.move_on_after(ASK_TIMEOUT):
                    found, closer = await ask(peer)
                    outcome = (peer, True, found, closer)
            except Exception as exc:  # unreachable, reset (we are not its member), a broken answer: the next one
                log.debug("dht: no answer from %s: %r", peer, exc)
                self._failed(peer)
            else:
                self._failures.pop(peer, None)
        try:
            results.send_nowait(outcome)
        except trio.BrokenResourceError:  # the walk is over
            pass

    async def _store_at_closest(self, key: bytes, kind: int, message: Message) -> int:
        """Walk to the members closest to `key` (with `kind` requests, whose answers name closer
        peers), then send `message` to the BUCKET_SIZE closest that answered, all at once; how many
        accepted it (a peer refuses by resetting the stream)."""

        async def route(peer: ID) -> tuple[None, list[ID]]:
            return None, self._learn_peers((await self._ask(peer, kind, key)).closerPeers)

        _, answered = await self._walk(key, route)
        accepted = 0

        async def send(peer: ID) -> None:
            nonlocal accepted
            try:
                with trio.move_on_after(ASK_TIMEOUT):
                    await self._rpc(peer, message, reuse=False)
                    accepted += 1
            except Exception as exc:
                log.debug("dht: %s did not accept a %s: %r", peer, Message.MessageType.Name(message.type), exc)

        async with trio.open_nursery() as nursery:
            for peer in sort_peer_ids_by_distance(key, answered)[:BUCKET_SIZE]:
                nursery.start_soon(send, peer)
        return accepted

    async def _ask(self, peer: ID, kind: int, key: bytes) -> Message:
        request = Message()
        request.type = kind
        request.key = key
        return await self._rpc(peer, request, reuse=True)

    async def _rpc(self, peer: ID, request: Message, *, reuse: bool) -> Message:
        """One request and its answer, with the library's messages and checks; raises on a missing
        answer, or one of another type or for another key.

        Lookups (`reuse`) leave out the signed peer records KadDHT's helpers exchange (this node's
        addresses, certified): members know each other's addresses from identify, and checking a
        signature on both sides of every request is a good part of its cost. Puts and
        announcements carry and check them, as the library does."""
        if not reuse:
            request.senderRecord, _ = env_to_send_in_RPC(self.host)
        data = await self._requests.request(peer, encode_varint_prefixed(request.SerializeToString()), reuse=reuse)
        answer = Message()
        answer.ParseFromString(data)
        if answer.type != request.type or answer.key != request.key:  # KadDHT echoes both in every answer
            raise ValueError(f"answer of type {answer.type} to a request of type {request.type}, or for another key")
        if not reuse and not maybe_consume_signed_record(answer, self.host, peer):
            raise ValueError("answer with a signed peer record that does not verify")
        return answer

    def _learn_peers(self, entries: Any) -> list[ID]:
        """The members named in an answer (closer peers, providers), their addresses kept so that
        they can be dialed; this node and non-members left out."""
        peers: list[ID] = []
        for entry in entries:
            try:
                peer = ID(entry.id)
            except Exception:
                continue
            if peer == self._me or not self.is_member(str(peer)):
                continue
            peers.append(peer)
            if self._addrs(peer):
                continue  # known (connected, or named before): parsing addresses is not free
            addrs = []
            for raw in entry.addrs:
                try:
                    addrs.append(multiaddr.Multiaddr(raw))
                except Exception:
                    continue
            if addrs:
                self.host.get_peerstore().add_addrs(peer, addrs, PEER_ADDR_TTL)
        return peers

    # -- serving members -----------------------------------------------------------------------

    async def _serve(self, stream: Any) -> None:
        """KadDHT's handler, for members, INBOUND_STREAMS_PER_PEER streams each, INBOUND_STREAM_LIFETIME
        seconds each; any other stream is reset before KadDHT reads it."""
        peer = str(stream.muxed_conn.peer_id)
        if not self.is_member(peer):
            self._refuse("non_member")
            await stream.reset()
            return
        if self._inbound.get(peer, 0) >= INBOUND_STREAMS_PER_PEER:
            self._refuse("over_limit")
            await stream.reset()
            return
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        try:
            with trio.move_on_after(INBOUND_STREAM_LIFETIME) as scope:
                await self.kad.handle_stream(_ServedStream(stream))
            if scope.cancelled_caught:
                await stream.reset()
        finally:
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]

    def _members_only_routing_table(self) -> None:
        """The routing table takes members only. KadDHT adds every peer that opens a DHT stream and
        every peer its maintenance walk hears of (with under 5 in the table, it asks connected and
        known peers); the table is where walks start and what answers name as closer peers."""
        table = self.kad.routing_table
        add_peer = table.add_peer

        async def add_member_peer(peer: PeerInfo | ID, *, skip_server_mode_check: bool = False) -> bool:
            peer_id = peer.peer_id if isinstance(peer, PeerInfo) else peer
            if not self.is_member(str(peer_id)):
                return False
            return bool(await add_peer(peer, skip_server_mode_check=skip_server_mode_check))

        table.add_peer = add_member_peer

    def _failed(self, peer: ID) -> None:
        """A member that failed FAILURES_TO_DROP requests in a row (no DHT there: its cluster cache is
        off; or gone) leaves the routing table, so lookups stop asking it; its advert brings it back."""
        self._failures[peer] = self._failures.get(peer, 0) + 1
        if self._failures[peer] >= FAILURES_TO_DROP:
            del self._failures[peer]
            self.kad.routing_table.remove_peer(peer)
            self.dropped += 1

    def _refuse(self, reason: str) -> None:
        assert reason in REFUSAL_REASONS, reason
        self._refused[reason] = self._refused.get(reason, 0) + 1

    def _refused_invalid(self) -> None:
        self._refuse("invalid")

    # -- statistics ----------------------------------------------------------------------------

    def statistics(self) -> DHTStatistics:
        prefix = f"/{CACHE_NAMESPACE}/".encode()
        return DHTStatistics(
            records=sum(1 for key in list(self.kad.value_store.store) if key.startswith(prefix)),
            routing_peers=self.kad.routing_table.size(),
            gets=self.gets, hits=self.hits, local_hits=self.local_hits, asks=self.asks,
            streams_opened=self._requests.opened, serving=sum(self._inbound.values()),
            puts=self.puts, provides=self.provides,
            refused=sum(self._refused.values()), refused_by_reason=dict(self._refused), dropped=self.dropped,
        )
