"""The daemon: the composition root. One nursery, ordered start-up, ordered shutdown.

Start-up, in order: check the listen policy (secure defaults) and refuse settings not
implemented yet (`http`) -> take the data dir's lock
(one daemon per directory) -> load or create the identity and the client key -> read the
cluster key -> open the local store and build the router -> start the libp2p host and
listen -> register every protocol handler -> start background tasks (bootstrap reconnects,
dialing what mDNS finds) -> write daemon.json (atomically: temp file + rename). Only then is the daemon "up".

Shutdown (SIGINT, SIGTERM, or `accelmesh stop`): new streams are refused; in-flight requests
get `daemon.drain_grace` seconds to finish; then every task is cancelled, the host closes its
connections, daemon.json is removed and the lock released.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from node import __version__
from node.config import Settings
from node.datadir import DataDir
from node.errors import ConfigError, DaemonError
from node.mesh.host import (
    HostConfig,
    is_loopback_multiaddr,
    load_swarm_key,
    make_host,
    membership,
    peer_info,
    run_host,
)
from node.mesh.adverts import AdvertService, PeerTable
from node.mesh.discovery import Backoff, DiscoveryDialer, mdns_peers
from node.admission import Admission
from node.mesh.pool import StreamPool
from node.mesh.server import serve_inference, serve_inference_stream
from node.mesh.streams import FramedStream, StreamGuard, StreamLimits
from node.serving import FrontDoor
from protocols.codec import decode, encode
from protocols.control import messages as control
from protocols.framing import encode_frame
from protocols.inference.machine import LIMITS as INFER_LIMITS
from protocols.inference.machine import InferenceStream, Role
from protocols.inference.messages import Request

__all__ = ["Daemon", "check_listen_policy", "check_unimplemented", "mdns_enabled"]

log = logging.getLogger("node.daemon")


def check_listen_policy(settings: Settings) -> None:
    """Refuse to listen beyond loopback with neither a cluster key nor an allowlist, unless --open."""
    beyond = [addr for addr in settings.listen if not is_loopback_multiaddr(addr)]
    if beyond and not settings.cluster_key and not settings.allow and not settings.open:
        raise ConfigError(
            "listen", beyond[0],
            "listening beyond loopback needs a cluster key (--cluster-key FILE, see `accelmesh keygen`) or "
            "an allowlist (--allow PEER_ID); pass --open to accept any peer",
        )


def check_unimplemented(settings: Settings) -> None:
    """Refuse settings whose feature does not exist yet, rather than silently ignoring them."""
    if settings.http:
        raise ConfigError("http", settings.http,
                          "the HTTP API is not implemented yet; start the daemon without it (--http, ACCELMESH_HTTP "
                          "or `http` in the config file) and submit through the CLI or node.connect()",
                          source=settings.sources.get("http"))


def mdns_enabled(settings: Settings) -> bool:
    """mDNS: as asked; else on when listening beyond loopback, and off with --open (public service name)."""
    if settings.mdns is not None:
        return settings.mdns
    if settings.open:
        return False
    return any(not is_loopback_multiaddr(addr) for addr in settings.listen)


def _limits(settings: Settings) -> StreamLimits:
    lim = settings.limits
    return StreamLimits(
        max_frame_size=lim.max_frame_size, frame_timeout=lim.frame_timeout, idle_timeout=lim.idle_timeout,
        max_streams_per_peer=lim.max_streams_per_peer, max_streams_per_protocol=lim.max_streams_per_protocol,
        request_rate=lim.request_rate, request_burst=lim.request_burst,
        member_streams=2 * (lim.max_concurrent + lim.max_queue),  # every request reaches admission
    )


class Daemon:
    def __init__(self, settings: Settings, *, data_dir: DataDir | None = None) -> None:
        if settings.sources.get("enable_mesh", "default") == "default":
            settings = dataclasses.replace(settings, enable_mesh=True)  # a daemon routes through the mesh by default
        self.settings = settings
        self.data_dir = data_dir or DataDir(settings.data_dir)
        self.limits = _limits(settings)
        self.guard = StreamGuard(self.limits)
        self.admission = Admission(settings.limits.max_concurrent, settings.limits.max_queue)
        self.state = "starting"
        self.started_at = time.time()
        self.host: Any = None
        self.identity: Any = None
        self.client_peer_id = ""
        self.deps: Any = None
        self.store: Any = None
        self.front_door: FrontDoor | None = None
        self._stop: trio.Event | None = None
        self._force: trio.Event | None = None
        self.handlers: dict[str, Any] = {}
        self.table: PeerTable | None = None
        self.adverts: AdvertService | None = None
        self.mesh: Any = None
        self.streams: StreamPool | None = None  # keep-alive inference streams to other nodes
        self.accelerators: list[Any] = []
        from node.accelerators import AcceleratorDetector

        self.detect_accelerators = AcceleratorDetector()  # static parts once, free memory at most every 10 s
        self.discovery: DiscoveryDialer | None = None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id if self.identity is not None else ""

    # -- life cycle ----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        check_listen_policy(self.settings)
        check_unimplemented(self.settings)
        cluster_key = load_swarm_key(self.settings.cluster_key) if self.settings.cluster_key else None
        self._stop, self._force = trio.Event(), trio.Event()
        self.data_dir.lock()
        try:
            self.identity = self.data_dir.identity()
            self.client_peer_id = self.data_dir.client_identity().peer_id
            allow = frozenset(self.settings.allow) if self.settings.allow else None
            self.guard.is_member = membership(client=self.client_peer_id, allow=allow,
                                              cluster_key=cluster_key is not None, open_=self.settings.open)
            self.deps, self.store = self._router_deps()
            config = HostConfig(
                identity=self.identity, listen=self.settings.listen, bootstrap=(),
                cluster_key=cluster_key,
                allow=allow,
                always_allowed=frozenset({self.client_peer_id}),
                mdns=mdns_enabled(self.settings), max_connections=self.settings.limits.max_connections,
                negotiate_timeout=self.settings.limits.negotiate_timeout,
            )
            self.host = make_host(config)
            self.accelerators = await trio.to_thread.run_sync(self.detect_accelerators)
            async with run_host(self.host, self.settings.listen) as host, trio.open_nursery() as nursery:
                self.front_door = FrontDoor(admission=self.admission, deps=self.deps, peer_id=self.peer_id)
                self.streams = StreamPool(host, self.limits)
                self.mesh = self._mesh(self.front_door, self.streams)
                self._register_handlers(host)
                self.table = PeerTable(self.peer_id, self.settings.adverts.ttl)
                self.adverts = AdvertService(
                    host, self.guard, self.table, self._build_advert,
                    interval=self.settings.adverts.interval, load_interval=self.settings.adverts.load_interval,
                    load=lambda: (self.admission.in_flight, self.admission.queued),
                    load_changed=lambda: self.admission.changed, is_member=lambda peer: True,
                    offer_signature=lambda: [(p["name"], p["ready"], p["models"]) for p in self.providers()],
                )
                await nursery.start(self.adverts.run)
                nursery.start_soon(self._keep_bootstrap_connected)
                if config.mdns:
                    self.discovery = self.discovery_dialer(lambda: mdns_peers(host))
                    nursery.start_soon(self.discovery.run)
                nursery.start_soon(self._forget_idle_peers)
                if self.settings.providers.hf_local.preload:
                    nursery.start_soon(self._preload_models)
                self.state = "running"
                self.started_at = time.time()
                self.data_dir.write_daemon_json(self.daemon_json())
                log.info("daemon %s listening on %s", self.peer_id, " ".join(self.addrs()),
                         extra={"peer": self.peer_id, "data_dir": str(self.data_dir.path)})
                task_status.started(self)
                await self._stop.wait()
                await self._drain()
                nursery.cancel_scope.cancel()
        finally:
            self.state = "stopped"
            self.data_dir.remove_daemon_json()
            if self.store is not None:
                self.store.close()
            self.data_dir.unlock()
            log.info("daemon %s stopped", self.peer_id)

    def request_stop(self, force: bool = False) -> None:
        if self._stop is not None:
            self._stop.set()
        if force and self._force is not None:
            self._force.set()

    async def _drain(self) -> None:
        self.state = "draining"
        self.guard.closing = True
        grace = self.settings.daemon.drain_grace
        log.info("draining: %d request(s) in flight, up to %g s", self.admission.in_flight, grace)
        with trio.move_on_after(grace):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._wait_forced, nursery.cancel_scope)
                while not self.admission.idle:
                    await self.admission.changed.wait()
                nursery.cancel_scope.cancel()
        if self.admission.in_flight:
            log.warning("drain grace over: cancelling %d request(s)", self.admission.in_flight)

    async def _wait_forced(self, scope: trio.CancelScope) -> None:
        assert self._force is not None
        await self._force.wait()
        scope.cancel()

    # -- composition ---------------------------------------------------------------------

    def _router_deps(self) -> tuple[Any, Any]:
        from node.cache import LocalStore, MemoryCache, TieredCache
        from node.deps import RouterDeps

        c = self.settings.cache
        store = LocalStore(self.data_dir.store_file, max_bytes=c.store_max_bytes, verify_on_read=c.verify_on_read)
        memory = MemoryCache(c.memory_max_entries, c.memory_max_bytes, c.memory_ttl)
        deps = RouterDeps(response_cache=TieredCache(memory, store), settings=self.settings)
        return deps, store

    def _mesh(self, front_door: FrontDoor, pool: StreamPool) -> Any:
        """The mesh provider, pinned in the router's deps: it sees the peer table and this node's
        advert read-only, and runs a request here through the front door's `run_local`."""
        from node.mesh.provider import MeshProvider, candidates_from_adverts

        def candidates() -> list[Any]:
            others = [e.advert for e in self.table.entries()] if self.table is not None else []
            own = self.adverts.current if self.adverts is not None else None
            return candidates_from_adverts(self.peer_id, others, own)

        mesh = MeshProvider(peer_id=self.peer_id, candidates=candidates, run_local=front_door.run_local, pool=pool)
        self.deps.pin_provider("mesh", mesh)
        self.deps.backend_manager = mesh  # RouterDeps.get_backend_manager(): who picks the serving node
        return mesh

    def _register_handlers(self, host: Any) -> None:
        from protocols.inference.machine import MAX_FRAME_SIZE as INFER_FRAME
        from protocols.inference.messages import PROTOCOL_ID as INFER

        self.handlers[control.PROTOCOL_ID] = self.guard.wrap(
            control.PROTOCOL_ID, self._control, allowed=lambda peer: peer == self.client_peer_id,
            max_frame_size=control.MAX_FRAME_SIZE, admitted=True,
        )
        self.handlers[INFER] = self.guard.wrap(INFER, self._infer, max_frame_size=INFER_FRAME, admitted=True)
        for protocol, handler in self.handlers.items():
            host.set_stream_handler(protocol, handler)

    def discovery_dialer(self, source: Callable[[], Iterable[Any]]) -> DiscoveryDialer:
        """Dials the peers `source` names (PeerInfos: mDNS's finds), within this node's allowlist."""
        allow = frozenset(self.settings.allow) if self.settings.allow else None
        return DiscoveryDialer(self.host, source, allowed=lambda peer: allow is None or peer in allow,
                               backoff=Backoff(0.5, self.settings.daemon.bootstrap_backoff_max))

    def _build_advert(self, seq: int) -> Any:
        """This node's advert, signed (blocking: readiness checks may run subprocesses)."""
        from protocols.advert.messages import PROTOCOL_VERSION, Accelerator, Load, ProviderEntry, sign_advert

        self.accelerators = self.detect_accelerators()  # (in a worker thread: AdvertService.publish)
        created = int(time.time() * 1000)
        # Within the advert's bounds: what does not fit is left out (a cut model name would be wrong)
        providers = [p for p in self.providers() if _fits(p["name"], 64)][:32]
        return sign_advert(
            self.identity,
            addrs=tuple([a for a in self.addrs() if _fits(a, 256)][:16]),
            providers=tuple(ProviderEntry(p["name"], tuple(p["tasks"]),
                                          tuple(m for m in p["models"] if _fits(m, 256))[:64], p["ready"])
                            for p in providers),
            accelerators=tuple(Accelerator(a.kind, _cut(a.name, 128), a.memory_total, a.memory_free, a.index, a.cores)
                               for a in self.accelerators[:64]),
            capacity=self.admission.max_concurrent, queue=self.admission.max_queue,
            load=Load(self.admission.in_flight, self.admission.queued),
            software=f"accelmesh/{__version__}", protocol=PROTOCOL_VERSION, seq=seq, created=created,
            expires=created + int(self.settings.adverts.ttl * 1000),
        )

    def providers(self) -> list[dict[str, Any]]:
        """The local providers this node offers (the mesh itself is not one of them)."""
        from node.providers import registry

        out = []
        for name in registry.names():
            if name == "mesh":
                continue
            try:
                provider = self.deps.get_provider(name, self.settings)
                readiness = provider.available()
                out.append({"name": name, "tasks": list(provider.tasks), "models": list(provider.models()),
                            "ready": readiness.ok})
            except Exception as exc:  # a provider that cannot be built is advertised as not ready
                log.debug("provider %s: %s", name, exc)
                out.append({"name": name, "tasks": [], "models": [], "ready": False})
        return out

    def addrs(self) -> list[str]:
        """Full multiaddrs of this node, loopback first; a wildcard listen address appears as this
        host's interface addresses (the host's addrs_factory, `node.mesh.host.expand_wildcard_addrs`)."""
        addrs = [str(a) for a in self.host.get_addrs()] if self.host is not None else []
        return sorted(addrs, key=lambda a: (not is_loopback_multiaddr(a), a))

    def daemon_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "peer_id": self.peer_id, "multiaddrs": self.addrs(), "pid": os.getpid(), "version": __version__,
        }
        if self.settings.cluster_key:
            info["cluster_key_file"] = os.path.abspath(self.settings.cluster_key)
        return info

    # -- background tasks ----------------------------------------------------------------

    async def _keep_bootstrap_connected(self) -> None:
        """Dial every bootstrap peer; reconnect with exponential backoff whenever it drops."""
        targets = [peer_info(addr) for addr in self.settings.bootstrap]
        backoff = {str(t.peer_id): 0.5 for t in targets}
        retry_at = {str(t.peer_id): 0.0 for t in targets}
        while targets:
            for target in targets:
                pid = str(target.peer_id)
                if pid == self.peer_id or self._connected(target.peer_id) or trio.current_time() < retry_at[pid]:
                    continue
                try:
                    with trio.fail_after(10):
                        await self.host.connect(target)
                    backoff[pid] = 0.5
                    log.info("connected to bootstrap peer %s", pid)
                except Exception as exc:  # libp2p raises many types for a failed dial
                    log.info("bootstrap peer %s unreachable (%s); retry in %.1f s", pid, type(exc).__name__,
                             backoff[pid])
                    retry_at[pid] = trio.current_time() + backoff[pid]
                    backoff[pid] = min(backoff[pid] * 2, self.settings.daemon.bootstrap_backoff_max)
            await trio.sleep(0.5)

    async def _preload_models(self) -> None:
        """Load hf_local's models in a worker thread (with a progress bar) so the first request is fast."""
        try:
            provider = self.deps.get_provider("hf_local", self.settings)
            if provider.available().ok:
                loaded = await trio.to_thread.run_sync(provider.preload)
                log.info("hf_local: preloaded %s", ", ".join(loaded))
        except Exception as exc:  # a model that fails to load must not take the daemon down
            log.warning("hf_local: preload failed: %s", exc)

    def _connected(self, peer_id: Any) -> bool:
        return bool(self.host.get_network().connections.get(peer_id))

    async def _forget_idle_peers(self) -> None:
        while True:
            await trio.sleep(60)
            self.guard.forget_idle_peers()

    # -- the control protocol ------------------------------------------------------------

    async def _control(self, framed: FramedStream, peer: str) -> None:
        frame = await framed.read_frame()
        if frame is None:
            return
        message = decode(frame, (control.Command, Request), INFER_LIMITS)  # a Request as the infer protocol bounds it
        if isinstance(message, Request):
            machine = InferenceStream(Role.SERVER, max_inbound_frame_size=framed.limits.max_frame_size)
            machine.receive_message(message)
            framed.decoder = machine
            await serve_inference(framed, machine, message, self.front_door.runner("control"))
            return
        assert isinstance(message, control.Command)
        try:
            result = await self.command(message.command, dict(message.args))
            reply = control.Reply(ok=True, result=result)
        except (DaemonError, ConfigError, ValueError, KeyError) as exc:
            reply = control.Reply(ok=False, error=control.ErrorInfo(code="failed", message=_cut(str(exc), 4096)))
        await framed.write(encode_frame(encode(reply), control.MAX_FRAME_SIZE))
        if message.command == "stop":
            self.request_stop()

    async def command(self, name: str, args: dict[str, Any]) -> Any:
        if name == "status":
            return self.status()
        if name == "info":
            return self.info()
        if name == "stop":
            return {"stopping": True, "in_flight": self.admission.in_flight,
                    "drain_grace": self.settings.daemon.drain_grace}
        if name == "peers":
            return {"peers": [entry.to_json() for entry in self.table.entries()] if self.table else []}
        if name.startswith("cache-"):
            from node.cache.commands import run_cache_command

            return await trio.to_thread.run_sync(run_cache_command, self.store, name[len("cache-"):], args)
        raise DaemonError(f"unknown command {name!r}")

    def status(self) -> dict[str, Any]:
        stats = self.admission.statistics()
        return {
            "state": self.state, "peer_id": self.peer_id, "pid": os.getpid(), "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3), "in_flight": stats.in_flight,
            "queued": stats.queued, "connections": len(self.host.get_network().connections) if self.host else 0,
            "streams": self.guard.statistics().to_json(),
        }

    def info(self) -> dict[str, Any]:
        advert = self.adverts.current if self.adverts is not None else None
        return {
            "peer_id": self.peer_id, "addrs": self.addrs(), "version": __version__,
            "providers": [{"name": p.name, "tasks": list(p.tasks), "models": list(p.models), "ready": p.ready}
                          for p in advert.providers] if advert else [],
            "accelerators": [a.to_json() for a in self.accelerators],
            "capacity": self.admission.max_concurrent, "queue": self.admission.max_queue,
            "load": {"in_flight": self.admission.in_flight, "queued": self.admission.queued},
            "peers": len(self.table) if self.table is not None else 0,
            "stats": self.deps.statistics().to_json() if self.deps is not None else {},
        }

    # -- remote inference ------------------------------------------------------------------

    async def _infer(self, framed: FramedStream, peer: str) -> None:
        """`/accelmesh/infer/1.0.0`: requests from a client or another node, answered here (keep-alive)."""
        await serve_inference_stream(framed, self.front_door.runner("infer"),
                                     allow_request=lambda: self.guard.take_token(peer))


def _fits(text: str, limit: int) -> bool:
    """Whether `text` fits a wire string bound of `limit` (the codec's bounds count characters)."""
    return len(text) <= limit


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters."""
    return text[:limit]
