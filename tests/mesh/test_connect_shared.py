"""`node.connect()`'s Client: one shared connection per trio loop, opened once, reopened when broken."""

from __future__ import annotations

import logging
import threading

import pytest
import trio
from libp2p.peer.id import ID

import node
from node.errors import DaemonError
from protocols.records import Identity
from tests.mesh.conftest import running_daemon

QUIET = {"ACCELMESH_ADVERTS_INTERVAL": "60"}
SLOW_ECHO = {"ACCELMESH_ECHO_LATENCY_MS": "200", **QUIET}  # every call is still running when the last one starts
CALLS = 50  # below the daemon's 64 inbound streams per peer per protocol


async def ask_concurrently(client: node.Client, n: int = CALLS) -> dict[int, str]:
    answers: dict[int, str] = {}

    async def ask(i: int) -> None:
        answers[i] = await client.agenerate_text(f"hi {i}", provider="echo")

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(ask, i)
    return answers


def connections_from(daemon, peer_id: str) -> int:
    return len(daemon.host.get_network().connections.get(ID.from_base58(peer_id), []))


async def until(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_fifty_concurrent_calls_to_the_local_daemon_open_exactly_one_connection(tmp_path, client_identity):
    with trio.fail_after(60):
        async with running_daemon(tmp_path, "alice", **SLOW_ECHO) as alice:
            async with node.connect(data_dir=alice.data_dir.path) as client:
                assert await ask_concurrently(client) == {i: f"echo: hi {i}" for i in range(CALLS)}
                stats = client.statistics()
                assert (stats.sessions_opened, stats.sessions_open, stats.connect_failures) == (1, 1, 0)
                assert stats.calls_in_flight == 0
                assert connections_from(alice, client_identity(alice).peer_id) == 1
                assert await client.agenerate_text("later", provider="echo") == "echo: later"
                assert client.statistics().sessions_opened == 1, "a later call reuses the connection"
            assert client.statistics().sessions_open == 0, "aclose() (async with) closed it"
            await until(lambda: connections_from(alice, client_identity(alice).peer_id) == 0)
            assert alice.info()["stats"]["inferences"] == CALLS + 1


async def test_fifty_concurrent_calls_from_a_client_peer_open_exactly_one_connection(tmp_path):
    bob = Identity.generate()  # a client peer with a known identity, so alice's side can be counted too
    with trio.fail_after(60):
        async with running_daemon(tmp_path, "alice", **SLOW_ECHO) as alice:
            client = node.connect(peer=alice.addrs()[0], identity=bob)
            try:
                assert await ask_concurrently(client) == {i: f"echo: hi {i}" for i in range(CALLS)}
                assert [c async for c in client.astream_text("one two", provider="echo")] == ["echo:", " one", " two"]
                stats = client.statistics()
                assert (stats.sessions_opened, stats.sessions_open, stats.calls_in_flight) == (1, 1, 0)
                assert connections_from(alice, bob.peer_id) == 1
            finally:
                await client.aclose()
            assert client.statistics().sessions_open == 0
            await until(lambda: connections_from(alice, bob.peer_id) == 0)


async def test_after_the_daemon_restarts_on_its_data_dir_the_next_call_reconnects(tmp_path):
    with trio.fail_after(60):
        async with running_daemon(tmp_path, "alice", **QUIET) as alice:
            client = node.connect(data_dir=alice.data_dir.path)
            assert await client.agenerate_text("before", provider="echo") == "echo: before"
        async with running_daemon(tmp_path, "alice", **QUIET) as again:  # same identity, another port
            assert again.addrs() != alice.addrs()
            assert await ask_concurrently(client, 10) == {i: f"echo: hi {i}" for i in range(10)}
            stats = client.statistics()
            assert (stats.sessions_opened, stats.sessions_open, stats.sessions_dropped) == (2, 1, 1)
            await client.aclose()
        assert client.statistics().sessions_open == 0


async def test_without_a_daemon_every_waiting_call_gets_the_one_connect_error_and_the_next_call_retries(tmp_path):
    client = node.connect(data_dir=tmp_path / "nobody")
    failures: list[BaseException] = []

    async def ask() -> None:
        try:
            await client.agenerate_text("hi", provider="echo")
        except DaemonError as exc:
            failures.append(exc)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(ask)
        assert len(failures) == 10 and len({id(exc) for exc in failures}) == 10, "each call raises its own copy"
        assert len({str(exc) for exc in failures}) == 1
        stats = client.statistics()
        assert (stats.connect_failures, stats.sessions_opened, stats.sessions_open) == (1, 0, 0)
        async with running_daemon(tmp_path, "nobody", **QUIET):  # the daemon comes up: the next call connects
            assert await client.agenerate_text("now", provider="echo") == "echo: now"
            assert client.statistics().sessions_opened == 1
            await client.aclose()


async def test_a_loop_that_ends_closes_its_connection_quietly(tmp_path, caplog, client_identity):
    caplog.set_level(logging.WARNING)
    with trio.fail_after(60):
        async with running_daemon(tmp_path, "alice", **QUIET) as alice:
            client = node.connect(data_dir=alice.data_dir.path)
            loop_thread: list[str] = []  # what the client logs runs there; the daemon logs in this one

            async def calls_then_ends() -> list[str]:
                loop_thread.append(threading.current_thread().name)
                answers = [await client.agenerate_text(f"x{i}", provider="echo") for i in range(3)]
                assert client.statistics().sessions_open == 1
                return answers

            answers = await trio.to_thread.run_sync(trio.run, calls_then_ends)
            assert answers == ["echo: x0", "echo: x1", "echo: x2"]
            stats = client.statistics()
            assert (stats.sessions_opened, stats.sessions_open) == (1, 0), "the loop's end closed it"
            await until(lambda: connections_from(alice, client_identity(alice).peer_id) == 0)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and r.threadName in loop_thread]
    assert noisy == [], [r.getMessage() for r in noisy]


async def test_blocking_calls_in_threads_share_the_portal_connection_and_close_ends_it(tmp_path):
    with trio.fail_after(60):
        async with running_daemon(tmp_path, "alice", **QUIET) as alice:
            client = node.connect(data_dir=alice.data_dir.path)
            answers: dict[int, str] = {}

            def blocking(i: int) -> None:
                answers[i] = client.generate_text(f"t{i}", provider="echo")

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(trio.to_thread.run_sync, blocking, i)
            assert answers == {i: f"echo: t{i}" for i in range(8)}
            assert await client.agenerate_text("async", provider="echo") == "echo: async"
            stats = client.statistics()
            assert (stats.sessions_opened, stats.sessions_open) == (2, 2), "one for the threads, one for this loop"
            await trio.to_thread.run_sync(client.close)  # waits for the portal's; asks this loop's to close
            await until(lambda: client.statistics().sessions_open == 0)
            assert await client.agenerate_text("again", provider="echo") == "echo: again"
            assert client.statistics().sessions_opened == 3, "a closed Client connects again when used"
            await client.aclose()


async def test_a_broken_session_is_dropped_and_reopened_without_failing_the_call(tmp_path):
    async with running_daemon(tmp_path, "alice", **QUIET) as alice:
        client = node.connect(peer=alice.addrs()[0])
        with trio.fail_after(30):
            assert await client.agenerate_text("one", provider="echo") == "echo: one"
            (peer,) = alice.host.get_network().connections  # alice hangs up on the client
            await alice.host.disconnect(peer)
            assert await client.agenerate_text("two", provider="echo") == "echo: two"
            stats = client.statistics()
            assert (stats.sessions_opened, stats.sessions_open, stats.sessions_dropped) == (2, 1, 1)
            await client.aclose()


async def test_calls_cut_off_before_their_first_chunk_are_retried_once_on_a_new_connection(tmp_path):
    bob = Identity.generate()
    async with running_daemon(tmp_path, "alice", ACCELMESH_ECHO_LATENCY_MS="1000", **QUIET) as alice:
        client = node.connect(peer=alice.addrs()[0], identity=bob)
        answers: dict[int, str] = {}

        async def ask_ten() -> None:
            answers.update(await ask_concurrently(client, 10))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_ten)
                await until(lambda: alice.admission.in_flight == 10)  # all asked, no chunk sent yet
                await alice.host.disconnect(ID.from_base58(bob.peer_id))  # alice hangs up mid-request
            assert answers == {i: f"echo: hi {i}" for i in range(10)}, "every call was retried and answered"
            stats = client.statistics()
            assert (stats.sessions_opened, stats.sessions_open, stats.sessions_dropped) == (2, 1, 1)
            assert alice.info()["stats"]["inferences"] >= 10
            await client.aclose()


async def test_a_daemon_that_refuses_the_client_is_a_daemon_error_after_two_connects_not_a_loop(tmp_path):
    carol = Identity.generate()  # alice allows only carol; mallory's connection is closed after Noise
    async with running_daemon(tmp_path, "alice", ACCELMESH_ALLOW=carol.peer_id, **QUIET) as alice:
        client = node.connect(peer=alice.addrs()[0], identity=Identity.generate())
        with trio.fail_after(30):
            with pytest.raises(DaemonError, match="the connection closed at once"):
                await client.agenerate_text("let me in", provider="echo")
            assert client.statistics().sessions_opened == 2
            await client.aclose()
            assert client.statistics().sessions_open == 0
