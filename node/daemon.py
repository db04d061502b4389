"""The daemon: the composition root. One nursery, ordered start-up, ordered shutdown.

Start-up, in order: check the listen policy (secure defaults) and the `http` setting -> take
the data dir's lock
(one daemon per directory) -> load or create the identity and the client key -> read the
cluster key -> open the local store and build the router -> start the libp2p host and
listen -> build the peer table, the advert service (node.mesh.adverts), the mesh provider and the
control commands' view (node.control) -> register every protocol handler -> the advert service
(this node's first advert built) -> with `http`, the HTTP API (node.http: bound at the start,
serving from here, `http.token` written) -> start background tasks (the bootstrap peers and,
with mDNS, what it finds, each kept dialed by a node.mesh.discovery.DiscoveryDialer) -> write
daemon.json (atomically: temp file + rename). Only
then is the daemon "up".

Shutdown (SIGINT, SIGTERM, or `accelmesh stop`): new streams are refused; in-flight requests
get `daemon.drain_grace` seconds to finish; then every task is cancelled, the host closes its
connections, daemon.json is removed and the lock released.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import trio

from node import __version__
from node import control
from node.admission import Admission
from node.config import Settings
from node.datadir import DataDir
from node.errors import ConfigError, DaemonError
from node.mesh.adverts import AdvertBuilder, AdvertService, PeerTable, local_offer
from node.mesh.discovery import Backoff, DiscoveryDialer, mdns_peers
from node.mesh.host import (
    HostConfig,
    is_loopback_multiaddr,
    load_swarm_key,
    make_host,
    membership,
    peer_info,
    run_host,
)
from node.mesh.pool import StreamPool
from node.mesh.server import serve_inference_stream
from node.mesh.streams import FramedStream, StreamGuard, StreamLimits, Traffic
from node.serving import FrontDoor
from protocols.control import messages as control_wire

__all__ = ["Daemon", "check_http", "check_listen_policy", "mdns_enabled"]

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


ROUTING_REFRESH = 60.0  # seconds: every member with an advert is put into the DHT routing table again


def check_http(settings: Settings) -> None:
    """Refuse an `http` setting that is not HOST:PORT, or API keys that cannot be used, before
    anything is started."""
    if settings.http:
        from node.http.auth import api_keys
        from node.http.server import parse_bind

        try:
            parse_bind(settings.http)
        except ConfigError as exc:
            raise ConfigError("http", settings.http, exc.reason, source=settings.sources.get("http")) from None
        api_keys(settings.http_api_keys, settings.http_api_keys_file, source=settings.sources.get("http_api_keys_file"))


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
        self.traffic = Traffic()  # bytes by protocol and direction (node.mesh.streams, the HTTP API)
        self.guard = StreamGuard(self.limits, traffic=self.traffic)
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
        self.table: PeerTable | None = None
        self.adverts: AdvertService | None = None
        self.control: control.ControlContext | None = None  # what the control commands see
        self.mesh: Any = None
        self.manager: Any = None  # node.mesh.manager.BackendManager: who serves each request the mesh carries
        from node.mesh.manager import health_policy, hedge_rule

        self.health_policy = health_policy(settings.mesh)  # a bad [mesh] health setting fails here, named
        self.hedge_after = hedge_rule(settings.mesh.hedge_after)  # ... and a bad hedge_after
        self.streams: StreamPool | None = None  # keep-alive inference streams to other nodes
        from node.accelerators import AcceleratorDetector

        self.detect_accelerators = AcceleratorDetector()  # static parts once, free memory at most every 10 s
        self.bootstrap: DiscoveryDialer | None = None  # keeps the bootstrap peers connected
        self.discovery: DiscoveryDialer | None = None  # dials what mDNS finds
        self.dht: Any = None  # node.mesh.dht.ClusterDHT, when the cluster cache is on
        self.exchange: Any = None  # node.cache.exchange.BlockExchange: blocks to and from members
        self.cluster: Any = None  # node.cache.cluster.ClusterCache: the router's cluster tier
        self.http: Any = None  # node.http.HttpApi, with `http`
        self.http_url: str | None = None  # http://HOST:PORT where it listens
        self.metrics: Any = None  # node.metrics.Metrics, with `http`
        self._http_listener: Any = None  # node.http.HttpListener: bound at start-up, served in the nursery

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id if self.identity is not None else ""

    # -- life cycle ----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        check_listen_policy(self.settings)
        check_http(self.settings)
        cluster_key = load_swarm_key(self.settings.cluster_key) if self.settings.cluster_key else None
        self._stop, self._force = trio.Event(), trio.Event()
        self.data_dir.lock()
        try:
            if self.settings.http:  # bound first: an address in use stops start-up with one clear error
                from node.http.server import bind_http

                self._http_listener = bind_http(self.settings.http, graceful_timeout=self.settings.daemon.drain_grace,
                                                source=self.settings.sources.get("http"))
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
            async with run_host(self.host, self.settings.listen) as host, trio.open_nursery() as nursery:
                if self.settings.http:  # served at /metrics
                    from node.metrics import Metrics

                    self.metrics = Metrics()
                self.front_door = FrontDoor(admission=self.admission, deps=self.deps, peer_id=self.peer_id,
                                            record=self.metrics.record if self.metrics is not None else None)
                self.streams = StreamPool(host, self.limits, traffic=self.traffic,
                                          max_idle_per_peer=self.settings.mesh.pool_max_idle_per_peer,
                                          max_idle_seconds=self.settings.mesh.pool_max_idle_seconds)
                self.table = PeerTable(self.peer_id, self.settings.adverts.ttl)
                self.adverts = self._advert_service(host, self.table)
                self.mesh = self._mesh(self.front_door, self.streams, self.table, self.adverts)
                self.control = self._control_context(host, self.table, self.adverts)
                if self.metrics is not None:
                    self.metrics.watch(self.control, ready=self.readiness, known=self.table.__contains__,
                                       traffic=self.traffic.snapshot)
                self._register_handlers(host, self.control, self.front_door)
                if self.cluster_enabled():
                    await self._start_cluster_cache(host, nursery)
                await nursery.start(self.adverts.run)  # (this node's first advert is built: it lists its models)
                if self.settings.http:  # after it, so that /v1/models and `model` know them from the first request
                    self.http_url = await nursery.start(self._serve_http)
                if self.settings.bootstrap:
                    targets = [peer_info(addr) for addr in self.settings.bootstrap]
                    self.bootstrap = self.discovery_dialer(lambda: targets, name="bootstrap", allowlist=False)
                    nursery.start_soon(self.bootstrap.run)
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
            if self._http_listener is not None:
                self._http_listener.close()
            if self.settings.http:
                from node.http.auth import TOKEN_FILE

                (self.data_dir.path / TOKEN_FILE).unlink(missing_ok=True)
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
                if self.cluster is not None:
                    await self.cluster.drain()  # the records still queued: the answers stay findable
                nursery.cancel_scope.cancel()
        if self.admission.in_flight:
            log.warning("drain grace over: cancelling %d request(s)", self.admission.in_flight)

    # -- the HTTP API ------------------------------------------------------------------------

    async def _serve_http(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The OpenAI-compatible API (node.http) on `settings.http`: every request through the front
        door (entry "http"). Beyond loopback it wants a bearer token unless --open; the local token
        is written to `http.token` (0600) before the URL goes into daemon.json."""
        from node.http.app import HttpApi
        from node.http.auth import BearerAuth, api_keys, is_loopback_host, write_token
        from node.http.server import parse_bind, serve_http

        assert self.front_door is not None and self._stop is not None and self._http_listener is not None
        host, _ = parse_bind(self.settings.http)
        token = write_token(self.data_dir.path)
        keys = api_keys(self.settings.http_api_keys, self.settings.http_api_keys_file,
                        source=self.settings.sources.get("http_api_keys_file"))
        auth = BearerAuth(frozenset({token, *keys}), required=not is_loopback_host(host) and not self.settings.open)
        assert self.metrics is not None
        self.http = HttpApi(run=self.front_door.run, models=self.models, settings=self.settings,
                            peer_id=self.peer_id, auth=auth, cors_origins=self.settings.http_cors_origins,
                            ready=self.readiness, metrics=self.metrics.exposition, traffic=self.traffic)
        await serve_http(self.http.app(), self._http_listener, shutdown_trigger=self._stop.wait,
                         task_status=task_status)

    def readiness(self) -> tuple[bool, str]:
        """`/readyz`: whether some backend can serve (a ready provider here or on a peer), and why not."""
        if self.state != "running":
            return False, f"the daemon is {self.state}"
        if self.models():
            return True, "ready"
        return False, "no ready provider here or on any known peer"

    def models(self) -> dict[str, tuple[str, ...]]:
        """Every model a ready provider serves anywhere in the mesh, with the peer ids serving it
        (`GET /v1/models`): the backend manager's candidates, this node's own advert included (its
        local providers' readiness is checked when the advert is built, never per request: the
        checks may block)."""
        serving: dict[str, set[str]] = {}
        for candidate in self.manager.candidates() if self.manager is not None else ():
            for offer in candidate.providers:
                if offer.ready:
                    for model in offer.models:
                        serving.setdefault(model, set()).add(candidate.peer_id)
        return {model: tuple(sorted(peers)) for model, peers in serving.items()}

    # -- the cluster cache -----------------------------------------------------------------

    def cluster_enabled(self) -> bool:
        """`cache.cluster`: on, off, or auto (on, except on an --open node: strangers are no cluster)."""
        mode = self.settings.cache.cluster
        return self.settings.response_cache and (mode == "on" or (mode == "auto" and not self.settings.open))

    async def _start_cluster_cache(self, host: Any, nursery: trio.Nursery) -> None:
        """The DHT, the block exchange and the cluster tier (docs/cache.md): records and blocks are
        exchanged with cluster members only (`guard.is_member`)."""
        from node.cache.cluster import ClusterCache
        from node.cache.exchange import PROTOCOL_ID as CACHE, BlockExchange
        from node.mesh.dht import ClusterDHT
        from protocols.cache.messages import MAX_FRAME_SIZE as CACHE_FRAME

        store, manager = self.store, self.manager
        self.dht = ClusterDHT(host, is_member=self.guard.is_member)
        await nursery.start(self.dht.run)
        self.exchange = BlockExchange(host, self.limits, store.get_block)
        host.set_stream_handler(CACHE, self.guard.wrap(CACHE, self.exchange.handler, allowed=self.guard.is_member,
                                                       max_frame_size=CACHE_FRAME))
        self.cluster = ClusterCache(dht=self.dht, fetch=self.exchange.fetch, identity=self.identity,
                                    penalise=manager.penalise, budget=self.settings.cache.cluster_budget)
        await nursery.start(self.cluster.run)
        self.deps.cluster_cache = self.cluster
        nursery.start_soon(self._fill_routing_table)

    async def _fill_routing_table(self) -> None:
        """Cluster members go into the DHT's routing table (it is not filled on connect): each peer
        whose advert this node holds, with the addresses the advert lists (so a lookup may dial a
        member this node is not connected to), once, and again after it left and came back."""
        assert self.table is not None and self.dht is not None
        added: set[str] = set()
        refreshed = trio.current_time()
        while True:
            if trio.current_time() - refreshed >= ROUTING_REFRESH:  # a member dropped for failing: again
                added, refreshed = set(), trio.current_time()
            adverts = {entry.advert.peer_id: entry.advert for entry in self.table.entries()}
            async with trio.open_nursery() as nursery:
                for peer in adverts.keys() - added:
                    nursery.start_soon(self.dht.add_member, peer, tuple(adverts[peer].addrs))
            added = (added | adverts.keys()) & adverts.keys()
            await trio.sleep(0.5)

    async def _wait_forced(self, scope: trio.CancelScope) -> None:
        assert self._force is not None
        await self._force.wait()
        scope.cancel()

    # -- composition ---------------------------------------------------------------------

    def _router_deps(self) -> tuple[Any, Any]:
        from node.cache import MemoryCache, TieredCache
        from node.cache.store import open_store
        from node.deps import RouterDeps

        c = self.settings.cache
        store = open_store(self.data_dir.store_file, max_bytes=c.store_max_bytes, verify_on_read=c.verify_on_read)
        memory = MemoryCache(c.memory_max_entries, c.memory_max_bytes, c.memory_ttl)
        deps = RouterDeps(response_cache=TieredCache(memory, store), settings=self.settings)
        return deps, store

    def _mesh(self, front_door: FrontDoor, pool: StreamPool, table: PeerTable, adverts: AdvertService) -> Any:
        """The mesh provider, pinned in the router's deps, and its backend manager (the deps'
        `backend_manager`): the manager sees the peer table and this node's advert read-only; the
        mesh runs a request here through the front door's `run_local`."""
        from node.mesh.manager import BackendManager, candidates_from_adverts
        from node.mesh.provider import MeshProvider

        def candidates() -> list[Any]:
            return candidates_from_adverts(self.peer_id, [e.advert for e in table.entries()], adverts.current)

        m = self.settings.mesh
        self.manager = BackendManager(candidates, strategy=self.settings.load_balancing, policy=self.health_policy,
                                      load_cap=m.load_cap, liveness_floor=m.liveness_floor,
                                      liveness_multiple=m.liveness_multiple)
        mesh = MeshProvider(peer_id=self.peer_id, manager=self.manager, run_local=front_door.run_local, pool=pool,
                            max_attempts=m.max_attempts, hedge_after=self.hedge_after)
        self.deps.pin_provider("mesh", mesh)
        self.deps.backend_manager = self.manager  # RouterDeps.get_backend_manager()
        return mesh

    def _advert_service(self, host: Any, table: PeerTable) -> AdvertService:
        """Publishes what this node offers (its local providers, as the router's deps build them),
        on what hardware, and how busy admission is; keeps `table` current."""
        from node.providers import registry

        admission, deps, settings = self.admission, self.deps, self.settings

        def load() -> tuple[int, int]:
            return admission.in_flight, admission.queued

        def offer() -> list[Any]:
            return local_offer(registry.names(), lambda name: deps.get_provider(name, settings))

        build = AdvertBuilder(
            self.identity, addrs=self.addrs, offer=offer, accelerators=self.detect_accelerators, load=load,
            capacity=admission.max_concurrent, queue=admission.max_queue, ttl=settings.adverts.ttl,
            software=f"accelmesh/{__version__}",
        )
        return AdvertService(
            host, self.guard, table, build,
            interval=settings.adverts.interval, load_interval=settings.adverts.load_interval,
            load=load, load_changed=lambda: admission.changed, is_member=lambda peer: self.guard.is_member(peer),
            offer_signature=build.offer_signature, pinged=lambda peer, rtt: self.manager.pinged(peer, rtt),
        )

    def _control_context(self, host: Any, table: PeerTable, adverts: AdvertService) -> control.ControlContext:
        """What `accelmesh status|info|peers|stop|cache` may read and do here."""
        return control.ControlContext(
            peer_id=self.peer_id, version=__version__, pid=os.getpid(), drain_grace=self.settings.daemon.drain_grace,
            addrs=self.addrs, state=lambda: self.state, uptime=lambda: time.time() - self.started_at,
            connections=lambda: len(host.get_network().connections), admission=self.admission.statistics,
            streams=self.guard.statistics, peer_entries=table.entries, advert=lambda: adverts.current,
            peer_health=self.manager.peer_json, balancing=self.manager.statistics,
            router=self.deps.statistics, store=self.store, request_stop=self.request_stop,
            cluster=self._cluster_json,
        )

    def _cluster_json(self) -> dict[str, Any] | None:
        """`cache stats`' cluster view: the cluster tier, the DHT and the block exchange (None: off)."""
        if self.cluster is None:
            return None
        return {**self.cluster.statistics().to_json(), "dht": self.dht.statistics().to_json(),
                "exchange": self.exchange.statistics().to_json()}

    def _register_handlers(self, host: Any, context: control.ControlContext, front_door: FrontDoor) -> None:
        from protocols.inference.machine import MAX_FRAME_SIZE as INFER_FRAME
        from protocols.inference.messages import PROTOCOL_ID as INFER

        serve = partial(control.serve_control, context=context, runner=front_door.runner("control"))
        host.set_stream_handler(control_wire.PROTOCOL_ID, self.guard.wrap(
            control_wire.PROTOCOL_ID, serve, allowed=lambda peer: peer == self.client_peer_id,
            max_frame_size=control_wire.MAX_FRAME_SIZE, admitted=True,
        ))
        host.set_stream_handler(INFER, self.guard.wrap(INFER, self._infer, max_frame_size=INFER_FRAME, admitted=True))

    def discovery_dialer(self, source: Callable[[], Iterable[Any]], *, name: str = "mDNS",
                         allowlist: bool = True) -> DiscoveryDialer:
        """Dials the peers `source` names (PeerInfos: mDNS's finds, the bootstrap peers) and redials them
        when they drop; with `allowlist`, only peers on this node's allowlist (the connection gate
        refuses the others anyway)."""
        allow = frozenset(self.settings.allow) if self.settings.allow and allowlist else None
        return DiscoveryDialer(self.host, source, allowed=lambda peer: allow is None or peer in allow,
                               backoff=Backoff(0.5, self.settings.daemon.bootstrap_backoff_max), name=name)

    def addrs(self) -> list[str]:
        """Full multiaddrs of this node, loopback first; a wildcard listen address appears as this
        host's interface addresses (the host's addrs_factory, `node.mesh.host.expand_wildcard_addrs`)."""
        addrs = [str(a) for a in self.host.get_addrs()] if self.host is not None else []
        return sorted(addrs, key=lambda a: (not is_loopback_multiaddr(a), a))

    def daemon_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "peer_id": self.peer_id, "multiaddrs": self.addrs(), "pid": os.getpid(), "version": __version__,
        }
        if self.http_url:
            info["http_url"] = self.http_url
        if self.settings.cluster_key:
            info["cluster_key_file"] = os.path.abspath(self.settings.cluster_key)
        return info

    # -- background tasks ----------------------------------------------------------------

    async def _preload_models(self) -> None:
        """Load hf_local's models in a worker thread (with a progress bar) so the first request is fast."""
        try:
            provider = self.deps.get_provider("hf_local", self.settings)
            if provider.available().ok:
                loaded = await trio.to_thread.run_sync(provider.preload)
                log.info("hf_local: preloaded %s", ", ".join(loaded))
                if gc.get_freeze_count():  # the daemon process froze its start-up heap (node.cli.freeze_heap):
                    gc.freeze()  # the models' objects join it

        except Exception as exc:  # a model that fails to load must not take the daemon down
            log.warning("hf_local: preload failed: %s", exc)

    def _connected(self, peer_id: Any) -> bool:
        return bool(self.host.get_network().connections.get(peer_id))

    async def _forget_idle_peers(self) -> None:
        while True:
            await trio.sleep(60)
            self.guard.forget_idle_peers()
            if self.manager is not None and self.table is not None:
                self.manager.forget([self.peer_id, *(e.advert.peer_id for e in self.table.entries())])

    # -- the control commands' answers, for tests and in-process callers (node.control) ----------

    def _running(self) -> control.ControlContext:
        if self.control is None:
            raise DaemonError("the daemon is not running")
        return self.control

    def status(self) -> dict[str, Any]:
        return control.status(self._running())

    def info(self) -> dict[str, Any]:
        return control.info(self._running())

    async def command(self, name: str, args: dict[str, Any]) -> Any:
        return await control.run_command(self._running(), name, args)

    # -- remote inference ------------------------------------------------------------------

    async def _infer(self, framed: FramedStream, peer: str) -> None:
        """`/accelmesh/infer/1.0.0`: requests from a client or another node, answered here (keep-alive)."""
        await serve_inference_stream(framed, self.front_door.runner("infer"),
                                     allow_request=lambda: self.guard.take_token(peer))

