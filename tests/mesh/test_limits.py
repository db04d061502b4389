"""Every limit of the daemon, at the limit and one past it; other peers are served throughout."""

from __future__ import annotations

import pytest
import trio
from libp2p.peer.id import ID

from node.mesh.streams import FramedStream, StreamLimits
from protocols.framing import encode_frame, encode_varint
from tests.mesh.conftest import connect, peer_host, running_daemon

ECHO = "/accelmesh-test/echo/1.0.0"
OTHER = "/accelmesh-test/other/1.0.0"


async def echo_frames(framed: FramedStream, peer: str) -> None:
    while (frame := await framed.read_frame()) is not None:
        await framed.write(encode_frame(frame))


def serve_test_protocols(daemon, max_frame_size=None) -> None:
    for protocol in (ECHO, OTHER):
        daemon.host.set_stream_handler(protocol, daemon.guard.wrap(protocol, echo_frames,
                                                                   max_frame_size=max_frame_size))


async def roundtrip(stream, payload: bytes = b"ping") -> bytes:
    """Send one frame and read the echo; raises if the daemon reset the stream."""
    framed = FramedStream(stream, StreamLimits(idle_timeout=5))
    await framed.write(encode_frame(payload))
    frame = await framed.read_frame()
    if frame is None:
        raise ConnectionError("stream closed without an answer")
    return frame


async def open_and_check(host, daemon, protocol=ECHO):
    stream = await host.new_stream(ID.from_base58(daemon.peer_id), [protocol])
    assert await roundtrip(stream) == b"ping"
    return stream


async def expect_reset(host, daemon, protocol=ECHO, payload=b"ping"):
    with pytest.raises(Exception):
        stream = await host.new_stream(ID.from_base58(daemon.peer_id), [protocol])
        await roundtrip(stream, payload)


async def test_streams_per_peer_at_the_limit_and_one_past_it(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_MAX_STREAMS_PER_PEER="3") as daemon, \
            peer_host() as alice, peer_host() as bob:
        serve_test_protocols(daemon)
        await connect(alice, daemon), await connect(bob, daemon)
        with trio.fail_after(20):
            held = [await open_and_check(alice, daemon, p) for p in (ECHO, ECHO, OTHER)]  # 3: at the limit
            await expect_reset(alice, daemon)  # the 4th
            assert daemon.guard.refused["too_many_streams_peer"] == 1
            await open_and_check(bob, daemon)  # another peer is served normally
            await held[0].close()
            await trio.sleep(0.2)
            await open_and_check(alice, daemon)  # a slot freed up


async def test_streams_per_protocol_at_the_limit_and_one_past_it(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_MAX_STREAMS_PER_PROTOCOL="2") as daemon, \
            peer_host() as alice:
        serve_test_protocols(daemon)
        await connect(alice, daemon)
        with trio.fail_after(20):
            await open_and_check(alice, daemon), await open_and_check(alice, daemon)
            await expect_reset(alice, daemon)
            assert daemon.guard.refused["too_many_streams_protocol"] == 1
            await open_and_check(alice, daemon, OTHER)  # another protocol still has room


async def test_request_rate_at_the_burst_and_one_past_it(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_REQUEST_RATE="0.01",
                              ACCELMESH_LIMITS_REQUEST_BURST="4") as daemon, \
            peer_host() as alice, peer_host() as bob:
        serve_test_protocols(daemon)
        await connect(alice, daemon), await connect(bob, daemon)
        with trio.fail_after(20):
            for _ in range(4):
                await (await open_and_check(alice, daemon)).close()
            await expect_reset(alice, daemon)
            assert daemon.guard.refused["rate_limited"] == 1
            await open_and_check(bob, daemon)


async def test_frame_size_at_the_limit_and_one_past_it(tmp_path):
    async with running_daemon(tmp_path) as daemon, peer_host() as alice:
        serve_test_protocols(daemon, max_frame_size=1000)
        await connect(alice, daemon)
        with trio.fail_after(20):
            stream = await alice.new_stream(ID.from_base58(daemon.peer_id), [ECHO])
            assert await roundtrip(stream, b"x" * 1000) == b"x" * 1000
            await expect_reset(alice, daemon, payload=b"x" * 1001)
            assert daemon.guard.refused["protocol_error"] == 1


async def test_a_trickling_peer_is_cut_off_at_frame_timeout_without_slowing_others(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_FRAME_TIMEOUT="1.0") as daemon, \
            peer_host() as mallory, peer_host() as bob:
        serve_test_protocols(daemon)
        await connect(mallory, daemon), await connect(bob, daemon)
        cut_after = None
        served = []

        async def trickle():
            nonlocal cut_after
            stream = await mallory.new_stream(ID.from_base58(daemon.peer_id), [ECHO])
            start = trio.current_time()
            await stream.write(encode_varint(20))
            try:
                for _ in range(20):  # one byte every 0.3 s: the frame would take 6 s
                    await trio.sleep(0.3)
                    await stream.write(b"x")
                await stream.read(100)
            except Exception:
                cut_after = trio.current_time() - start

        async def normal():
            for _ in range(5):
                served.append(await roundtrip(await bob.new_stream(ID.from_base58(daemon.peer_id), [ECHO])))
                await trio.sleep(0.2)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                nursery.start_soon(normal)
        assert cut_after is not None and cut_after < 3.0, cut_after
        assert daemon.guard.refused["frame_timeout"] == 1 and served == [b"ping"] * 5


async def test_a_frame_completed_within_frame_timeout_is_served(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_FRAME_TIMEOUT="2.0") as daemon, peer_host() as alice:
        serve_test_protocols(daemon)
        await connect(alice, daemon)
        with trio.fail_after(20):
            stream = await alice.new_stream(ID.from_base58(daemon.peer_id), [ECHO])
            await stream.write(encode_varint(3) + b"a")
            await trio.sleep(0.8)  # slow, but inside the limit
            await stream.write(b"bc")
            framed = FramedStream(stream, StreamLimits())
            assert await framed.read_frame() == b"abc"


async def test_idle_stream_is_reset_after_idle_timeout(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_IDLE_TIMEOUT="0.5") as daemon, peer_host() as alice:
        serve_test_protocols(daemon)
        await connect(alice, daemon)
        with trio.fail_after(20):
            stream = await alice.new_stream(ID.from_base58(daemon.peer_id), [ECHO])
            await roundtrip(stream)
            await trio.sleep(0.3)  # under the idle limit: still open
            assert await roundtrip(stream) == b"ping"
            await trio.sleep(1.0)  # past it
            with pytest.raises(Exception):
                await roundtrip(stream)
        assert daemon.guard.refused["idle_timeout"] == 1


async def test_total_connections_at_the_limit_and_one_past_it(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_MAX_CONNECTIONS="2") as daemon:
        serve_test_protocols(daemon)
        async with peer_host() as bob, peer_host() as carol:
            with trio.fail_after(30):
                async with peer_host() as alice:
                    for peer in (alice, bob):
                        await connect(peer, daemon)
                        await open_and_check(peer, daemon)
                    try:
                        await connect(carol, daemon)
                    except Exception:
                        pass  # refused at dial, or dropped right after the handshake: both fine
                    await trio.sleep(0.3)
                    await expect_reset(carol, daemon)  # one past the limit
                    await open_and_check(alice, daemon)  # the admitted peers are unaffected
                # alice leaves: a newcomer now fits, so the refusal above was the limit and nothing else
                while len(daemon.host.get_network().connections) >= 2:
                    await trio.sleep(0.05)
                async with peer_host() as dave:  # (carol's own dialer remembers its failure for a while)
                    await connect(dave, daemon)
                    await open_and_check(dave, daemon)


async def test_peers_that_come_and_go_do_not_use_up_the_connection_limit(tmp_path):
    # Regression: py-libp2p 0.8.1 kept one inbound slot per connection until the swarm stopped,
    # so a daemon refused everyone after max_connections connections in its lifetime.
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_MAX_CONNECTIONS="2") as daemon:
        serve_test_protocols(daemon)
        with trio.fail_after(60):
            for _ in range(6):
                async with peer_host() as visitor:
                    await connect(visitor, daemon)
                    await open_and_check(visitor, daemon)
                while daemon.host.get_network().connections:
                    await trio.sleep(0.05)


async def test_a_stream_that_never_negotiates_its_protocol_is_reset_after_negotiate_timeout(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_NEGOTIATE_TIMEOUT="1") as daemon, \
            peer_host() as mallory, peer_host() as bob:
        serve_test_protocols(daemon)
        await connect(mallory, daemon), await connect(bob, daemon)
        conn = mallory.get_network().connections[ID.from_base58(daemon.peer_id)][0]
        raw = await conn.muxed_conn.open_stream()  # a yamux stream with no multistream-select at all
        start = trio.current_time()
        with trio.fail_after(10):
            await open_and_check(bob, daemon)  # others are served while mallory stalls
            try:
                while await raw.read(100):
                    pass
            except Exception:
                pass  # reset: what we expect
        elapsed = trio.current_time() - start
        assert 0.9 <= elapsed < 5.0, elapsed


BROKEN = "/accelmesh-test/broken/1.0.0"


async def broken_handler(framed: FramedStream, peer: str) -> None:
    """A handler with a bug, failing the way a nursery does: an exception group."""
    await framed.read_frame()
    raise ExceptionGroup("a bug", [KeyError("missing")])


async def test_a_bug_in_a_handler_resets_that_stream_and_the_node_keeps_serving(tmp_path):
    async with running_daemon(tmp_path) as daemon, peer_host() as alice:
        serve_test_protocols(daemon)
        daemon.host.set_stream_handler(BROKEN, daemon.guard.wrap(BROKEN, broken_handler))
        await connect(alice, daemon)
        with trio.fail_after(20):
            for _ in range(3):
                await expect_reset(alice, daemon, BROKEN)
            await open_and_check(alice, daemon)  # same connection, other streams: fine
        assert daemon.guard.refused["internal"] == 3
        assert len(alice.get_network().connections) == 1, "the connection survived"
