"""Real libp2p hosts and in-process daemons on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from node.config import load_settings
from node.daemon import Daemon
from node.datadir import DataDir
from node.mesh.host import HostConfig, make_host, peer_info, run_host
from protocols.records import Identity

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
PATIENT = {"ACCELMESH_CACHE_CLUSTER_BUDGET": "2"}  # a slow CI machine still finds a record: hits, not timing


def caused_by(exc: BaseException | None, kind: type[BaseException]) -> bool:
    """Whether `exc` or an exception it was raised from (`__cause__`) is a `kind`."""
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__
    return False


@asynccontextmanager
async def running_daemon(tmp_path: Path, name: str = "alice", **env: str) -> AsyncIterator[Daemon]:
    """A daemon on loopback port 0 with its own data dir; stopped on exit."""
    data = tmp_path / name
    settings = load_settings(env={"ACCELMESH_DATA_DIR": str(data), "ACCELMESH_LISTEN": LOOPBACK, **env})
    daemon = Daemon(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_stop(force=True)


@asynccontextmanager
async def peer_host(identity: Identity | None = None, **config: Any) -> AsyncIterator[Any]:
    """A plain libp2p host (Noise, Yamux) for playing another peer: alice's friend or mallory."""
    host = make_host(HostConfig(identity=identity or Identity.generate(), listen=(), **config))
    async with run_host(host, []):
        yield host


async def connect(host: Any, daemon: Daemon) -> None:
    with trio.fail_after(10):
        await host.connect(peer_info(daemon.addrs()[0]))


@pytest.fixture
def client_identity(tmp_path: Path):
    def get(daemon: Daemon) -> Identity:
        return DataDir(daemon.data_dir.path).client_identity(create=False)

    return get
