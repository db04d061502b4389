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
  negotiation through the connection config (whole seconds: py-libp2p truncates the timeout to
  an int, so it is rounded up here, at least 1 s); per-peer and per-protocol streams, frames
  and request rates are enforced by `node.mesh.streams` (the library does not apply them).
- Addresses: a wildcard listen address (`0.0.0.0`, `::`) is advertised as this host's interface
  addresses (loopback first), through libp2p's `addrs_factory` (what `get_addrs()`, identify and
  the daemon report) and in mDNS announcements; undialable `0.0.0.0` never leaves the node.
- Shutdown: leaving `host.run()` does not close connections (notes 13.6): `run_host` calls
  `host.close()` while the host still runs (closed afterwards, a host that listens nowhere
  leaves its connections half open at the peer's end: measured here).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ConfigError
from protocols.records import Identity, is_peer_id

__all__ = [
    "membership",
    "HostConfig",
    "load_swarm_key",
    "make_swarm_key",
    "is_loopback_multiaddr",
    "expand_wildcard_addrs",
    "interface_addresses",
    "negotiate_seconds",
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


def membership(*, client: str, allow: frozenset[str] | None, cluster_key: bool,
               open_: bool) -> Callable[[str], bool]:
    """Who is a cluster member (a trusted caller) on this node, as a predicate on peer ids.

    The local client key always is. With an allowlist: the peers on it. Otherwise with a cluster
    key: every connected peer (the connection proves the key). With neither: every peer of a
    loopback-only node, and nobody on an `--open` node (strangers).
    """
    if allow is not None:
        members = allow | {client}
        return lambda peer: peer in members
    if cluster_key or not open_:
        return lambda peer: True
    return lambda peer: peer == client


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


# -- this host's addresses (for wildcard listen addresses) ------------------------------------

INTERFACE_CACHE_S = 10.0  # interfaces are re-read at most this often
_interfaces_cache: tuple[float, tuple[list[str], list[str]]] | None = None


def parse_fib_trie(text: str) -> list[str]:
    """IPv4 addresses assigned to this host, from Linux's /proc/net/fib_trie (each `/32 host LOCAL` leaf)."""
    found: list[str] = []
    last_ip = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            last_ip = stripped[3:].strip()
        elif stripped.startswith("/32 host LOCAL") and last_ip is not None:
            if last_ip not in found:
                found.append(last_ip)
            last_ip = None
    return found


IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40
IPV6_SCOPE_LINK = 0x20


def parse_if_inet6(text: str) -> list[str]:
    """IPv6 addresses of this host from Linux's /proc/net/if_inet6, link-local and tentative ones left out.

    Columns: address (32 hex digits), interface index, prefix length, scope, flags, name. A
    link-local address is dialable only with its zone (interface), which a multiaddr here lacks.
    """
    found: list[str] = []
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 6 or len(cols[0]) != 32:
            continue
        try:
            scope, flags = int(cols[3], 16), int(cols[4], 16)
            ip = str(ipaddress.IPv6Address(bytes.fromhex(cols[0])))
        except ValueError:
            continue
        if scope == IPV6_SCOPE_LINK or flags & (IFA_F_DADFAILED | IFA_F_TENTATIVE):
            continue
        if ip not in found:
            found.append(ip)
    return found


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def interface_addresses() -> tuple[list[str], list[str]]:
    """This host's (IPv4, IPv6) addresses, loopback included; stdlib only, cached INTERFACE_CACHE_S.

    Linux: /proc/net/fib_trie and /proc/net/if_inet6. Elsewhere (or without /proc): the
    addresses the host name resolves to, plus 127.0.0.1 and ::1.
    """
    global _interfaces_cache
    now = time.monotonic()
    if _interfaces_cache is not None and now - _interfaces_cache[0] < INTERFACE_CACHE_S:
        return _interfaces_cache[1]
    trie, inet6 = _read("/proc/net/fib_trie"), _read("/proc/net/if_inet6")
    v4 = parse_fib_trie(trie) if trie else []
    v6 = parse_if_inet6(inet6) if inet6 is not None else []
    if not v4 or inet6 is None:
        try:
            infos = socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)
        except OSError:
            infos = []
        for family, *_, sockaddr in infos:
            ip = str(sockaddr[0]).split("%")[0]
            target = v4 if family == socket.AF_INET else v6 if family == socket.AF_INET6 else None
            if target is not None and ip not in target and not ipaddress.ip_address(ip).is_link_local:
                target.append(ip)
        v4 = v4 or ["127.0.0.1"]
    result = (v4, v6)
    _interfaces_cache = (now, result)
    return result


def expand_wildcard_addrs(addrs: Iterable[str],
                          interfaces: tuple[Sequence[str], Sequence[str]] | None = None) -> list[str]:
    """`addrs` with each `/ip4/0.0.0.0/...` and `/ip6/::/...` replaced by one address per interface.

    0.0.0.0 becomes every IPv4 address of this host, `::` every IPv6 one (a wildcard may also
    accept the other family, but only its own is certain); the rest of the multiaddr (port,
    /p2p/...) is kept. Loopback first, then the others in order; duplicates dropped.
    """
    v4, v6 = interfaces if interfaces is not None else interface_addresses()
    out: list[str] = []
    for addr in addrs:
        parts = str(addr).split("/")
        replacements: Sequence[str] | None = None
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] == "0.0.0.0":
            replacements = v4
        elif len(parts) > 2 and parts[1] == "ip6":
            try:
                if ipaddress.IPv6Address(parts[2]) == ipaddress.IPv6Address("::"):
                    replacements = v6
            except ValueError:
                pass
        expanded = [addr] if replacements is None else ["/".join([*parts[:2], ip, *parts[3:]]) for ip in replacements]
        out.extend(a for a in expanded if a not in out)
    return sorted(out, key=lambda a: not is_loopback_multiaddr(a))  # stable: keeps the order within each group


def _expanding_addrs_factory(candidates: list[Any]) -> list[Any]:
    """libp2p `addrs_factory`: what `host.get_addrs()` (and so identify) reports, wildcards expanded."""
    import multiaddr

    return [multiaddr.Multiaddr(a) for a in expand_wildcard_addrs(str(c) for c in candidates)]


def _mdns_announces_interface_addrs(host: Any) -> None:
    """Make py-libp2p's mDNS broadcaster announce dialable addresses.

    py-libp2p 0.8.1's broadcaster puts `host.get_transport_addrs()` in its TXT records: the raw
    listen addresses, so a node listening on 0.0.0.0 announces `/ip4/0.0.0.0/...`, which a
    peer on another machine cannot dial. Here it announces the expanded addresses instead.
    """
    mdns = getattr(host, "mDNS", None)
    if mdns is None:
        return

    def resolve() -> list[str]:
        raw = [str(a).split("/p2p/")[0] for a in host.get_transport_addrs()]
        return expand_wildcard_addrs(raw)

    mdns.broadcaster._resolve_host_addrs = resolve


def negotiate_seconds(timeout: float) -> int:
    """The protocol-negotiation timeout py-libp2p can apply: whole seconds, rounded up, at least 1.

    py-libp2p 0.8.1 truncates it with int() (basic_host), so 0.5 would become 0 and every
    negotiation would time out at once.
    """
    return max(1, math.ceil(timeout))


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


# Streams this node may have open at once that it opened itself, on one connection. py-libp2p
# 0.8.1's Yamux holds one of 256 "backlog" slots for an outbound stream's whole life (go-yamux
# frees it when the peer acknowledges the stream), so a client with 256 requests in flight on one
# connection waited before sending the 257th: the daemon never saw it, to queue it or answer busy.
OUTBOUND_STREAMS_PER_CONNECTION = 2048


def _wider_stream_backlog() -> None:
    """Work around py-libp2p 0.8.1 capping open outbound streams per connection at 256 (above):
    each new Yamux connection gets OUTBOUND_STREAMS_PER_CONNECTION slots instead."""
    import trio
    from libp2p.stream_muxer.yamux import yamux

    if getattr(yamux.Yamux, "_accelmesh_wider_backlog", False):
        return
    original = yamux.Yamux.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.stream_backlog_limit = OUTBOUND_STREAMS_PER_CONNECTION
        self.stream_backlog_semaphore = trio.Semaphore(OUTBOUND_STREAMS_PER_CONNECTION)

    yamux.Yamux.__init__ = init
    yamux.Yamux._accelmesh_wider_backlog = True


def make_host(config: HostConfig) -> Any:
    """A libp2p host for `config` (not yet listening: use `run_host`)."""
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport

    _atomic_muxer_writes()
    _wider_stream_backlog()
    keypair = libp2p_keypair(config.identity)
    timeout = PSK_UPGRADE_TIMEOUT if config.cluster_key else 10.0
    negotiate = negotiate_seconds(config.negotiate_timeout)
    connection_config = ConnectionConfig(
        max_connections_per_peer=1,
        max_connections=config.max_connections,
        high_watermark=config.max_connections,
        low_watermark=0,
        min_connections=0,
        inbound_upgrade_timeout=timeout,
        outbound_upgrade_timeout=timeout,
        inbound_stream_protocol_negotiation_timeout=negotiate,
        outbound_stream_protocol_negotiation_timeout=negotiate,
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
        negotiate_timeout=negotiate,
        addrs_factory=_expanding_addrs_factory,
    )
    _unleak_inbound_slots(host)
    _no_auto_dialing(host)
    _mdns_announces_interface_addrs(host)
    return host


def _no_auto_dialing(host: Any) -> None:
    """Switch off py-libp2p's auto-connector: the daemon decides whom to dial.

    It dials peers from the peerstore until there are (low + high watermark) / 2 connections,
    whatever the watermarks: 128 dials for our default of 256 connections, to any peer the
    node ever heard of. The daemon dials its bootstrap peers itself, and the peers mDNS finds
    through `node.mesh.discovery.DiscoveryDialer` (py-libp2p's mDNS only fills the peerstore).
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
