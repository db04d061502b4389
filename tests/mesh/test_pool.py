"""The stream pool's named limits ([mesh] pool_max_idle_per_peer, pool_max_idle_seconds): at the limit and one past it.

Idle streams are given back and taken through the pool's own bookkeeping with stand-in streams
(no host), under virtual time."""

from __future__ import annotations

import pytest
import trio

from node.config import load_settings
from node.mesh.pool import StreamPool
from node.mesh.streams import StreamLimits

PEER = "12D3KooWpeer"


class IdleStream:
    """Stands in for a FramedStream kept idle: the pool only closes it."""

    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def pool_from_settings(**env: str) -> StreamPool:
    mesh = load_settings(env=env).mesh
    return StreamPool(None, StreamLimits(), max_idle_per_peer=mesh.pool_max_idle_per_peer,
                      max_idle_seconds=mesh.pool_max_idle_seconds)


async def test_at_most_max_idle_per_peer_streams_are_kept(autojump_clock):
    pool = pool_from_settings(ACCELMESH_MESH_POOL_MAX_IDLE_PER_PEER="2")
    streams = [IdleStream() for _ in range(3)]
    for stream in streams:
        await pool._give_back(PEER, stream)  # type: ignore[arg-type]
    assert pool.statistics().idle == 2, "at the limit both are kept"
    assert [s.closed for s in streams] == [False, False, True], "one past the limit is closed"
    await pool._give_back("12D3KooWother", IdleStream())  # type: ignore[arg-type]
    assert pool.statistics().idle == 3, "the limit is per peer"
    assert "idle=3" in repr(pool) and "at most 2 per peer" in repr(pool)


async def test_zero_keeps_no_idle_stream(autojump_clock):
    pool = pool_from_settings(ACCELMESH_MESH_POOL_MAX_IDLE_PER_PEER="0")
    stream = IdleStream()
    await pool._give_back(PEER, stream)  # type: ignore[arg-type]
    assert stream.closed and pool.statistics().idle == 0
    assert await pool._take_idle(PEER) is None


async def test_an_idle_stream_is_reused_within_max_idle_seconds_and_closed_past_it(autojump_clock):
    pool = pool_from_settings(ACCELMESH_MESH_POOL_MAX_IDLE_SECONDS="5")
    fresh, stale = IdleStream(), IdleStream()
    await pool._give_back(PEER, fresh)  # type: ignore[arg-type]
    await trio.sleep(4.999)
    assert await pool._take_idle(PEER) is fresh and pool.statistics().reused == 1
    await pool._give_back(PEER, stale)  # type: ignore[arg-type]
    await trio.sleep(5.001)
    assert await pool._take_idle(PEER) is None, "idle past 5 s: closed instead of reused"
    assert stale.closed and pool.statistics() == type(pool.statistics())(opened=0, reused=1, idle=0)


@pytest.mark.parametrize("kwargs", [{"max_idle_per_peer": -1}, {"max_idle_seconds": 0.0}])
def test_a_pool_refuses_limits_the_settings_would_refuse(kwargs):
    with pytest.raises(ValueError, match="max_idle"):
        StreamPool(None, StreamLimits(), **kwargs)
