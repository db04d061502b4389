"""Talking to a running daemon: from the same host (control protocol) or from anywhere (client peer).

`DaemonClient`: the CLI's `status`, `stop`, `info`, `peers`, `cache ...` and `generate --data-dir`.
It reads DATA_DIR/daemon.json (no live pid: no daemon), starts a libp2p host that listens
nowhere, with the identity in DATA_DIR/client.key (and the cluster key the daemon uses, if
any), dials the daemon's loopback address and opens `/accelmesh/control/1.0.0`.

`PeerClient`: `generate --peer MULTIADDR`, `node.connect(peer=...)`. A client peer with its own
identity (ephemeral unless given) that dials any daemon it can reach (it needs the cluster key,
or an identity on the allowlist) and submits on `/accelmesh/infer/1.0.0`. Client peers never
advertise, so no node lists them as peers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import trio

from node.datadir import DaemonInfo, DataDir
from node.errors import DaemonError
from node.mesh.host import HostConfig, load_swarm_key, make_host, peer_info, run_host
from node.mesh.pool import StreamPool
from node.mesh.requesting import request_inference
from node.mesh.streams import FramedStream, StreamClosedEarly, StreamLimits
from protocols.codec import decode, encode
from protocols.control import messages as control
from protocols.framing import encode_frame
from protocols.inference.machine import InferenceStream, Role
from protocols.inference.messages import PROTOCOL_ID as INFER_PROTOCOL
from protocols.inference.messages import Request, Result
from protocols.records import Identity

__all__ = ["DaemonClient", "PeerClient", "connected_host", "CONNECT_TIMEOUT"]

CONNECT_TIMEOUT = 10.0  # seconds to reach a local daemon
_LIMITS = StreamLimits(max_frame_size=control.MAX_FRAME_SIZE, idle_timeout=60.0)


@asynccontextmanager
async def connected_host(addr: str, identity: Identity, cluster_key: str | None) -> AsyncIterator[Any]:
    """A libp2p host that listens nowhere, connected to the daemon at `addr` (a full multiaddr)."""
    host = make_host(HostConfig(identity=identity, listen=(), cluster_key=cluster_key, max_connections=8))
    async with run_host(host, []):
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await host.connect(peer_info(addr))
        except (trio.TooSlowError, OSError) as exc:
            raise DaemonError(f"cannot reach the daemon at {addr}: {exc}") from None
        except Exception as exc:  # libp2p's dial errors
            raise DaemonError(f"cannot reach the daemon at {addr}: {type(exc).__name__}: {exc} (a cluster key "
                              "or an allowlisted identity may be needed)") from None
        yield host


class _Session:
    """One connection to one daemon, and how to open streams to it."""

    protocol = control.PROTOCOL_ID

    def __init__(self, host: Any, peer_id: str) -> None:
        self.host, self.peer_id = host, peer_id

    async def _stream(self, protocol: str | None = None) -> FramedStream:
        from libp2p.peer.id import ID

        protocol = protocol or self.protocol
        try:
            stream = await self.host.new_stream(ID.from_base58(self.peer_id), [protocol])
        except Exception as exc:  # libp2p: negotiation refused, connection gone
            raise DaemonError(f"the daemon refused {protocol}: {type(exc).__name__}: {exc}") from None
        return FramedStream(stream, _LIMITS)

    async def generate(self, request: Request) -> AsyncIterator[str | Result]:
        """Run an inference request on the daemon: text chunks, then the verified Result."""
        framed = await self._stream()
        framed.decoder = InferenceStream(Role.CLIENT, control.MAX_FRAME_SIZE)
        finished = False
        try:
            async with aclosing(request_inference(framed, request)) as items:
                async for item in items:
                    finished = finished or isinstance(item, Result)
                    yield item
        except StreamClosedEarly as exc:
            raise DaemonError(f"the daemon closed the stream: {exc}") from None
        finally:
            if finished:
                await framed.close()
            else:
                await framed.reset()  # the daemon cancels the request


class PeerClient(_Session):
    """A client peer with its own identity, talking `/accelmesh/infer/1.0.0` to any daemon it can reach.

    Its streams are kept alive between requests (`StreamPool`): a request on an open stream costs
    no protocol negotiation.
    """

    protocol = INFER_PROTOCOL

    def __init__(self, host: Any, peer_id: str) -> None:
        super().__init__(host, peer_id)
        self.pool = StreamPool(host, _LIMITS, protocol=INFER_PROTOCOL)

    async def generate(self, request: Request) -> AsyncIterator[str | Result]:
        async with aclosing(self.pool.request(self.peer_id, request)) as items:
            async for item in items:
                yield item

    @classmethod
    @asynccontextmanager
    async def connect(cls, addr: str, *, identity: Identity | None = None,
                      cluster_key: str | None = None) -> AsyncIterator[PeerClient]:
        peer = peer_info(addr)
        async with connected_host(addr, identity or Identity.generate(), cluster_key) as host:
            client = cls(host, str(peer.peer_id))
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.pool.close()


class DaemonClient(_Session):
    """The local CLI's client: the data dir's client key, the control protocol."""

    def __init__(self, host: Any, daemon: DaemonInfo) -> None:
        super().__init__(host, daemon.peer_id)
        self.daemon = daemon

    @classmethod
    @asynccontextmanager
    async def connect(cls, data_dir: DataDir) -> AsyncIterator[DaemonClient]:
        daemon = data_dir.require_daemon()
        identity = data_dir.client_identity(create=False)
        cluster_key = load_swarm_key(daemon.cluster_key_file) if daemon.cluster_key_file else None
        async with connected_host(daemon.loopback_addr, identity, cluster_key) as host:
            yield cls(host, daemon)

    async def command(self, name: str, **args: Any) -> Any:
        """Run one control command and return its JSON result (DaemonError on failure)."""
        framed = await self._stream()
        try:
            await framed.write(encode_frame(encode(control.Command(command=name, args=args)), control.MAX_FRAME_SIZE))
            frame = await framed.read_frame(idle=True)
        except StreamClosedEarly as exc:
            raise DaemonError(f"the daemon closed the control stream: {exc}") from None
        finally:
            await framed.close()
        if frame is None:
            raise DaemonError("the daemon closed the control stream without a reply")
        reply = decode(frame, control.Reply, control.LIMITS)
        assert isinstance(reply, control.Reply)
        if not reply.ok:
            raise DaemonError(reply.error.message if reply.error else "the daemon refused the command")
        return reply.result

