"""Talking to a running daemon from the same host: the control protocol, as the data dir's client key.

The CLI's `status`, `stop`, `info`, `cache ...` and `generate --data-dir` use this: read
DATA_DIR/daemon.json (no live pid: no daemon), start a libp2p host that listens nowhere, with
the identity in DATA_DIR/client.key (and the cluster key the daemon uses, if any), dial the
daemon's loopback address and open `/accelmesh/control/1.0.0`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import trio

from node.datadir import DaemonInfo, DataDir
from node.errors import DaemonError
from node.mesh.host import HostConfig, load_swarm_key, make_host, peer_info, run_host
from node.mesh.service import request_inference
from node.mesh.streams import FramedStream, StreamClosedEarly, StreamLimits
from protocols.codec import decode, encode
from protocols.control import messages as control
from protocols.framing import encode_frame
from protocols.inference.machine import InferenceStream, Role
from protocols.inference.messages import Request, Result

__all__ = ["DaemonClient", "CONNECT_TIMEOUT"]

CONNECT_TIMEOUT = 10.0  # seconds to reach a local daemon
_LIMITS = StreamLimits(max_frame_size=control.MAX_FRAME_SIZE, idle_timeout=60.0)


class DaemonClient:
    def __init__(self, host: Any, daemon: DaemonInfo) -> None:
        self.host = host
        self.daemon = daemon

    @classmethod
    @asynccontextmanager
    async def connect(cls, data_dir: DataDir) -> AsyncIterator[DaemonClient]:
        daemon = data_dir.require_daemon()
        identity = data_dir.client_identity(create=False)
        cluster_key = load_swarm_key(daemon.cluster_key_file) if daemon.cluster_key_file else None
        host = make_host(HostConfig(identity=identity, listen=(), cluster_key=cluster_key, max_connections=8))
        async with run_host(host, []):
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    await host.connect(peer_info(daemon.loopback_addr))
            except (trio.TooSlowError, OSError) as exc:
                raise DaemonError(f"cannot reach the daemon at {daemon.loopback_addr}: {exc}") from None
            except Exception as exc:  # libp2p's dial errors
                raise DaemonError(f"cannot reach the daemon at {daemon.loopback_addr}: "
                                  f"{type(exc).__name__}: {exc}") from None
            yield cls(host, daemon)

    async def _stream(self) -> FramedStream:
        from libp2p.peer.id import ID

        try:
            stream = await self.host.new_stream(ID.from_base58(self.daemon.peer_id), [control.PROTOCOL_ID])
        except Exception as exc:  # libp2p: negotiation refused, connection gone
            raise DaemonError(f"the daemon refused the control protocol: {type(exc).__name__}: {exc}") from None
        return FramedStream(stream, _LIMITS)

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

    async def generate(self, request: Request) -> AsyncIterator[str | Result]:
        """Run an inference request on the daemon: text chunks, then the verified Result."""
        framed = await self._stream()
        framed.decoder = InferenceStream(Role.CLIENT, control.MAX_FRAME_SIZE)
        try:
            async with aclosing(request_inference(framed, request)) as items:
                async for item in items:
                    yield item
        except StreamClosedEarly as exc:
            raise DaemonError(f"the daemon closed the stream: {exc}") from None
        finally:
            await framed.close()
