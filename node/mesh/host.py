"""The libp2p host of a daemon (or of a client): Noise only, Yamux, and who may connect.

- Security: Noise only. py-libp2p also offers TLS, secio and plaintext by default and accepts
  a plaintext dialer (notes P2); `sec_opt` here leaves Noise alone.
- `max_connections_per_peer=1` removes the 250 ms Happy-Eyeballs wait on every dial (P1).
- Cluster membership: an optional pre-shared key (swarm.key format; a private network that
  only py-libp2p peers can join) and an optional peer-id allowlist, enforced after the Noise
  handshake by the resource manager's `open_connection` hook (notes 13.4). The local client
  key is always allowed. With a cluster key the upgrade timeouts are lowered, so a wrong key
  fails in seconds instead of 40.
- Limits: total connections through the resource manager (`ConnectionLimits`), stream
  negotiation through the connection config; per-peer and per-protocol streams, frames and
  request rates are enforced by `node.mesh.streams` (the library does not apply them).
- Shutdown: leaving `host.run()` does not close connections (notes 13.6): `run_host` calls
  `host.close()` while the host still runs (closed afterwards, a host that listens nowhere
  leaves its connections half open at the peer's end: measured here).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ConfigError
from protocols.records import Identity, is_peer_id

__all__ = [
    "HostConfig",
    "load_swarm_key",
    "make_swarm_key",
    "is_loopback_multiaddr",
    "make_host",
    "run_host",
    "libp2p_keypair",
    "peer_info",
]

log = logging.getLogger(__name__)

SWARM_KEY_HEADER = ("/key/swarm/psk/1.0.0/", "/base16/")
PSK_UPGRADE_TIMEOUT = 3.0  # seconds: with a wrong cluster key the handshake never completes


@dataclass(frozen=True)
class HostConfig:
    identity: Identity
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/4001",)
    bootstrap: tuple[str, ...] = ()
    cluster_key: str | None = None  # 64 hex characters, from a swarm.key file
    allow: frozenset[str] | None = None  # peer ids allowed to connect (None: everyone who passes the key)
    always_allowed: frozenset[str] = field(default_factory=frozenset)  # e.g. the local client key
    mdns: bool = False
    max_connections: int = 256
    negotiate_timeout: float = 10.0


def load_swarm_key(path: str | Path) -> str:
    """The 64-hex pre-shared key of a swarm.key file; ConfigError naming the file and the problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("cluster_key", str(path), f"cannot read the file: {exc.strerror}") from None
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) != 3 or tuple(lines[:2]) != SWARM_KEY_HEADER:
        raise ConfigError("cluster_key", str(path), "not a swarm.key file: expected the lines "
                          "'/key/swarm/psk/1.0.0/', '/base16/' and 64 hex characters")
    try:
        key = bytes.fromhex(lines[2])
    except ValueError:
        raise ConfigError("cluster_key", str(path), "the key line is not hexadecimal") from None
    if len(key) != 32:
        raise ConfigError("cluster_key", str(path), f"the key is {len(key)} bytes; it must be 32")
    return lines[2].lower()


def make_swarm_key() -> str:
    """A new random cluster key in the swarm.key format."""
    import secrets

    return f"{SWARM_KEY_HEADER[0]}\n{SWARM_KEY_HEADER[1]}\n{secrets.token_hex(32)}\n"


def is_loopback_multiaddr(addr: str) -> bool:
    """True for /ip4/127.x, /ip6/::1 (and /dns/localhost); False for 0.0.0.0, :: and everything else."""
    parts = addr.strip("/").split("/")
    if len(parts) < 2:
        return False
    proto, host = parts[0], parts[1]
    if proto in ("dns", "dns4", "dns6"):
        return host == "localhost"
    if proto not in ("ip4", "ip6"):
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback


def libp2p_keypair(identity: Identity) -> Any:
    from libp2p.crypto.ed25519 import create_new_key_pair

    return create_new_key_pair(identity.seed)


WRITE_TIMEOUT = 30.0  # seconds a peer may take to accept one muxer frame before its connection is dropped


def _atomic_muxer_writes() -> None:
    """Work around a py-libp2p 0.8.1 bug: a cancelled Yamux write can corrupt the whole connection.

    `Yamux._write_frame` encrypts a frame (advancing the Noise nonce) and then sends it; a trio
    cancellation in between (a deadline, a reset stream, a task that stops reading while yamux
    sends a window update from inside `read`) leaves the frame unsent or half sent, and the peer's
    next decryption fails ("Failed authentication of message"): every stream of that connection
    dies. Here each frame is written shielded from cancellation (the wait for the connection's
    write lock stays cancellable); a peer that does not take a frame within WRITE_TIMEOUT gets
    its connection closed, since it is unusable anyway. Replaces `Yamux._write_frame`, which
    only logs, takes `_write_lock` and writes.
    """
    import trio
    from libp2p.stream_muxer.yamux import yamux

    if getattr(yamux.Yamux, "_accelmesh_atomic_writes", False):
        return

    async def write_frame(self: Any, data: bytes) -> None:
        async with self._write_lock:  # waiting for our turn may be cancelled: nothing is half done yet
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + WRITE_TIMEOUT
                await self.secured_conn.write(data)
        if scope.cancelled_caught:
            log.warning("a peer took no frame for %g s: closing its connection", WRITE_TIMEOUT)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.secured_conn.close()  # first, so close() does not wait to send a GO_AWAY
                await self.close()
            raise trio.BrokenResourceError("muxer write timed out; connection closed")
        await trio.lowlevel.checkpoint()  # where cancellation may land: between frames, never inside one

    yamux.Yamux._write_frame = write_frame
    yamux.Yamux._accelmesh_atomic_writes = True


def make_host(config: HostConfig) -> Any:
    """A libp2p host for `config` (not yet listening: use `run_host`)."""
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport

    _atomic_muxer_writes()
    keypair = libp2p_keypair(config.identity)
    timeout = PSK_UPGRADE_TIMEOUT if config.cluster_key else 10.0
    connection_config = ConnectionConfig(
        max_connections_per_peer=1,
        max_connections=config.max_connections,
        high_watermark=config.max_connections,
        low_watermark=0,
        min_connections=0,
        inbound_upgrade_timeout=timeout,
        outbound_upgrade_timeout=timeout,
        inbound_stream_protocol_negotiation_timeout=config.negotiate_timeout,
        outbound_stream_protocol_negotiation_timeout=config.negotiate_timeout,
    )
    allowed = None if config.allow is None else frozenset(config.allow | config.always_allowed)
    for peer in allowed or ():
        if not is_peer_id(peer):
            raise ConfigError("allow", peer, "not an Ed25519 peer id (12D3KooW...)")
    host = new_host(
        key_pair=keypair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(keypair, noise_privkey=create_x25519().private_key)},
        muxer_preference="YAMUX",
        connection_config=connection_config,
        resource_manager=_gate(allowed, config.max_connections),
        psk=config.cluster_key,
        enable_mDNS=config.mdns,
        bootstrap=list(config.bootstrap) or None,
        negotiate_timeout=int(config.negotiate_timeout),
    )
    _unleak_inbound_slots(host)
    _no_auto_dialing(host)
    return host


def _no_auto_dialing(host: Any) -> None:
    """Switch off py-libp2p's auto-connector: the daemon decides whom to dial (bootstrap, mDNS).

    It dials peers from the peerstore until there are (low + high watermark) / 2 connections,
    whatever the watermarks: 128 dials for our default of 256 connections, to any peer the
    node ever heard of.
    """

    async def never() -> None:
        return None

    connector = getattr(host.get_network(), "auto_connector", None)
    if connector is not None:
        connector.maybe_connect = never


def _unleak_inbound_slots(host: Any) -> None:
    """Work around a py-libp2p 0.8.1 leak: the swarm's inbound limiter never gives a slot back.

    `Swarm._handle_inbound_connection` holds one `_inbound_limiter` token per inbound
    connection until the *swarm* stops (it waits on `manager.wait_finished()`), so after
    `max_connections` inbound connections in a daemon's lifetime every new peer is refused.
    The connection cap is still enforced: by the swarm's own count of live connections at
    upgrade and registration, and by the resource manager's `ConnectionLimits`.
    """
    import math

    import trio

    network = host.get_network()
    if hasattr(network, "_inbound_limiter"):
        network._inbound_limiter = trio.CapacityLimiter(math.inf)


def _gate(allowed: frozenset[str] | None, max_connections: int) -> Any:
    from libp2p.rcmgr import ResourceLimits, ResourceManager
    from libp2p.rcmgr.connection_limits import ConnectionLimits

    class PeerGate(ResourceManager):  # type: ignore[misc]
        """Refuses peers outside the allowlist once the Noise handshake has authenticated them."""

        def open_connection(self, peer_id: Any = None, endpoint_ip: str | None = None,
                            direction: str = "inbound") -> Any:
            if peer_id is not None and allowed is not None and str(peer_id) not in allowed:
                log.warning("refused connection %s %s: not in the allowlist", direction, peer_id,
                            extra={"peer": str(peer_id), "reason": "not_allowed"})
                return None
            return super().open_connection(peer_id, endpoint_ip=endpoint_ip, direction=direction)

    return PeerGate(
        limits=ResourceLimits(max_connections=max_connections + 1),  # the library holds a pre-handshake slot
        connection_limits=ConnectionLimits(max_established_total=max_connections),
        enable_graceful_degradation=False,  # else the first refusal silently cuts every limit to 80%
        enable_circuit_breaker=False,  # else a burst of refused outsiders would lock everyone out for a while
    )


@asynccontextmanager
async def run_host(host: Any, listen: Iterable[str]) -> AsyncIterator[Any]:
    """Listen on `listen`, yield the running host, and close every connection on the way out."""
    import multiaddr

    import trio

    addrs = [multiaddr.Multiaddr(a) for a in listen]
    failure: BaseException | None = None
    async with host.run(listen_addrs=addrs):
        try:
            yield host
        except (Exception, GeneratorExit) as exc:  # re-raised once the host is down, so the caller gets it
            failure = exc  # as is: through host.run's nursery it would arrive inside an exception group
            # (GeneratorExit: an async generator closed while it held a host, e.g. node.Client.astream_text)
        finally:
            # Close while the host's tasks still run: closed after `run()` has exited, a host that
            # listens nowhere leaves its connections open at the peer's end.
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await host.close()
    if failure is not None:
        raise failure


def peer_info(addr: str) -> Any:
    """A libp2p PeerInfo from a full multiaddr ending in /p2p/<peer id>."""
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:  # multiaddr raises several unrelated types for a bad string
        raise ConfigError("multiaddr", addr, f"not a full multiaddr with /p2p/<peer id>: {exc}") from None
