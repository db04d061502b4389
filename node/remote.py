"""`node.connect()`: submit prompts to a running daemon from a program, with the router's own API.

    client = node.connect(data_dir="/var/lib/accelmesh")          # the local daemon (control protocol)
    client = node.connect(peer="/ip4/10.0.0.5/tcp/4001/p2p/12D3KooW...", cluster_key="swarm.key")
    client.generate_text("Hello")                                   # blocking, like node.generate_text
    for chunk in client.stream_text("Hello"): ...
    await client.agenerate_text("Hello")                            # inside trio
    client.close()                                                  # or: with node.connect(...) as client

The blocking methods share one connection, kept by a private trio loop in a worker thread;
the async methods connect in the caller's loop for each call. Arguments are validated and
normalized exactly as `node.generate_text` does (reserved keyword arguments, dropped defaults).
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

from node.errors import InvalidRequest
from node.router import Result, build_request

__all__ = ["connect", "Client"]


def connect(
    data_dir: str | Path | None = None,
    peer: str | None = None,
    http_url: str | None = None,
    *,
    identity: Any = None,
    cluster_key: str | Path | None = None,
) -> Client:
    """A client for a running daemon: the one on `data_dir`, or the one at multiaddr `peer`.

    With `peer`, `identity` is a libp2p private-key file (or a `protocols.records.Identity`;
    default: a new one for this client) and `cluster_key` the cluster's swarm.key file.
    """
    given = [x for x in (data_dir, peer, http_url) if x is not None]
    if len(given) != 1:
        raise InvalidRequest("node.connect() takes exactly one of data_dir=, peer= and http_url=")
    if http_url is not None:
        raise InvalidRequest("the HTTP API is not part of this release yet: use data_dir= or peer=")
    return Client(data_dir=Path(data_dir) if data_dir is not None else None, peer=peer,
                  identity=identity, cluster_key=str(cluster_key) if cluster_key is not None else None)


class Client:
    def __init__(self, *, data_dir: Path | None, peer: str | None, identity: Any, cluster_key: str | None) -> None:
        self.data_dir, self.peer, self._identity, self._cluster_key = data_dir, peer, identity, cluster_key
        self._portal: _Portal | None = None
        self._portal_lock = threading.Lock()

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

    def _request(self, prompt: Any, provider: str | None, model_name: str | None, kwargs: dict[str, Any],
                 stream: bool) -> Any:
        from node.config import current_settings
        from node.mesh.service import wire_timeout_ms
        from protocols.inference.messages import ChatMessage, Request

        settings = current_settings()
        r = build_request(prompt, model_name=model_name, kwargs=kwargs, default_model=settings.model,
                          default_timeout=settings.request_timeout)
        return Request(
            id=r.request_id[:64], task=r.task, prompt=r.prompt,
            messages=tuple(ChatMessage(str(m["role"]), str(m["content"])) for m in r.messages)
            if r.messages is not None else None,
            model=r.model, provider=provider, params=dict(r.params), stream=stream, cache=r.cache_mode,
            timeout_ms=wire_timeout_ms(r.timeout), on_peers=r.on_peers, accelerator=r.accelerator, strategy=r.strategy,
        )

    async def _items(self, session: Any, request: Any) -> AsyncIterator[str | Result]:
        started = time.monotonic()
        async with aclosing(session.generate(request)) as items:
            async for item in items:
                if isinstance(item, str):
                    yield item
                    continue
                body = item.verify()
                yield Result(
                    text=body.get("text", ""), provider=item.provider, model=body["model"], cache=item.cache,
                    key=item.key, cid=item.cid, request_id=request.id,
                    latency_ms=(time.monotonic() - started) * 1000.0, finish_reason=body["finish_reason"],
                    usage=body["usage"], peer=item.peer, served_from=item.served_from, response=item.response,
                )

    # -- async API (in the caller's trio loop) ----------------------------------------------

    async def aiter_request(self, prompt: Any, *, provider: str | None = None, model_name: str | None = None,
                            **kwargs: Any) -> AsyncIterator[str | Result]:
        request = self._request(prompt, provider, model_name, kwargs, stream=True)
        async with self._session() as session, aclosing(self._items(session, request)) as items:
            async for item in items:
                yield item

    async def acomplete(self, prompt: Any, **kwargs: Any) -> Result:
        async with aclosing(self.aiter_request(prompt, **kwargs)) as items:
            async for item in items:
                if isinstance(item, Result):
                    return item
        raise InvalidRequest("the daemon sent no result")  # pragma: no cover - request_inference always ends with one

    async def agenerate_text(self, prompt: Any, **kwargs: Any) -> str:
        return (await self.acomplete(prompt, **kwargs)).text

    async def astream_text(self, prompt: Any, **kwargs: Any) -> AsyncIterator[str]:
        async with aclosing(self.aiter_request(prompt, **kwargs)) as items:
            async for item in items:
                if isinstance(item, str):
                    yield item

    # -- blocking API (one shared connection in a worker thread) ----------------------------

    def _get_portal(self) -> _Portal:
        with self._portal_lock:  # two threads asking at once share one connection
            if self._portal is None:
                self._portal = _Portal(self._session)
            return self._portal

    def iter_request(self, prompt: Any, *, provider: str | None = None, model_name: str | None = None,
                     **kwargs: Any) -> Iterator[str | Result]:
        request = self._request(prompt, provider, model_name, kwargs, stream=True)
        portal = self._get_portal()
        yield from portal.iterate(lambda: self._items(portal.session, request))

    def complete(self, prompt: Any, **kwargs: Any) -> Result:
        for item in self.iter_request(prompt, **kwargs):
            if isinstance(item, Result):
                return item
        raise InvalidRequest("the daemon sent no result")  # pragma: no cover

    def generate_text(self, prompt: Any, **kwargs: Any) -> str:
        return self.complete(prompt, **kwargs).text

    def stream_text(self, prompt: Any, **kwargs: Any) -> Iterator[str]:
        for item in self.iter_request(prompt, **kwargs):
            if isinstance(item, str):
                yield item

    def close(self) -> None:
        with self._portal_lock:
            if self._portal is not None:
                self._portal.close()
                self._portal = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        target = f"data_dir={str(self.data_dir)!r}" if self.data_dir else f"peer={self.peer!r}"
        return f"<node.Client {target}{' connected' if self._portal else ''}>"


class _Failure:
    """An exception raised in the portal's loop, carried to the thread that iterates."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Portal:
    """A trio loop in a daemon thread holding one session; blocking callers run coroutines in it."""

    def __init__(self, session_factory: Any) -> None:
        import trio

        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.session: Any = None
        self._token: Any = None
        self._stop: Any = None
        self._nursery: Any = None
        self._thread = threading.Thread(target=trio.run, args=(self._main, session_factory), daemon=True,
                                        name="accelmesh-client")
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def _main(self, session_factory: Any) -> None:
        import trio

        try:
            async with session_factory() as session, trio.open_nursery() as nursery:
                self.session, self._token, self._stop = session, trio.lowlevel.current_trio_token(), trio.Event()
                self._nursery = nursery
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        except BaseException as exc:  # reported to the thread that asked for the connection
            self._error = _unwrap(exc)
            self._ready.set()

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

        if self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=10)


def _unwrap(exc: BaseException) -> BaseException:
    """The one real error inside the exception groups that nurseries wrap errors in."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
