"""`node.connect()`: submit prompts to a running daemon from a program, with the router's own API.

    client = node.connect(data_dir="/var/lib/accelmesh")          # the local daemon (its HTTP API if it
                                                                    # serves one, else the control protocol)
    client = node.connect(http_url="http://10.0.0.5:8400", api_key=...)   # any daemon's HTTP API
    client = node.connect(peer="/ip4/10.0.0.5/tcp/4001/p2p/12D3KooW...", cluster_key="swarm.key")
    client.generate_text("Hello")                                   # blocking, like node.generate_text
    for chunk in client.stream_text("Hello"): ...
    await client.agenerate_text("Hello")                            # inside trio
    client.close()                                                  # or: with node.connect(...) as client
    async with node.connect(data_dir=...) as client: ...            # or: await client.aclose()

Connections: one per Client per trio loop, shared by every call made in that loop. The async
methods use the caller's loop; the blocking methods use a private trio loop in a worker thread
(so they share one connection too). A loop's connection is opened by the first call that needs
it (calls that come meanwhile wait for it rather than connect themselves), held by a system task
of that loop, so that it outlives the call that opened it, and reopened when it broke (the daemon
restarted): a call that fails before its first item because the connection was gone is retried
once on a new one. It closes at `aclose()` (this loop's, waited for), at `close()` (the blocking
methods' one, waited for; the others are asked to close and close soon after, in their loops),
or when its loop ends. A closed Client can still be used: the next call connects again.
`statistics()` counts the connections.

Arguments are validated and normalized exactly as `node.generate_text` does (reserved keyword
arguments, dropped defaults).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.errors import DaemonError, InvalidRequest
from node.requests import Result, build_request

if TYPE_CHECKING:  # pragma: no cover
    from node.http.client import HttpClient

__all__ = ["connect", "Client", "ClientMethods", "ClientStatistics"]

log = logging.getLogger(__name__)

CLOSE_GRACE = 5.0  # seconds a connection may take to close when its trio loop ends (host.close() takes ~0.2 s)


def connect(
    data_dir: str | Path | None = None,
    peer: str | None = None,
    http_url: str | None = None,
    *,
    identity: Any = None,
    cluster_key: str | Path | None = None,
    api_key: str | None = None,
) -> Client | HttpClient:
    """A client for a running daemon: the one on `data_dir`, at multiaddr `peer`, or at `http_url`.

    With `data_dir`, through the daemon's HTTP API when its daemon.json names an `http_url` (key:
    its http.token), else the control protocol. With `peer`, `identity` is a libp2p private-key
    file (or a `protocols.records.Identity`; default: a new one for this client) and `cluster_key`
    the cluster's swarm.key file. With `http_url` (`http://HOST:PORT`), `api_key` is the bearer
    token a daemon wants beyond loopback. Both kinds of client have the same methods.
    """
    given = [x for x in (data_dir, peer, http_url) if x is not None]
    if len(given) != 1:
        raise InvalidRequest("node.connect() takes exactly one of data_dir=, peer= and http_url=")
    if http_url is not None:
        from node.http.client import HttpClient

        return HttpClient(http_url, api_key=api_key)
    if data_dir is not None:
        from node.datadir import DataDir

        daemon = DataDir(data_dir).daemon()
        if daemon is not None and daemon.http_url:
            from node.http.client import HttpClient

            return HttpClient(data_dir=data_dir)
    return Client(data_dir=Path(data_dir) if data_dir is not None else None, peer=peer,
                  identity=identity, cluster_key=str(cluster_key) if cluster_key is not None else None)


@dataclass(frozen=True)
class ClientStatistics:
    """A snapshot of a Client's connections, all trio loops together (`Client.statistics()`)."""

    sessions_opened: int  # connections opened so far (each one a libp2p host connected to the daemon)
    sessions_open: int  # connections open now: at most one per trio loop
    sessions_dropped: int  # open connections found broken (the daemon went away or restarted) and let go
    connect_failures: int  # attempts to connect that failed (each failure reaches every call waiting on it)
    calls_in_flight: int  # calls running now on a connection


class _LoopSession:
    """A Client's connection in one trio loop, held open by a system task of that loop.

        connecting --opened--> open --stop set, or the loop ends--> closed
             `--failed (error set)------------------------------------^

    `ready` is set once it is open or has failed; `closed` once the system task has ended.
    `broken`: a call found it dead and let it go (`stop` set for that reason, not by a close).
    """

    def __init__(self, token: Any) -> None:
        import trio

        self.token = token  # the loop's TrioToken: the key in Client._loops, and how other threads reach it
        self.session: Any = None  # a node.client.DaemonClient or PeerClient while open
        self.error: Exception | None = None
        self.opened = self.broken = False
        self.ready, self.stop, self.closed = trio.Event(), trio.Event(), trio.Event()

    def alive(self) -> bool:
        """Open, not asked to stop, and its host has a connection to the daemon that is not shutting down."""
        if self.session is None or self.stop.is_set() or self.closed.is_set():
            return False
        from libp2p.peer.id import ID

        conns = self.session.host.get_network().connections.get(ID.from_base58(self.session.peer_id), [])
        return any(_usable(conn) for conn in conns)


class ClientMethods:
    """The convenience methods both kinds of client (`Client`, `node.HttpClient`) derive from their
    four primitives: `iter_request` / `aiter_request` (text chunks, then the Result), `complete` /
    `acomplete`, and `embed_results` / `aembed_results`."""

    def generate_text(self, prompt: Any, **kwargs: Any) -> str:
        return self.complete(prompt, **kwargs).text  # type: ignore[attr-defined,no-any-return]

    async def agenerate_text(self, prompt: Any, **kwargs: Any) -> str:
        return (await self.acomplete(prompt, **kwargs)).text  # type: ignore[attr-defined,no-any-return]

    def stream_text(self, prompt: Any, **kwargs: Any) -> Iterator[str]:
        for item in self.iter_request(prompt, **kwargs):  # type: ignore[attr-defined]
            if isinstance(item, str):
                yield item

    async def astream_text(self, prompt: Any, **kwargs: Any) -> AsyncIterator[str]:
        async with aclosing(self.aiter_request(prompt, **kwargs)) as items:  # type: ignore[attr-defined]
            async for item in items:
                if isinstance(item, str):
                    yield item

    def embed(self, texts: Any, **kwargs: Any) -> list[list[float]]:
        return [list(r.embedding or ()) for r in self.embed_results(texts, **kwargs)]  # type: ignore[attr-defined]

    async def aembed(self, texts: Any, **kwargs: Any) -> list[list[float]]:
        return [list(r.embedding or ()) for r in await self.aembed_results(texts, **kwargs)]  # type: ignore[attr-defined]


class Client(ClientMethods):
    """A daemon's API for a program: one shared connection per trio loop (see the module docstring)."""

    def __init__(self, *, data_dir: Path | None, peer: str | None, identity: Any, cluster_key: str | None) -> None:
        self.data_dir, self.peer, self._identity, self._cluster_key = data_dir, peer, identity, cluster_key
        self._portal: _Portal | None = None
        self._portal_lock = threading.Lock()
        self._lock = threading.Lock()  # guards what follows: the loops may run in several threads
        self._loops: dict[Any, _LoopSession] = {}  # each loop's current connection
        self._live: set[_LoopSession] = set()  # every connection whose system task runs (some may be closing)
        self._opened = self._open_now = self._dropped = self._connect_failures = self._in_flight = 0

    # -- connecting ------------------------------------------------------------------------

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[Any]:
        from node.client import DaemonClient, PeerClient
        from node.datadir import DataDir

        if self.data_dir is not None:
            async with DaemonClient.connect(DataDir(self.data_dir)) as session:
                yield session
            return
        from node.mesh.host import load_swarm_key
        from protocols.records import Identity

        identity = self._identity
        if isinstance(identity, (str, Path)):
            identity = Identity.from_protobuf(Path(identity).read_bytes())
        key = load_swarm_key(self._cluster_key) if self._cluster_key else None
        assert self.peer is not None
        async with PeerClient.connect(self.peer, identity=identity, cluster_key=key) as session:
            yield session

    async def _loop_session(self) -> _LoopSession:
        """This loop's open connection: the first caller opens it, the others wait; a broken one is replaced."""
        import trio

        token = trio.lowlevel.current_trio_token()
        for _ in range(2):  # a stale connection is replaced once; a new one that is dead already is an error
            with self._lock:
                entry = self._loops.get(token)
                new = entry is None
                if entry is None:
                    entry = self._loops[token] = _LoopSession(token)
                    self._live.add(entry)
            if new:
                try:
                    trio.lowlevel.spawn_system_task(self._hold, entry, name=f"accelmesh-client {self._target()}")
                except BaseException:  # the loop is ending (its system nursery takes no new task)
                    self._forget(entry)
                    with self._lock:
                        self._live.discard(entry)
                    raise
            await entry.ready.wait()
            if entry.error is not None:
                _raise_copy(entry.error)
            if entry.alive():
                return entry
            self._let_go(entry)
        raise DaemonError(f"connected to {self._target()}, but the connection closed at once (a cluster key or an "
                          "allowlisted identity may be needed)")

    async def _hold(self, entry: _LoopSession) -> None:
        """A system task: hold `entry`'s connection until asked to stop or the loop ends; never raises.

        When the loop ends, trio cancels every system task at once. Cancelled mid-way, libp2p
        leaves the connection half open at the daemon's end; so the connection lives in a
        shielded child, and the loop's end only asks it to close, within CLOSE_GRACE seconds.
        """
        import trio

        keep = trio.CancelScope(shield=True)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep, entry, keep)
                try:
                    await entry.closed.wait()
                finally:  # closed, or cancelled because the loop is ending: close gracefully, bounded
                    entry.stop.set()
                    keep.deadline = min(keep.deadline, trio.current_time() + CLOSE_GRACE)
        except BaseException:  # Cancelled: the loop has ended (anything escaping would be a TrioInternalError)
            log.debug("connection to %s closed: its trio loop ended", self._target())

    async def _keep(self, entry: _LoopSession, keep: Any) -> None:
        """Open the connection, keep it until `entry.stop`, close it; never raises."""
        opened = False
        try:
            with keep:
                async with self._session() as session:
                    entry.session, entry.opened, opened = session, True, True
                    with self._lock:
                        self._opened += 1
                        self._open_now += 1
                    entry.ready.set()
                    await entry.stop.wait()
        except BaseException as exc:  # anything escaping a system task would crash the loop (TrioInternalError)
            if opened:  # the host failed while closing: the connection is done anyway
                log.debug("connection to %s ended: %r", self._target(), exc)
            else:
                error = _unwrap(exc)
                entry.error = error if isinstance(error, Exception) else DaemonError(
                    f"the connection to {self._target()} was closed while it was being opened")
                with self._lock:
                    self._connect_failures += 1
        finally:
            with self._lock:
                if opened:
                    self._open_now -= 1
                self._live.discard(entry)
            self._forget(entry)
            entry.session = None
            if not opened and entry.error is None:  # asked to stop (or out of grace) before it was open
                entry.error = DaemonError(f"the connection to {self._target()} was closed while it was being opened")
            entry.ready.set()
            entry.closed.set()

    def _forget(self, entry: _LoopSession) -> None:
        with self._lock:
            if self._loops.get(entry.token) is entry:
                del self._loops[entry.token]

    def _let_go(self, entry: _LoopSession) -> None:
        """Stop using `entry` (in its own loop): found broken, the next call opens a new connection."""
        if not entry.stop.is_set():
            entry.broken = True
            entry.stop.set()
            if entry.opened:
                with self._lock:
                    self._dropped += 1
        self._forget(entry)

    def _target(self) -> str:
        return str(self.data_dir) if self.data_dir is not None else str(self.peer)

    def _request(self, prompt: Any, provider: str | None, model_name: str | None, kwargs: dict[str, Any],
                 stream: bool) -> Any:
        from node.config import current_settings
        from node.wire import request_to_wire

        settings = current_settings()
        request = build_request(prompt, model_name=model_name, kwargs=kwargs, default_model=settings.model,
                                default_timeout=settings.request_timeout)
        return request_to_wire(request, provider=provider, hops=1, stream=stream)

    async def _items(self, session: Any, request: Any) -> AsyncIterator[str | Result]:
        from node.wire import result_from_wire

        started = time.monotonic()
        async with aclosing(session.generate(request)) as items:
            async for item in items:
                if isinstance(item, str):
                    yield item
                else:
                    yield result_from_wire(item, request_id=request.id,
                                           latency_ms=(time.monotonic() - started) * 1000.0)

    async def _run(self, request: Any) -> AsyncIterator[str | Result]:
        """`request` on this loop's connection; retried once on a new one if the old was gone before any answer."""
        for attempt in range(2):
            entry = await self._loop_session()
            yielded = False
            with self._lock:
                self._in_flight += 1
            try:
                async with aclosing(self._items(entry.session, request)) as items:
                    async for item in items:
                        yielded = True
                        yield item
                return
            except Exception as exc:
                if entry.alive() or (entry.stop.is_set() and not entry.broken):  # the request failed, not the
                    raise  # connection; or the connection was closed on purpose
                self._let_go(entry)
                if yielded or attempt:
                    raise
                log.debug("the connection to %s was gone (%r): retrying on a new one", self._target(), exc)
            finally:
                with self._lock:
                    self._in_flight -= 1

    # -- async API (in the caller's trio loop) ----------------------------------------------

    async def aiter_request(self, prompt: Any, *, provider: str | None = None, model_name: str | None = None,
                            **kwargs: Any) -> AsyncIterator[str | Result]:
        request = self._request(prompt, provider, model_name, kwargs, stream=True)
        async with aclosing(self._run(request)) as items:
            async for item in items:
                yield item

    async def acomplete(self, prompt: Any, **kwargs: Any) -> Result:
        async with aclosing(self.aiter_request(prompt, **kwargs)) as items:
            async for item in items:
                if isinstance(item, Result):
                    return item
        raise InvalidRequest("the daemon sent no result")  # pragma: no cover - request_inference always ends with one

    async def aembed_results(self, texts: Any, *, model_name: str | None = None, provider: str | None = None,
                             **kwargs: Any) -> list[Result]:
        """`node.aembed` through the daemon: one request per text, EMBED_CONCURRENCY at once; each text's Result."""
        from node.config import current_settings
        from node.embeddings import EMBED_CONCURRENCY, answer_all, embed_requests
        from node.wire import request_to_wire

        requests = embed_requests(texts, model_name=model_name, kwargs=kwargs,
                                  default_timeout=current_settings().request_timeout)
        return await answer_all(requests, lambda request: self._run(request_to_wire(request, provider=provider, hops=1)),
                                limit=EMBED_CONCURRENCY)

    async def aclose(self) -> None:
        """Close this Client's connections as `close()` does, and wait until this loop's ones have closed."""
        import trio

        token = trio.lowlevel.current_trio_token()
        with self._lock:
            here = [entry for entry in self._live if entry.token == token]  # with any broken one still closing
        if self._portal is not None:
            await trio.to_thread.run_sync(self._close_portal)
        self.close()
        for entry in here:
            await entry.closed.wait()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- blocking API (the connection of a private trio loop in a worker thread) -------------

    def _get_portal(self) -> _Portal:
        with self._portal_lock:  # two threads asking at once share one loop, so one connection
            if self._portal is None:
                self._portal = _Portal(self._aclose_here)
            return self._portal

    async def _aclose_here(self) -> None:
        """Close this loop's connection and wait for it, and for any broken one still closing (the portal's loop)."""
        import trio

        token = trio.lowlevel.current_trio_token()
        with self._lock:
            self._loops.pop(token, None)
            here = [entry for entry in self._live if entry.token == token]
        for entry in here:
            entry.stop.set()
            await entry.closed.wait()

    def iter_request(self, prompt: Any, *, provider: str | None = None, model_name: str | None = None,
                     **kwargs: Any) -> Iterator[str | Result]:
        request = self._request(prompt, provider, model_name, kwargs, stream=True)
        yield from self._get_portal().iterate(lambda: self._run(request))

    def complete(self, prompt: Any, **kwargs: Any) -> Result:
        for item in self.iter_request(prompt, **kwargs):
            if isinstance(item, Result):
                return item
        raise InvalidRequest("the daemon sent no result")  # pragma: no cover

    def embed_results(self, texts: Any, **kwargs: Any) -> list[Result]:
        return self._get_portal().run(partial(self.aembed_results, texts, **kwargs))  # type: ignore[no-any-return]

    def _close_portal(self) -> None:
        with self._portal_lock:
            portal, self._portal = self._portal, None
        if portal is not None:
            portal.close()  # its loop closes its connection, then ends

    def close(self) -> None:
        """Close the blocking methods' connection (waits for it) and ask every other loop's one to close.

        Those close soon after, in their own loops, without waiting for calls running on them
        (which then fail). From async code, `await aclose()` also waits for the current loop's one.
        """
        import trio

        self._close_portal()
        with self._lock:
            entries = list(self._loops.values())
            self._loops.clear()
        for entry in entries:
            try:
                entry.token.run_sync_soon(entry.stop.set)
            except trio.RunFinishedError:  # that loop has ended, and its connection with it
                pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def statistics(self) -> ClientStatistics:
        """How many connections this Client opened, has open, dropped; failed connects; calls running."""
        with self._lock:
            return ClientStatistics(self._opened, self._open_now, self._dropped, self._connect_failures,
                                    self._in_flight)

    def __repr__(self) -> str:
        target = f"data_dir={str(self.data_dir)!r}" if self.data_dir else f"peer={self.peer!r}"
        s = self.statistics()
        return f"<node.Client {target} connections open={s.sessions_open} opened={s.sessions_opened}>"


class _Failure:
    """An exception raised in the portal's loop, carried to the thread that iterates."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Portal:
    """A trio loop in a daemon thread; blocking callers run async iterators in it.

    Its calls share the Client's connection for this loop; `on_close` closes it before the loop ends.
    """

    def __init__(self, on_close: Callable[[], Awaitable[None]]) -> None:
        import trio

        self._ready = threading.Event()
        self._token: Any = None
        self._stop: Any = None
        self._nursery: Any = None
        self._thread = threading.Thread(target=trio.run, args=(self._main, on_close), daemon=True,
                                        name="accelmesh-client")
        self._thread.start()
        self._ready.wait()

    async def _main(self, on_close: Callable[[], Awaitable[None]]) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            self._token, self._stop, self._nursery = trio.lowlevel.current_trio_token(), trio.Event(), nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        await on_close()

    def iterate(self, make_items: Any) -> Iterator[Any]:
        """Iterate, from a blocking thread, the async iterator `make_items()` runs in the loop.

        One task in the loop drives the whole iteration and hands items over a rendezvous channel
        (the caller's pace is the producer's pace). When the caller stops early, or is
        interrupted (Ctrl-C) while waiting, that task is cancelled, which closes the iterator
        and with it the request.
        """
        import trio

        send, receive = trio.open_memory_channel[Any](0)
        scope = trio.CancelScope()

        async def pump() -> None:
            with scope:
                async with send:
                    try:
                        async with aclosing(make_items()) as items:
                            async for item in items:
                                await send.send(item)
                    except Exception as exc:
                        await send.send(_Failure(_unwrap(exc)))

        self.run_sync(self._nursery.start_soon, pump)
        try:
            while True:
                try:
                    item = self.run(receive.receive)
                except trio.EndOfChannel:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            try:
                self.run_sync(scope.cancel)
            except trio.RunFinishedError:
                pass

    def run(self, afn: Any, *args: Any) -> Any:
        import trio

        try:
            return trio.from_thread.run(afn, *args, trio_token=self._token)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None

    def run_sync(self, fn: Any, *args: Any) -> Any:
        import trio

        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def close(self) -> None:
        import trio

        try:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        self._thread.join(timeout=10)


def _usable(conn: Any) -> bool:
    """A libp2p connection that is neither closed nor shutting down.

    A connection the daemon ended stays listed by the swarm until it has closed it too (which
    takes a while); Yamux marks it shutting down first (on the daemon's GO_AWAY, or on EOF),
    before the streams that were open on it fail.
    """
    muxed = conn.muxed_conn
    shutting_down = getattr(muxed, "event_shutting_down", None)  # Yamux; other muxers: the closed flags only
    return not (conn.is_closed or muxed.is_closed or (shutting_down is not None and shutting_down.is_set()))


def _unwrap(exc: BaseException) -> BaseException:
    """The one real error inside the exception groups that nurseries wrap errors in."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _raise_copy(exc: Exception) -> None:
    """Raise `exc`, shared by every call that waited for one connection, as a copy of its own.

    Raising one exception object in many tasks would pile every task's traceback onto it. An
    exception that cannot be copied (its __init__ takes other arguments than its args) is raised
    as it is.
    """
    try:
        fresh: Exception | None = copy.copy(exc)
    except Exception:
        fresh = None
    if fresh is None:
        raise exc
    raise fresh from exc
