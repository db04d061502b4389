"""No caller loses a request to a limit that the contract says queues (INTERFACES.md: 64 running,
256 queued, `busy` with retry_after only beyond), through every way a program submits to a daemon.

Every request waits at a gate (`GatedProvider`) until the test has seen the node's slots and queue
fill, so the counts do not depend on timing: then the gate opens and everything is answered.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio

import node
from node.errors import Busy
from node.mesh.host import make_swarm_key
from tests.fakes.providers import GatedProvider
from tests.mesh.conftest import running_daemon

QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "60"}
RUNNING, QUEUED = 64, 256  # the contract's defaults (INTERFACES.md "Defaults that change behaviour")

pytestmark = pytest.mark.slow


async def until(predicate, timeout=60.0, show=lambda: ""):
    try:
        with trio.fail_after(timeout):
            while not predicate():
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"not within {timeout} s: {show()}") from None


def full(daemon) -> bool:
    s = daemon.admission.statistics()
    return s.in_flight == RUNNING and s.queued == QUEUED


async def submit_all(daemon, gate, n, call) -> list:
    """Start `n` calls of `call(i)` at once; once the node is full and every call has been
    answered busy or admitted, open the gate. Returns each call's text or exception."""
    outcomes: list = []

    async def one(i):
        try:
            outcomes.append(await call(i))
        except Exception as exc:  # collected and checked by type below
            outcomes.append(exc)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
            await until(lambda: full(daemon) and len(outcomes) == n - RUNNING - QUEUED,
                        show=lambda: f"{daemon.admission!r}, {len(outcomes)} outcomes: {outcomes[:3]!r}")
            gate.open()
    finally:
        gate.open()  # on failure too: nothing may stay parked at the gate
    return outcomes


def assert_all_answered_or_busy(outcomes, n, daemon) -> None:
    texts = [o for o in outcomes if isinstance(o, str)]
    busy = [o for o in outcomes if isinstance(o, Busy)]
    others = [o for o in outcomes if not isinstance(o, (str, Busy))]
    assert others == [], f"only answers and Busy, got {others[:3]!r}"
    assert len(texts) == min(n, RUNNING + QUEUED) and len(busy) == max(0, n - RUNNING - QUEUED)
    assert all(b.retry_after > 0 for b in busy)
    assert sorted(texts) == sorted({t for t in texts}), "each request answered once"
    s = daemon.admission.statistics()
    assert (s.peak_in_flight, s.peak_queued) == (RUNNING, QUEUED)
    assert s.refused_busy == len(busy) and (s.in_flight, s.queued) == (0, 0)
    assert not {k: v for k, v in daemon.guard.statistics().refused.items() if k != "internal"}, "no stream reset"


@pytest.fixture
def gate():
    gated = GatedProvider("gate")
    node.register_llm_provider("gate", lambda: gated)
    return gated


@pytest.mark.parametrize("n", [320, 400])
async def test_sync_calls_from_threads_through_the_data_dir_queue_then_busy(tmp_path, gate, n):
    async with running_daemon(tmp_path, **QUIET) as daemon:
        client = node.connect(data_dir=daemon.data_dir.path)
        threads = trio.CapacityLimiter(n)
        try:
            with trio.fail_after(120):
                outcomes = await submit_all(daemon, gate, n, lambda i: trio.to_thread.run_sync(
                    partial(client.generate_text, f"prompt {i}", provider="gate"), limiter=threads,
                    abandon_on_cancel=True))
        finally:
            await trio.to_thread.run_sync(client.close)
        assert_all_answered_or_busy(outcomes, n, daemon)
        assert client.statistics().sessions_opened == 1, "every thread shared one connection"


async def test_async_calls_through_the_data_dir_queue_then_busy(tmp_path, gate):
    n = 400
    async with running_daemon(tmp_path, **QUIET) as daemon:
        async with node.connect(data_dir=daemon.data_dir.path) as client:
            with trio.fail_after(120):
                outcomes = await submit_all(daemon, gate, n, lambda i: client.agenerate_text(
                    f"prompt {i}", provider="gate"))
            assert client.statistics().sessions_opened == 1, "one connection for the loop"
        assert_all_answered_or_busy(outcomes, n, daemon)


@pytest.mark.parametrize("n", [320, 400])
async def test_a_cluster_member_through_peer_queues_then_hears_busy(tmp_path, gate, n):
    key = tmp_path / "swarm.key"
    key.write_text(make_swarm_key())
    async with running_daemon(tmp_path, ACCELMESH_CLUSTER_KEY=str(key), **QUIET) as daemon:
        async with node.connect(peer=daemon.addrs()[0], cluster_key=key) as client:
            with trio.fail_after(120):
                outcomes = await submit_all(daemon, gate, n, lambda i: client.agenerate_text(
                    f"prompt {i}", provider="gate"))
        assert_all_answered_or_busy(outcomes, n, daemon)


async def test_a_stranger_on_an_open_node_still_meets_the_stranger_limits(tmp_path, gate):
    limit = 64  # limits.max_streams_per_protocol: one stranger's inference streams at once
    async with running_daemon(tmp_path, ACCELMESH_OPEN="1", **QUIET) as daemon:
        async with node.connect(peer=daemon.addrs()[0]) as stranger:
            outcomes: list = []

            async def one(i):
                try:
                    outcomes.append(await stranger.agenerate_text(f"prompt {i}", provider="gate"))
                except Exception as exc:  # the refused ones; checked below
                    outcomes.append(exc)

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for i in range(limit + 6):
                        nursery.start_soon(one, i)
                    await until(lambda: daemon.guard.statistics().refused.get("too_many_streams_protocol", 0) >= 1
                                and gate.waiting == limit)
                    gate.open()
        refused = daemon.guard.statistics().refused
        assert refused.get("too_many_streams_protocol", 0) >= 1
        assert daemon.admission.statistics().peak_in_flight == limit, "never more than its 64 streams at once"
        assert sum(isinstance(o, str) for o in outcomes) >= limit


async def test_members_are_not_held_to_the_stranger_request_rate(tmp_path):
    slow = {"ACCELMESH_LIMITS_REQUEST_RATE": "0.01", "ACCELMESH_LIMITS_REQUEST_BURST": "2", **QUIET}
    key = tmp_path / "swarm.key"
    key.write_text(make_swarm_key())
    with trio.fail_after(60):
        async with running_daemon(tmp_path, "member", ACCELMESH_CLUSTER_KEY=str(key), **slow) as daemon:
            async with node.connect(peer=daemon.addrs()[0], cluster_key=key) as member:
                for i in range(6):
                    assert await member.agenerate_text(f"p{i}", provider="echo") == f"echo: p{i}"
            assert daemon.guard.statistics().refused.get("rate_limited", 0) == 0
        async with running_daemon(tmp_path, "open", ACCELMESH_OPEN="1", **slow) as daemon:
            async with node.connect(peer=daemon.addrs()[0]) as stranger:
                answered = 0
                with pytest.raises(Busy, match="request rate"):  # said on its keep-alive stream
                    for i in range(6):
                        await stranger.agenerate_text(f"p{i}", provider="echo", cache="no-cache")
                        answered += 1
            assert answered == 2 and daemon.guard.statistics().refused.get("rate_limited", 0) >= 1


def test_the_mesh_imports_neither_the_router_nor_the_daemon_nor_the_front_door():
    """The mesh is given what it needs (ARCHITECTURE.md section 1): a callable, a read-only view."""
    import ast

    forbidden = {"node.router", "node.daemon", "node.serving"}
    for source in (Path(node.__file__).parent / "mesh").glob("*.py"):
        imported = set()
        for statement in ast.walk(ast.parse(source.read_text())):
            if isinstance(statement, ast.ImportFrom) and statement.module:
                imported.add(statement.module)
                imported.update(f"{statement.module}.{a.name}" for a in statement.names)
            elif isinstance(statement, ast.Import):
                imported.update(a.name for a in statement.names)
        assert not imported & forbidden, (source.name, imported & forbidden)
