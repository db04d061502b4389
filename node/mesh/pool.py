"""Keep-alive inference streams to other nodes, per peer (`[mesh] pool_*` settings bound them)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import trio

from node.config import MeshSettings
from node.errors import ProviderFailed
from node.mesh.errors import PeerUnreachable
from node.mesh.requesting import request_inference
from node.mesh.streams import FramedStream, StreamClosedEarly
from protocols.errors import ProtocolError
from protocols.inference.machine import MAX_FRAME_SIZE as MAX_INFER_FRAME
from protocols.inference.machine import InferenceStream, Role
from protocols.inference.messages import PROTOCOL_ID as INFER_PROTOCOL
from protocols.inference.messages import Request, Result

__all__ = ["StreamPool", "PoolStatistics"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolStatistics:
    opened: int  # streams opened
    reused: int  # requests sent on a stream kept from an earlier one
    idle: int  # streams kept open now, waiting for a request


class StreamPool:
    """Keep-alive inference streams per peer: a request on an open stream costs no negotiation.

    At most `max_idle_per_peer` idle streams are kept per peer (0: none, every request opens
    a stream), each for `max_idle_seconds` (keep it below the servers' `limits.idle_timeout`);
    the daemon passes ``[mesh] pool_max_idle_per_peer`` and ``pool_max_idle_seconds``.

    `request(peer_id, request)` takes an idle stream to that peer (or opens one), runs the
    request, and gives the stream back when its answer ended cleanly; a stream whose answer
    did not end (cancelled, failed) is reset. An idle stream the server has meanwhile closed is
    noticed at once (no answer at all) and the request is retried once on a fresh stream.
    """

    def __init__(self, host: Any, limits: Any, *, protocol: str = INFER_PROTOCOL,
                 max_idle_per_peer: int = MeshSettings.pool_max_idle_per_peer,
                 max_idle_seconds: float = MeshSettings.pool_max_idle_seconds, traffic: Any = None) -> None:
        if max_idle_per_peer < 0 or max_idle_seconds <= 0:
            raise ValueError("max_idle_per_peer must be >= 0 and max_idle_seconds > 0")
        self.host, self.limits, self.protocol = host, limits, protocol
        self.traffic = traffic  # node.mesh.streams.Traffic: bytes counted by protocol
        self.max_idle_per_peer, self.max_idle_seconds = max_idle_per_peer, max_idle_seconds
        self._idle: dict[str, list[tuple[float, FramedStream]]] = {}
        self.opened = self.reused = 0

    async def _open(self, peer_id: str) -> FramedStream:
        from libp2p.peer.id import ID

        try:
            stream = await self.host.new_stream(ID.from_base58(peer_id), [self.protocol])
        except Exception as exc:  # libp2p: no connection, protocol refused, stream reset
            raise PeerUnreachable(f"peer {peer_id[-8:]}", f"cannot open a stream: {type(exc).__name__}: {exc}",
                                  retryable=True) from exc
        self.opened += 1
        return FramedStream(stream, self.limits, MAX_INFER_FRAME, decoder=InferenceStream(Role.CLIENT, MAX_INFER_FRAME),
                            traffic=self.traffic)

    async def _take_idle(self, peer_id: str) -> FramedStream | None:
        idle = self._idle.get(peer_id, [])
        now = trio.current_time()
        while idle:
            since, framed = idle.pop()
            if now - since < self.max_idle_seconds:
                self.reused += 1
                return framed
            await framed.close()  # idle too long: the server's idle timeout may be about to end it
        return None

    async def _give_back(self, peer_id: str, framed: FramedStream) -> None:
        idle = self._idle.setdefault(peer_id, [])
        if len(idle) < self.max_idle_per_peer:
            idle.append((trio.current_time(), framed))
        else:
            await framed.close()

    async def request(self, peer_id: str, request: Request) -> AsyncIterator[str | Result]:
        for attempt in range(2):
            framed = await self._take_idle(peer_id)
            reused = framed is not None
            framed = framed or await self._open(peer_id)
            machine = framed.decoder
            yielded = False
            try:
                async with aclosing(request_inference(framed, request)) as items:
                    async for item in items:
                        yielded = True
                        yield item
            except (ProviderFailed, StreamClosedEarly) as exc:  # the stream broke, not the request
                await framed.reset()
                if reused and not yielded and attempt == 0:
                    log.debug("idle stream to %s was gone (%s); retrying on a new one", peer_id, exc)
                    continue
                if isinstance(exc, StreamClosedEarly):  # reset by the peer: its limits, or it is stopping
                    raise ProviderFailed(f"peer {peer_id[-8:]}", f"the peer reset the stream: {exc}",
                                         retryable=True) from exc
                raise
            except ProtocolError as exc:  # the peer broke the protocol, or sent bytes that fail their CID
                await framed.reset()
                raise ProviderFailed(f"peer {peer_id[-8:]}", f"{type(exc).__name__}: {exc}", retryable=True) from exc
            except BaseException:
                if machine.state.value == "done":  # the server answered with an Error: the stream is fine
                    await self._give_back(peer_id, framed)
                else:
                    await framed.reset()  # cancelled or failed mid-answer: the server stops
                raise
            if machine.state.value == "done":
                await self._give_back(peer_id, framed)
            else:
                await framed.reset()
            return

    async def close(self) -> None:
        for idle in self._idle.values():
            for _, framed in idle:
                await framed.close()
        self._idle.clear()

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(self.opened, self.reused, sum(len(v) for v in self._idle.values()))

    def __repr__(self) -> str:
        s = self.statistics()
        return (f"<StreamPool opened={s.opened} reused={s.reused} idle={s.idle} "
                f"(at most {self.max_idle_per_peer} per peer for {self.max_idle_seconds:g} s)>")
