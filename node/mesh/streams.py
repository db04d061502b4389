"""Our side of every inbound stream: who may open it, how many at once, how fast, and how frames arrive.

py-libp2p's resource manager does not apply per-peer or per-protocol stream limits (notes
13.3), so every handler we register goes through `StreamGuard.wrap`, which checks, in order:

1. the peer may use this protocol at all (cluster member; the control protocol: the local
   client key only);
2. open streams per peer, and per peer per protocol;
3. the peer's request rate (a token bucket per peer; identify and ping are libp2p's own
   handlers and never pass through here, so they are exempt). Checked last, so a stream
   refused for one of the reasons above does not use up a token.

Members (the local client key, and peers admitted by the cluster key or the allowlist; see
`node.mesh.host.membership`) are trusted callers, not strangers: on a protocol whose work is
admitted (`wrap(..., admitted=True)`: inference and control) one member may open
`member_streams` streams (2 x (max_concurrent + max_queue) on a daemon), so that every one of its
requests reaches admission, which runs it, queues it or answers `busy` (those streams are not
counted against its per-peer limit, which still bounds everything else it opens); and no
request rate applies to them. Strangers on an open node keep the limits above.

Over a limit the stream is reset with a typed reason (`Refusal`), logged, and counted; other
peers are not affected. `FramedStream` then reads frames under two clocks: a frame must
complete within `frame_timeout` of its first byte (a peer trickling a byte every few seconds
is cut off), and a stream with no frame in progress may stay silent only `idle_timeout`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from protocols.errors import ProtocolError
from protocols.framing import NEED_DATA, FrameDecoder

__all__ = [
    "Traffic",
    "StreamLimits",
    "Refusal",
    "REFUSAL_REASONS",
    "StreamGuard",
    "GuardStatistics",
    "FramedStream",
    "StreamTimeout",
    "TokenBucket",
    "StreamClosedEarly",
]

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024

REFUSAL_REASONS = (
    "not_allowed",  # the peer may not use this protocol
    "rate_limited",  # over the per-peer request rate
    "too_many_streams_peer",  # over the per-peer stream limit
    "too_many_streams_protocol",  # over the per-peer, per-protocol stream limit
    "frame_timeout",  # a frame did not complete within frame_timeout of its first byte
    "idle_timeout",  # no frame started within idle_timeout
    "protocol_error",  # the peer sent something the protocol forbids (malformed, oversize, ...)
    "shutting_down",  # the node is draining
    "internal",  # a bug in our handler: logged with its traceback; only this stream is lost
)


@dataclass(frozen=True)
class StreamLimits:
    max_frame_size: int = 8 * 1024 * 1024
    frame_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_streams_per_peer: int = 128
    max_streams_per_protocol: int = 64
    request_rate: float = 50.0  # streams per second per peer, sustained
    request_burst: int = 100  # streams a peer may open at once before the rate applies
    member_streams: int = 0  # streams a member may have open on one admitted protocol (0: as a stranger)

    def protocol_cap(self, member: bool, admitted: bool) -> int:
        """Streams one peer may have open on one protocol."""
        if member and admitted:
            return max(self.max_streams_per_protocol, self.member_streams)
        return self.max_streams_per_protocol



@dataclass(frozen=True)
class GuardStatistics:
    peers: int  # peers with open streams or a rate bucket
    open_streams: int  # inbound streams open now, all peers and protocols
    served: int  # streams whose handler finished normally
    refused: Mapping[str, int]  # streams reset on purpose, by reason (only reasons that happened)

    def to_json(self) -> dict[str, Any]:
        return {"peers": self.peers, "open_streams": self.open_streams, "served": self.served,
                "refused": dict(self.refused)}


class Refusal(Exception):
    """A stream we reset on purpose, and why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REFUSAL_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class StreamTimeout(Refusal):
    pass


class StreamClosedEarly(Exception):
    """The peer closed or reset the stream (not an error of ours, not worth a warning)."""


class TokenBucket:
    """`rate` tokens per second up to `burst`; `take(now)` spends one if there is one."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, float(burst), now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class _Stream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def reset(self) -> None: ...
    async def close(self) -> None: ...


@dataclass
class _PeerState:
    streams: int = 0
    by_protocol: dict[str, int] = field(default_factory=dict)
    bucket: TokenBucket | None = None


class StreamGuard:
    """Admission control and accounting for inbound streams, shared by every handler of a node."""

    def __init__(self, limits: StreamLimits, clock: Callable[[], float] = trio.current_time,
                 is_member: Callable[[str], bool] = lambda peer: False, traffic: Traffic | None = None) -> None:
        self.limits = limits
        self.traffic = traffic
        self._clock = clock
        self.is_member = is_member
        self._peers: dict[str, _PeerState] = {}
        self.refused: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self.served = 0
        self.closing = False

    def admit(self, peer: str, protocol: str, *, admitted: bool = False) -> bool:
        """Count a new stream in, or raise `Refusal`. `admitted`: the protocol's work goes through
        admission, so a member may open up to `member_streams` of them, outside its per-peer count.
        Returns whether the stream counts toward the per-peer limit (pass it back to `release`)."""
        if self.closing:
            raise Refusal("shutting_down")
        member = self.is_member(peer)
        counted = not (member and admitted)
        state = self._peers.setdefault(peer, _PeerState())
        if counted and state.streams >= self.limits.max_streams_per_peer:
            raise Refusal("too_many_streams_peer", f"{state.streams} open, limit {self.limits.max_streams_per_peer}")
        open_here = state.by_protocol.get(protocol, 0)
        protocol_cap = self.limits.protocol_cap(member, admitted)
        if open_here >= protocol_cap:
            raise Refusal("too_many_streams_protocol", f"{open_here} open on {protocol}, limit {protocol_cap}")
        if not member:  # last: a stream refused above costs no token
            if state.bucket is None:
                state.bucket = TokenBucket(self.limits.request_rate, self.limits.request_burst, self._clock())
            if not state.bucket.take(self._clock()):
                raise Refusal("rate_limited", f"over {self.limits.request_rate:g} streams/s")
        state.streams += counted
        state.by_protocol[protocol] = open_here + 1
        return counted

    def take_token(self, peer: str) -> bool:
        """Charge one request to `peer`'s rate (for the next request on a keep-alive stream);
        members are not rate limited."""
        state = self._peers.get(peer)
        if state is None or state.bucket is None or self.is_member(peer):
            return True
        if state.bucket.take(self._clock()):
            return True
        self.refused["rate_limited"] += 1
        return False

    def release(self, peer: str, protocol: str, counted: bool = True) -> None:
        state = self._peers.get(peer)
        if state is None:
            return
        state.streams -= counted
        state.by_protocol[protocol] -= 1
        if not state.by_protocol[protocol]:
            del state.by_protocol[protocol]

    def open_streams(self, peer: str, protocol: str | None = None) -> int:
        state = self._peers.get(peer)
        if state is None:
            return 0
        return sum(state.by_protocol.values()) if protocol is None else state.by_protocol.get(protocol, 0)

    def forget_idle_peers(self) -> None:
        """Drop accounting of peers with no open stream and a full bucket (bounded memory)."""
        now = self._clock()
        for peer in [p for p, s in self._peers.items() if not s.streams and not s.by_protocol]:
            bucket = self._peers[peer].bucket
            if bucket is None or bucket.tokens + (now - bucket.stamp) * bucket.rate >= bucket.burst:
                del self._peers[peer]

    def wrap(
        self,
        protocol: str,
        handler: Callable[[FramedStream, str], Awaitable[None]],
        *,
        allowed: Callable[[str], bool] | None = None,
        max_frame_size: int | None = None,
        admitted: bool = False,
    ) -> Callable[[Any], Awaitable[None]]:
        """A libp2p stream handler that applies the guard, then calls `handler(framed, peer_id)`.
        `admitted`: the handler's work goes through admission (members get `member_streams`)."""

        async def guarded(stream: Any) -> None:
            peer = str(stream.muxed_conn.peer_id)
            try:
                if allowed is not None and not allowed(peer):
                    raise Refusal("not_allowed", f"{protocol} is not open to this peer")
                counted = self.admit(peer, protocol, admitted=admitted)
            except Refusal as refusal:
                self._refuse(stream, peer, protocol, refusal)
                await _reset(stream)
                return
            framed = FramedStream(stream, self.limits, max_frame_size, traffic=self.traffic)
            try:
                await handler(framed, peer)
                self.served += 1
            except Refusal as refusal:
                self._refuse(stream, peer, protocol, refusal)
                await _reset(stream)
            except ProtocolError as exc:
                self._refuse(stream, peer, protocol, Refusal("protocol_error", str(exc)))
                await _reset(stream)
            except StreamClosedEarly:
                await _reset(stream)
            except Exception as exc:  # incl. exception groups: py-libp2p would let it take the connection down
                self.refused["internal"] += 1
                log.error("reset %s stream from %s: handler failed: %s", protocol, peer, exc, exc_info=exc,
                          extra={"peer": peer, "protocol": protocol, "reason": "internal"})
                await _reset(stream)
            finally:
                self.release(peer, protocol, counted)
                await _close(stream)

        return guarded

    def _refuse(self, stream: Any, peer: str, protocol: str, refusal: Refusal) -> None:
        self.refused[refusal.reason] += 1
        log.warning("reset %s stream from %s: %s", protocol, peer, refusal,
                    extra={"peer": peer, "protocol": protocol, "reason": refusal.reason})

    def statistics(self) -> GuardStatistics:
        return GuardStatistics(
            peers=len(self._peers),
            open_streams=sum(sum(s.by_protocol.values()) for s in self._peers.values()),
            served=self.served,
            refused={k: v for k, v in self.refused.items() if v},
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<StreamGuard peers={s.peers} open={s.open_streams} refused={dict(s.refused)}>"


async def _reset(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception:  # the stream may already be gone; nothing else to do
            pass


async def _close(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.close()
        except Exception:  # already reset or closed by the peer
            pass


class Traffic:
    """Bytes read and written on framed streams, by protocol id and direction (`in`, `out`): a
    daemon's `accelmesh_stream_bytes_total`. Shared by its stream guard (inbound streams) and its
    stream pool (outbound inference); the HTTP API adds its own under `http`."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def add(self, protocol: str, direction: str, size: int) -> None:
        key = (protocol, direction)
        self.counts[key] = self.counts.get(key, 0) + size

    def snapshot(self) -> dict[tuple[str, str], int]:
        return dict(self.counts)


class FramedStream:
    """Frames over a libp2p stream, read under the frame and idle timeouts; bytes counted in `traffic`."""

    def __init__(self, stream: Any, limits: StreamLimits, max_frame_size: int | None = None,
                 decoder: Any = None, traffic: Traffic | None = None) -> None:
        self.stream = stream
        self.limits = limits
        self.decoder = decoder if decoder is not None else FrameDecoder(
            min(max_frame_size or limits.max_frame_size, limits.max_frame_size))
        self._frame_started: float | None = None
        self.traffic = traffic
        self.protocol = str(stream.get_protocol()) if traffic is not None else ""

    @property
    def peer(self) -> str:
        return str(self.stream.muxed_conn.peer_id)

    async def read_frame(self, *, idle: bool = True) -> bytes | None:
        """The next frame, or None when the peer closed the stream between frames.

        `idle=False` lifts the idle timeout (the peer may rightly stay silent, e.g. while we
        generate); the frame timeout always applies once a frame has started.
        """
        return await self._next(self.decoder.next_frame, idle)

    async def read_event(self, *, idle: bool = True) -> Any:
        """For a decoder with `next_event()` (a protocol state machine): the next event, or None at EOF."""
        return await self._next(self.decoder.next_event, idle)

    async def _next(self, pop: Callable[[], Any], idle: bool) -> Any:
        while True:
            item = pop()
            if item is not NEED_DATA:
                self._frame_started = trio.current_time() if self.decoder.in_frame else None
                return item
            now = trio.current_time()
            if self.decoder.in_frame:
                if self._frame_started is None:
                    self._frame_started = now
                deadline, reason = self._frame_started + self.limits.frame_timeout, "frame_timeout"
            else:
                deadline = now + self.limits.idle_timeout if idle else math.inf
                reason = "idle_timeout"
            data = b""
            with trio.move_on_at(deadline) as scope:
                try:
                    data = await self.stream.read(READ_SIZE)
                except Exception as exc:  # libp2p: StreamEOF, StreamReset, StreamError, ...
                    if type(exc).__name__ == "StreamEOF":
                        data = b""
                    else:
                        raise StreamClosedEarly(f"{type(exc).__name__}: {exc}") from exc
            if scope.cancelled_caught:
                raise StreamTimeout(reason, f"after {trio.current_time() - (self._frame_started or now):.1f} s")
            if not data:
                if self.decoder.in_frame:
                    raise StreamClosedEarly("the peer closed the stream in the middle of a frame")
                return None
            if not self.decoder.in_frame:
                self._frame_started = trio.current_time()
            if self.traffic is not None:
                self.traffic.add(self.protocol, "in", len(data))
            self.decoder.receive_data(data)

    async def write(self, data: bytes) -> None:
        if self.traffic is not None:
            self.traffic.add(self.protocol, "out", len(data))
        try:
            await self.stream.write(data)
        except Exception as exc:  # libp2p: StreamReset, StreamClosed, StreamError, ...
            raise StreamClosedEarly(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await _close(self.stream)

    async def reset(self) -> None:
        await _reset(self.stream)
