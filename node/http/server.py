"""Serving the HTTP API: Hypercorn's trio worker inside the daemon's own nursery (no second event
loop, no thread per request).

`bind_http` binds and listens at once, before the daemon starts anything else, so an address in
use is one clear `ConfigError` naming `http` (not an error from deep inside a nursery); then
`serve_http` serves on that socket, reports the URL (`http://HOST:PORT`, the bound port: port 0
picks a free one) and stops accepting when `shutdown_trigger` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from node.errors import ConfigError

__all__ = ["KEEP_ALIVE_MAX_REQUESTS", "HttpListener", "bind_http", "parse_bind", "serve_http"]

log = logging.getLogger("node.http")

# Hypercorn closes a keep-alive connection after 1,000 requests by default; a client reusing one
# connection for a load test then pays a reconnect. This is "never" in practice.
KEEP_ALIVE_MAX_REQUESTS = 2**62


def parse_bind(value: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:8400` for IPv6) as (host, port); ConfigError naming `http` otherwise."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("http", value, "expected HOST:PORT, e.g. 127.0.0.1:8400 (port 0 picks a free port)")
    return host, int(port)


@dataclass
class HttpListener:
    """A bound, listening socket and the Hypercorn config that serves it."""

    config: Any  # hypercorn.config.Config
    sockets: Any  # hypercorn.config.Sockets

    def close(self) -> None:
        for sock in self.sockets.insecure_sockets:
            sock.close()


def bind_http(bind: str, *, graceful_timeout: float = 3.0, source: str | None = None) -> HttpListener:
    """Bind and listen on `bind` (`HOST:PORT`) now; ConfigError naming `http` when that fails."""
    from hypercorn.config import Config

    host, port = parse_bind(bind)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.keep_alive_max_requests = KEEP_ALIVE_MAX_REQUESTS
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = graceful_timeout
    try:
        sockets = config.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
    except OSError as exc:
        raise ConfigError("http", bind, f"cannot listen there: {exc.strerror or exc}", source=source) from None
    return HttpListener(config, sockets)


class _Started:
    """Relays Hypercorn's `started(binds)` as `started(first bound URL)`."""

    def __init__(self, task_status: Any) -> None:
        self.task_status = task_status

    def started(self, binds: list[str] | None = None) -> None:
        self.task_status.started(binds[0] if binds else None)


async def serve_http(app: Any, listener: HttpListener, *,
                     shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on `listener` until cancelled or `shutdown_trigger` returns; started with
    `nursery.start`, it returns the URL (`http://HOST:PORT`)."""
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    try:
        await worker_serve(wrap_app(app, listener.config.wsgi_max_body_size, "asgi"), listener.config,
                           sockets=listener.sockets, shutdown_trigger=shutdown_trigger,
                           task_status=_Started(task_status))
    finally:
        listener.close()
