"""Cached blocks between nodes: both sides of `/accelmesh/cache/1.0.0` on libp2p streams.

One Get, one answer, per stream (protocols/cache/SPEC.md "Exchange"). The holder side,
`serve_blocks`, is a handler for `StreamGuard.wrap`: it reads one Get, looks the block up in the
local store (sqlite, so in a worker thread) and answers Found or NotFound; a malformed Get is a
`ProtocolError`, on which the guard resets that stream alone. The requester side, `fetch_block`,
opens a stream, asks, and hashes what comes back before anyone may use it (`check_found`).

Whose fault, as the caller sees it (every failure but the first is retryable: ask the next holder):

    InvalidRequest      the CID is not one we may ask for (unparseable, a weak hash); nothing is sent
    PeerUnreachable     no stream could be opened (no connection, dial failed, protocol refused)
    ProviderFailed      the holder broke the protocol or lied: the message names the error
                        (`CIDMismatch`: bytes that do not hash to the CID; `MalformedMessage`: an
                        answer for another CID, or undecodable), or it reset the stream unanswered
    ProviderTimeout     no verified answer within `timeout` (opening the stream included): a slow
                        holder is not a missing block, so this is an error and not None

`BlockExchange` puts both sides on one node with one set of counters (`statistics()`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import trio

from node.errors import InvalidRequest, ProviderError, ProviderFailed, ProviderTimeout
from node.mesh.errors import PeerUnreachable
from node.mesh.streams import FramedStream, StreamClosedEarly, StreamLimits, StreamTimeout
from protocols.cache.messages import MAX_BLOCK_BYTES, MAX_FRAME_SIZE, PROTOCOL_ID, Found, Get, NotFound, check_found
from protocols.cid import parse
from protocols.codec import decode, encode
from protocols.errors import ProtocolError
from protocols.framing import FrameDecoder, encode_frame

__all__ = [
    "PROTOCOL_ID",
    "MAX_GET_FRAME_SIZE",
    "FETCH_TIMEOUT",
    "BlockExchange",
    "ExchangeCounters",
    "ExchangeStatistics",
    "serve_blocks",
    "fetch_block",
]

log = logging.getLogger(__name__)

# A Get is about 80 bytes (a CID of at most 128 characters and the envelope); the margin leaves
# room for fields a newer minor version may add. A holder buffers no more than this per stream.
MAX_GET_FRAME_SIZE = 4 * 1024
# Seconds one fetch from one peer may take, opening the stream included, by default: a block is at
# most 4 MiB, well under a second on loopback (node.cache.cluster also bounds each call by its own).
FETCH_TIMEOUT = 2.0

GetBlock = Callable[[str], "bytes | None"]  # LocalStore.get_block: sync (sqlite), run in a thread


@dataclasses.dataclass(frozen=True)
class ExchangeStatistics:
    served: int  # holder: Found answers sent
    not_found: int  # holder: NotFound answers sent
    fetched: int  # requester: blocks received and verified
    fetch_not_found: int  # requester: NotFound answers received
    fetch_failures: int  # requester: fetches that raised (unreachable, lying, reset, timed out)
    bytes_in: int  # requester: block bytes received in Found answers (verified or not)
    bytes_out: int  # holder: block bytes sent in Found answers

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ExchangeCounters:
    """What `serve_blocks` and `fetch_block` count as they go; `snapshot()` freezes it."""

    served: int = 0
    not_found: int = 0
    fetched: int = 0
    fetch_not_found: int = 0
    fetch_failures: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def snapshot(self) -> ExchangeStatistics:
        return ExchangeStatistics(**dataclasses.asdict(self))


# -- the holder ------------------------------------------------------------------------------


async def serve_blocks(framed: FramedStream, peer: str, *, get_block: GetBlock,
                       counters: ExchangeCounters | None = None) -> None:
    """Answer one Get on `framed` from `get_block`, then close. For `StreamGuard.wrap`:
    a malformed Get raises `ProtocolError` (the guard resets this stream and counts it), a Get
    that does not come within the idle timeout `StreamTimeout`."""
    counters = counters if counters is not None else ExchangeCounters()
    framed.decoder = FrameDecoder(min(MAX_GET_FRAME_SIZE, framed.limits.max_frame_size))
    frame = await framed.read_frame()
    if frame is None:
        raise StreamClosedEarly("the peer closed the stream without a Get")
    get = decode(frame, Get)
    assert isinstance(get, Get)
    data = await trio.to_thread.run_sync(get_block, get.cid)
    if data is not None and len(data) > MAX_BLOCK_BYTES:  # not a response block: the peer must not get it
        log.warning("block %s is %d bytes, over %d: answered NotFound", get.cid, len(data), MAX_BLOCK_BYTES)
        data = None
    answer = NotFound(cid=get.cid) if data is None else Found(cid=get.cid, data=data)
    await framed.write(encode_frame(encode(answer), MAX_FRAME_SIZE))
    if data is None:
        counters.not_found += 1
    else:
        counters.served += 1
        counters.bytes_out += len(data)
    await framed.close()


# -- the requester ---------------------------------------------------------------------------


async def fetch_block(host: Any, peer_id: str, cid: str, *, limits: StreamLimits, timeout: float,
                      counters: ExchangeCounters | None = None) -> bytes | None:
    """The block `cid` from `peer_id`, verified against the CID, or None if the peer has none.

    Raises (see the module docstring) InvalidRequest, PeerUnreachable, ProviderFailed or
    ProviderTimeout; all but InvalidRequest are retryable.
    """
    counters = counters if counters is not None else ExchangeCounters()
    get = _get_for(cid)
    who = f"peer {peer_id[-8:]}"
    framed: FramedStream | None = None
    answered = False
    try:
        with trio.fail_after(timeout):
            framed = await _open(host, peer_id, limits)
            answer = await _ask(framed, get, who)
        answered = True
        if isinstance(answer, Found):
            counters.bytes_in += len(answer.data)
        data = check_found(get, answer)
    except ProviderError:
        counters.fetch_failures += 1
        raise
    except trio.TooSlowError as exc:
        counters.fetch_failures += 1
        raise ProviderTimeout(who, f"no answer for block {cid[-12:]} within {timeout:g} s", retryable=True) from exc
    except ProtocolError as exc:  # undecodable, another CID's answer, or bytes that do not hash to it
        counters.fetch_failures += 1
        raise ProviderFailed(who, f"{type(exc).__name__}: {exc}", retryable=True) from exc
    finally:
        if framed is not None:
            await (framed.close() if answered else framed.reset())  # unanswered: the holder stops
    if data is None:
        counters.fetch_not_found += 1
    else:
        counters.fetched += 1
    return data


def _get_for(cid: str) -> Get:
    """The Get for `cid`, refused before any I/O when the CID is not one the answer could be checked against."""
    try:
        parse(cid)
        encode(get := Get(cid=cid))
    except ProtocolError as exc:
        raise InvalidRequest(f"cannot fetch block {cid[:80]!r}: {exc}") from exc
    return get


async def _open(host: Any, peer_id: str, limits: StreamLimits) -> FramedStream:
    from libp2p.peer.id import ID

    try:
        stream = await host.new_stream(ID.from_base58(peer_id), [PROTOCOL_ID])
    except Exception as exc:  # libp2p: no connection, protocol refused, stream reset; a bad peer id
        raise PeerUnreachable(f"peer {peer_id[-8:]}", f"cannot open a stream: {type(exc).__name__}: {exc}",
                              retryable=True) from exc
    return FramedStream(stream, limits, MAX_FRAME_SIZE)


async def _ask(framed: FramedStream, get: Get, who: str) -> Found | NotFound:
    """Send `get`, read the one answer (decoded, not yet verified)."""
    try:
        await framed.write(encode_frame(encode(get), MAX_FRAME_SIZE))
        frame = await framed.read_frame(idle=False)  # the caller's timeout bounds the wait
    except StreamClosedEarly as exc:
        raise ProviderFailed(who, f"the peer reset the stream: {exc}", retryable=True) from exc
    except StreamTimeout as exc:  # a frame begun and not finished within the frame timeout
        raise ProviderTimeout(who, f"the answer stalled: {exc}", retryable=True) from exc
    if frame is None:  # how a reset before any answer usually reaches a reader in py-libp2p 0.8.1
        raise ProviderFailed(who, "the stream ended without an answer (the peer reset it: not allowed, over "
                             "one of its limits, or shutting down; its log says which)", retryable=True)
    answer = decode(frame, (Found, NotFound))
    assert isinstance(answer, (Found, NotFound))
    return answer


# -- both sides on one node ------------------------------------------------------------------


class BlockExchange:
    """A node's side of the exchange: `handler` serves its store, `fetch` asks other nodes.

        exchange = BlockExchange(host, limits, store.get_block)
        host.set_stream_handler(PROTOCOL_ID, guard.wrap(PROTOCOL_ID, exchange.handler))
        data = await exchange.fetch(peer_id, cid)  # a `(peer, cid)` fetch, as ClusterCache takes

    `fetch_timeout` bounds each fetch unless the call passes its own `timeout`.
    """

    def __init__(self, host: Any, limits: StreamLimits, get_block: GetBlock, *,
                 fetch_timeout: float = FETCH_TIMEOUT) -> None:
        if not fetch_timeout > 0:
            raise ValueError("fetch_timeout must be > 0 seconds")
        self.host, self.limits, self.get_block, self.fetch_timeout = host, limits, get_block, fetch_timeout
        self._counters = ExchangeCounters()

    async def handler(self, framed: FramedStream, peer: str) -> None:
        await serve_blocks(framed, peer, get_block=self.get_block, counters=self._counters)

    async def fetch(self, peer_id: str, cid: str, *, timeout: float | None = None) -> bytes | None:
        return await fetch_block(self.host, peer_id, cid, limits=self.limits,
                                 timeout=self.fetch_timeout if timeout is None else timeout, counters=self._counters)

    def statistics(self) -> ExchangeStatistics:
        return self._counters.snapshot()

    def __repr__(self) -> str:
        s = self.statistics()
        return (f"<BlockExchange served={s.served} not_found={s.not_found} fetched={s.fetched} "
                f"fetch_not_found={s.fetch_not_found} fetch_failures={s.fetch_failures} "
                f"in={s.bytes_in} B out={s.bytes_out} B>")
