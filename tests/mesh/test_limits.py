"""Every limit of the daemon, at the limit and one past it; other peers are served throughout."""

from __future__ import annotations

import dataclasses
import logging

import msgpack
import pytest
import trio
from libp2p.host.exceptions import StreamFailure
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamError

from node.mesh.streams import FramedStream, Refusal, StreamClosedEarly, StreamGuard, StreamLimits, TokenBucket
from protocols.codec import encode
from protocols.framing import encode_frame, encode_varint
from tests.mesh.conftest import caused_by, connect, peer_host, running_daemon

ECHO = "/accelmesh-test/echo/1.0.0"
OTHER = "/accelmesh-test/other/1.0.0"


async def echo_frames(framed: FramedStream, peer: str) -> None:
    while (frame := await framed.read_frame()) is not None:
        await framed.write(encode_frame(frame))


def serve_test_protocols(daemon, max_frame_size=None) -> None:
    for protocol in (ECHO, OTHER):
        daemon.host.set_stream_handler(protocol, daemon.guard.wrap(protocol, echo_frames,
                                                                   max_frame_size=max_frame_size))


class NoAnswer(Exception):
    """The daemon ended the stream without answering.

    How a reset reaches a reader in py-libp2p 0.8.1: yamux forgets a stream as soon as its RST
    arrives (when nothing is left unread), so the next read reports EOF, not StreamReset.
    """


async def roundtrip(stream, payload: bytes = b"ping") -> bytes:
    """Send one frame and read the echo; NoAnswer if the daemon reset the stream instead."""
    framed = FramedStream(stream, StreamLimits(idle_timeout=5))
    await framed.write(encode_frame(payload))
    frame = await framed.read_frame()
    if frame is None:
        raise NoAnswer("stream closed without an answer")
    return frame


async def open_and_check(host, daemon, protocol=ECHO):
    stream = await host.new_stream(ID.from_base58(daemon.peer_id), [protocol])
    assert await roundtrip(stream) == b"ping"
    return stream


async def expect_refused(host, daemon, protocol=ECHO):
    """Open a stream the daemon refuses on sight (a limit): it resets it before reading anything."""
    # Where the reset lands races the client's reader task inside py-libp2p: before the protocol ack
    # is read (new_stream fails), before our write (StreamClosedEarly), or after it (a read sees EOF).
    with pytest.raises((StreamFailure, StreamClosedEarly, NoAnswer)) as info:
        stream = await host.new_stream(ID.from_base58(daemon.peer_id), [protocol])
        await roundtrip(stream)
    if isinstance(info.value, (StreamFailure, StreamClosedEarly)):  # a reset, not e.g. an unknown protocol
        assert caused_by(info.value, StreamReset), repr(info.value)


async def expect_reset(host, daemon, protocol=ECHO, payload=b"ping"):
    """Open a stream and send `payload`: the daemon reads it, then resets the stream unanswered."""
    stream = await host.new_stream(ID.from_base58(daemon.peer_id), [protocol])  # nothing refused yet
    with pytest.raises(NoAnswer):
        await roundtrip(stream, payload)


async def test_streams_per_peer_at_the_limit_and_one_past_it(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_MAX_STREAMS_PER_PEER="3") as daemon, \
            peer_host() as alice, peer_host() as bob:
        serve_test_protocols(daemon)
        await connect(alice, daemon), await connect(bob, daemon)
        with trio.fail_after(20):
            held = [await open_and_check(alice, daemon, p) for p in (ECHO, ECHO, OTHER)]  # 3: at the limit
            await expect_refused(alice, daemon)  # the 4th
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
            await expect_refused(alice, daemon)
            assert daemon.guard.refused["too_many_streams_protocol"] == 1
            await open_and_check(alice, daemon, OTHER)  # another protocol still has room


async def test_request_rate_at_the_burst_and_one_past_it(tmp_path):
    # An open node: its peers are strangers (on a loopback node without --open every peer is a
    # member, and members are not rate limited: test_members_are_not_held_to_the_stranger_rate).
    async with running_daemon(tmp_path, ACCELMESH_OPEN="1", ACCELMESH_LIMITS_REQUEST_RATE="0.01",
                              ACCELMESH_LIMITS_REQUEST_BURST="4") as daemon, \
            peer_host() as alice, peer_host() as bob:
        serve_test_protocols(daemon)
        await connect(alice, daemon), await connect(bob, daemon)
        with trio.fail_after(20):
            for _ in range(4):
                await (await open_and_check(alice, daemon)).close()
            await expect_refused(alice, daemon)
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
            await trio.sleep(1.0)  # past it: the reset has long arrived, so our write fails first
            with pytest.raises(StreamClosedEarly, match="^StreamReset"):
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
                    # one past the limit: carol has no connection (a failed dial, a negative-cache hit,
                    # or "No valid connections" after the drop: each a SwarmException)
                    with pytest.raises(SwarmException):
                        await carol.new_stream(ID.from_base58(daemon.peer_id), [ECHO])
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


# -- the stream guard's bookkeeping (pure) -------------------------------------------------------------


def test_a_stream_refused_for_its_count_costs_no_rate_token():
    now = [0.0]
    guard = StreamGuard(StreamLimits(max_streams_per_peer=1, request_rate=0.001, request_burst=2),
                        clock=lambda: now[0])
    guard.admit("p", ECHO)  # token 1 of 2
    for _ in range(5):  # over the stream count: refused for that, and for nothing else
        with pytest.raises(Refusal) as info:
            guard.admit("p", OTHER)
        assert info.value.reason == "too_many_streams_peer"
    guard.release("p", ECHO)
    guard.admit("p", ECHO)  # token 2: the five refusals spent none
    guard.release("p", ECHO)
    with pytest.raises(Refusal) as info:
        guard.admit("p", ECHO)
    assert info.value.reason == "rate_limited"


def test_a_stream_refused_for_its_protocol_count_costs_no_rate_token():
    guard = StreamGuard(StreamLimits(max_streams_per_protocol=1, request_rate=0.001, request_burst=2),
                        clock=lambda: 0.0)
    guard.admit("p", ECHO)
    for _ in range(3):
        with pytest.raises(Refusal, match="too_many_streams_protocol"):
            guard.admit("p", ECHO)
    guard.admit("p", OTHER)  # the second token is still there


def test_a_member_may_open_member_streams_on_an_admitted_protocol_outside_its_peer_count():
    limits = StreamLimits(max_streams_per_peer=2, max_streams_per_protocol=1, request_rate=0.001, request_burst=1,
                          member_streams=4)
    guard = StreamGuard(limits, clock=lambda: 0.0, is_member=lambda peer: peer == "member")
    counted = [guard.admit("member", ECHO, admitted=True) for _ in range(4)]  # at member_streams
    assert counted == [False] * 4, "admitted streams do not count toward the per-peer limit"
    with pytest.raises(Refusal, match="too_many_streams_protocol"):
        guard.admit("member", ECHO, admitted=True)  # one past it
    assert guard.admit("member", OTHER) and guard.admit("member", OTHER + "/2")  # its per-peer 2, no rate
    with pytest.raises(Refusal, match="too_many_streams_peer"):
        guard.admit("member", OTHER + "/3")
    guard.admit("stranger", ECHO, admitted=True)  # a stranger: max_streams_per_protocol, and the rate
    with pytest.raises(Refusal, match="too_many_streams_protocol"):
        guard.admit("stranger", ECHO, admitted=True)


def test_the_idle_sweep_never_forgets_a_member_with_streams_open():
    guard = StreamGuard(StreamLimits(max_streams_per_protocol=1, member_streams=4), clock=lambda: 0.0,
                        is_member=lambda peer: True)
    for _ in range(4):
        guard.admit("member", ECHO, admitted=True)
    guard.forget_idle_peers()  # the member's streams are outside its per-peer count, not gone
    assert guard.open_streams("member") == 4 == guard.statistics().open_streams
    with pytest.raises(Refusal, match="too_many_streams_protocol"):
        guard.admit("member", ECHO, admitted=True)
    for _ in range(4):
        guard.release("member", ECHO, counted=False)
    guard.forget_idle_peers()
    assert guard.statistics().peers == 0


def test_the_token_bucket_sustains_its_rate_after_the_burst():
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(10)) == 5  # the burst at once, then nothing
    granted = sum(bucket.take(i * 0.01) for i in range(1, 1001))  # trying every 10 ms for 10 s
    assert 99 <= granted <= 100, granted  # 10 per second, sustained
    assert not bucket.take(10.0)
    assert sum(bucket.take(1000.0) for _ in range(10)) == 5  # a long idle refills only up to the burst


async def test_an_over_limit_refusal_is_logged_with_its_typed_reason(tmp_path, caplog):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_MAX_STREAMS_PER_PROTOCOL="1") as daemon, \
            peer_host() as alice:
        serve_test_protocols(daemon)
        await connect(alice, daemon)
        with caplog.at_level(logging.WARNING, logger="node.mesh.streams"), trio.fail_after(20):
            await open_and_check(alice, daemon)
            await expect_refused(alice, daemon)
        (record,) = [r for r in caplog.records if r.name == "node.mesh.streams" and getattr(r, "reason", None)]
        assert record.levelno == logging.WARNING
        assert (record.reason, record.peer, record.protocol) == ("too_many_streams_protocol", str(alice.get_id()), ECHO)
        assert "too_many_streams_protocol" in record.getMessage() and str(alice.get_id()) in record.getMessage()


# -- protocol negotiation (whole seconds in py-libp2p) -------------------------------------------------


async def negotiate_late(host, daemon, delay: float):
    """Open a bare muxer stream, stay silent `delay` seconds, then negotiate ECHO and do one round trip."""
    from libp2p.protocol_muxer.multiselect_client import MultiselectClient
    from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator

    conn = host.get_network().connections[ID.from_base58(daemon.peer_id)][0]
    raw = await conn.muxed_conn.open_stream()  # the daemon's negotiation clock starts now
    await trio.sleep(delay)
    assert await MultiselectClient().select_one_of([ECHO], MultiselectCommunicator(raw), 5) == ECHO
    return await roundtrip(raw)


async def test_a_stream_negotiating_just_inside_negotiate_timeout_is_served(tmp_path):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_NEGOTIATE_TIMEOUT="2") as daemon, peer_host() as alice:
        serve_test_protocols(daemon)
        await connect(alice, daemon)
        with trio.fail_after(10):
            assert await negotiate_late(alice, daemon, 1.5) == b"ping"  # inside 2 s
            with pytest.raises(MuxedStreamError, match="Stream is closed"):  # a raw yamux stream: no NetStream
                await negotiate_late(alice, daemon, 2.5)  # past it: reset before our first write


async def test_a_fractional_negotiate_timeout_is_rounded_up_not_truncated(tmp_path):
    # py-libp2p truncates the timeout to whole seconds (0.5 became 0 and every stream failed;
    # the setting's minimum is now 1): 2.5 must mean 3 s, not 2 s.
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_NEGOTIATE_TIMEOUT="2.5") as daemon, \
            peer_host() as mallory, peer_host() as bob:
        serve_test_protocols(daemon)
        await connect(mallory, daemon), await connect(bob, daemon)
        with trio.fail_after(20):
            await open_and_check(bob, daemon)  # streams work
            assert await negotiate_late(bob, daemon, 2.3) == b"ping"  # 2.5 means 3 s (truncated: 2 s)
            conn = mallory.get_network().connections[ID.from_base58(daemon.peer_id)][0]
            raw = await conn.muxed_conn.open_stream()  # and a stream that never negotiates is still cut off
            start = trio.current_time()
            try:
                while await raw.read(100):
                    pass
            except Exception:
                pass
            assert 2.4 <= trio.current_time() - start < 8.0


# -- the frame-size setting reaches the daemon's own handlers -------------------------------------------


FRAME_LIMIT = 2048  # limits.max_frame_size for these tests (its minimum is 1024)


def padded(message, size: int) -> bytes:
    """`message` encoded, with an unknown field (ignored by receivers) padding it to exactly `size` bytes."""
    fields = msgpack.unpackb(encode(message))
    for n in range(size, 0, -1):
        data = msgpack.packb({**fields, "zz": "x" * n})
        if len(data) == size:
            return data
    raise AssertionError(f"cannot pad to {size}")


def request_of_size(size: int):
    from protocols.inference.messages import Request

    base = Request(id="big", task="generate", prompt="", provider="echo", timeout_ms=10_000)
    for n in range(size - len(encode(base)) - 4, size):
        request = dataclasses.replace(base, prompt="x" * n)
        if len(encode(request)) == size:
            return request
    raise AssertionError(f"no request of {size} bytes")


async def test_the_max_frame_size_setting_reaches_the_advert_handler(tmp_path):
    from protocols.advert.messages import MAX_ADVERT_BYTES, PROTOCOL_ID as ADVERT, GetAdvert, decode_advert

    async with running_daemon(tmp_path, ACCELMESH_LIMITS_MAX_FRAME_SIZE=str(FRAME_LIMIT)) as daemon, \
            peer_host() as alice:
        await connect(alice, daemon)
        with trio.fail_after(20):
            stream = await alice.new_stream(ID.from_base58(daemon.peer_id), [ADVERT])
            framed = FramedStream(stream, StreamLimits(idle_timeout=5), MAX_ADVERT_BYTES)
            await framed.write(encode_frame(padded(GetAdvert(known=True), FRAME_LIMIT)))  # at the limit
            advert, _ = decode_advert(await framed.read_frame())
            assert advert.peer_id == daemon.peer_id
            await expect_reset(alice, daemon, ADVERT, payload=padded(GetAdvert(known=True), FRAME_LIMIT + 1))
        assert daemon.guard.refused["protocol_error"] == 1


async def control_generate(host, daemon, request):
    from protocols.control.messages import PROTOCOL_ID as CONTROL
    from protocols.inference.machine import InferenceStream, Role
    from protocols.inference.messages import Result

    stream = await host.new_stream(ID.from_base58(daemon.peer_id), [CONTROL])
    framed = FramedStream(stream, StreamLimits(idle_timeout=10), decoder=InferenceStream(Role.CLIENT))
    await framed.write(framed.decoder.send(request))
    text = []
    while not isinstance(event := await framed.read_event(), Result):
        if event is None:
            raise NoAnswer("the daemon closed the stream without a result")
        text.append(event.text)
    return "".join(text)


async def test_the_max_frame_size_setting_reaches_the_control_handler(tmp_path, client_identity):
    async with running_daemon(tmp_path, ACCELMESH_LIMITS_MAX_FRAME_SIZE=str(FRAME_LIMIT)) as daemon, \
            peer_host(client_identity(daemon)) as client:
        await connect(client, daemon)
        with trio.fail_after(20):
            at_limit = request_of_size(FRAME_LIMIT)
            assert await control_generate(client, daemon, at_limit) == "echo: " + at_limit.prompt
            with pytest.raises(NoAnswer):
                await control_generate(client, daemon, request_of_size(FRAME_LIMIT + 1))
        assert daemon.guard.refused["protocol_error"] == 1


async def test_the_max_frame_size_setting_reaches_the_inference_handler(tmp_path):
    from protocols.inference.machine import InferenceStream, Role
    from protocols.inference.messages import PROTOCOL_ID as INFER
    from protocols.inference.messages import Result

    async def generate(request):
        stream = await alice.new_stream(ID.from_base58(daemon.peer_id), [INFER])
        framed = FramedStream(stream, StreamLimits(idle_timeout=10), decoder=InferenceStream(Role.CLIENT))
        await framed.write(framed.decoder.send(request))
        while not isinstance(event := await framed.read_event(), Result):
            if event is None:
                raise NoAnswer("the daemon closed the stream without a result")
        return event

    async with running_daemon(tmp_path, ACCELMESH_LIMITS_MAX_FRAME_SIZE=str(FRAME_LIMIT)) as daemon, \
            peer_host() as alice:
        await connect(alice, daemon)
        with trio.fail_after(20):
            assert (await generate(request_of_size(FRAME_LIMIT))).verify()["text"].startswith("echo: x")
            with pytest.raises(NoAnswer):
                await generate(request_of_size(FRAME_LIMIT + 1))
        assert daemon.guard.refused["protocol_error"] == 1
