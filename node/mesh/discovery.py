"""Dialing the peers a source names and keeping them connected: the bootstrap peers, what mDNS finds.

`DiscoveryDialer` polls a source of PeerInfos and dials each peer it names that is not
connected, with a per-peer exponential backoff; a peer that drops is redialed the same way.
The daemon runs one over its configured bootstrap peers (a fixed list) and, when mDNS is on,
one over `mdns_peers(host)`.

py-libp2p 0.8.1's mDNS (zeroconf) only records what it finds: the listener puts each peer's
announced addresses in the peerstore and its id in `listener.discovered_services`; nothing
dials them (its auto-connector would, but it dials *every* peerstore peer and is switched off
in `node.mesh.host`); `mdns_peers(host)` reads what it found, as a source. Who may join is
unchanged: the cluster key and the allowlist are enforced by the connection upgrade
and the resource manager's gate exactly as for any other dial, and the daemon's mDNS dialer
does not even dial peers outside the allowlist. Once connected, the advert exchange that follows every new
connection (`node.mesh.adverts`) puts the peer in the peer table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import trio

__all__ = ["Backoff", "DiscoveryDialer", "mdns_peers"]

log = logging.getLogger(__name__)

STABLE_AFTER = 5.0  # seconds a dialed connection must last before the peer's backoff starts over


class Backoff:
    """Per-peer dial schedule: the first dial at once, then `initial` seconds doubling to `maximum`.

    Every attempt (successful or not) pushes the next one back, so a peer that accepts the
    connection and drops it at once (a gate on its side) is not redialed in a tight loop;
    `reset` (a connection that lasted) starts the schedule over. Pure: callers pass the clock.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 60.0) -> None:
        self.initial, self.maximum = initial, max(initial, maximum)
        self._next: dict[str, float] = {}
        self._delay: dict[str, float] = {}

    def due(self, peer: str, now: float) -> bool:
        return now >= self.next_at(peer)

    def next_at(self, peer: str) -> float:
        """When the peer may be dialed next (-inf: now)."""
        return self._next.get(peer, -float("inf"))

    def attempted(self, peer: str, now: float) -> float:
        """Record a dial at `now`; the seconds until the next one may start."""
        delay = self._delay.get(peer, self.initial)
        self._next[peer] = now + delay
        self._delay[peer] = min(delay * 2, self.maximum)
        return delay

    def reset(self, peer: str) -> None:
        self._next.pop(peer, None)
        self._delay.pop(peer, None)

    def forget_except(self, peers: Iterable[str]) -> None:
        """Drop the schedule of peers no longer discovered (bounded memory)."""
        keep = set(peers)
        for peer in [p for p in self._delay if p not in keep]:
            self.reset(peer)

    def __len__(self) -> int:
        return len(self._delay)


def mdns_peers(host: Any) -> list[Any]:
    """PeerInfos of the peers the host's mDNS listener knows now, with the addresses it stored.

    Empty when mDNS is off (or stopped: py-libp2p sets `host.mDNS` to None on shutdown).
    """
    from libp2p.peer.peerinfo import PeerInfo

    mdns = getattr(host, "mDNS", None)
    if mdns is None:
        return []
    peerstore = host.get_peerstore()
    found: dict[Any, Any] = {}
    for _ in range(3):  # zeroconf's thread writes the dict; a copy taken mid-write is retried
        try:
            services = list(mdns.listener.discovered_services.values())
            break
        except RuntimeError:
            continue
    else:
        return []
    for peer_id, _seen in services:
        try:
            addrs = peerstore.addrs(peer_id)
        except Exception:  # PeerStoreError: unknown or expired
            continue
        if addrs:
            found[peer_id] = PeerInfo(peer_id, list(addrs))
    return list(found.values())


class DiscoveryDialer:
    """Dials what a source names (`name` says which, in logs), each peer at most on its `Backoff` schedule.

    A peer stays dialed while the source names it: should its connection drop, it is dialed
    again, at once if the connection had lasted `STABLE_AFTER` seconds, else on its schedule.
    """

    def __init__(
        self,
        host: Any,
        source: Callable[[], Iterable[Any]],
        *,
        allowed: Callable[[str], bool] = lambda peer: True,
        backoff: Backoff | None = None,
        poll: float = 0.5,
        dial_timeout: float = 10.0,
        max_parallel: int = 8,
        name: str = "mDNS",
    ) -> None:
        self.host, self.source, self.allowed = host, source, allowed
        self.backoff = backoff or Backoff()
        self.poll, self.dial_timeout, self.max_parallel, self.name = poll, dial_timeout, max_parallel, name
        self.dials = 0  # attempts
        self.connected = 0  # attempts that connected
        self._since: dict[str, float] = {}  # peer -> since when it has been connected (either side dialed)
        self._dialing: set[str] = set()

    async def run(self) -> None:
        """Look at the source every `poll` seconds; dials run beside it, so a slow one delays no other."""
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    self.dial_round(nursery)
                except Exception as exc:  # a discovery hiccup must not take the daemon down: next round
                    log.warning("%s discovery round failed: %s", self.name, exc, exc_info=exc)
                await trio.sleep(self.poll)

    def dial_round(self, nursery: trio.Nursery) -> None:
        """One look at the source: start a dial to every discovered, allowed, unconnected peer that is due."""
        own = str(self.host.get_id())
        found = {str(info.peer_id): info for info in self.source()}
        found.pop(own, None)
        self.backoff.forget_except(found)
        for peer in [p for p in self._since if p not in found]:
            del self._since[peer]
        now = trio.current_time()
        for peer, info in found.items():
            if self._is_connected(info.peer_id):
                since = self._since.setdefault(peer, now)
                if now - since >= STABLE_AFTER:
                    self.backoff.reset(peer)  # it stayed: should it drop later, redial at once
                continue
            self._since.pop(peer, None)
            if (peer not in self._dialing and len(self._dialing) < self.max_parallel and self.allowed(peer)
                    and self.backoff.due(peer, now)):
                self.backoff.attempted(peer, now)
                self._dialing.add(peer)
                nursery.start_soon(self._dial, info)

    def _is_connected(self, peer_id: Any) -> bool:
        return bool(self.host.get_network().connections.get(peer_id))

    async def _dial(self, info: Any) -> None:
        peer = str(info.peer_id)
        self.dials += 1
        try:
            with trio.fail_after(self.dial_timeout):
                await self.host.connect(info)
        except Exception as exc:  # libp2p raises many types for a failed dial
            log.info("%s peer %s unreachable (%s); retry in %.1f s", self.name, peer, type(exc).__name__,
                     max(0.0, self.backoff.next_at(peer) - trio.current_time()),
                     extra={"peer": peer})
            return
        finally:
            self._dialing.discard(peer)
        self.connected += 1
        self._since[peer] = trio.current_time()
        log.info("connected to %s peer %s", self.name, peer, extra={"peer": peer})
