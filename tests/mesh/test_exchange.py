"""The cache block exchange between real libp2p hosts on loopback: a block arrives verified or not at all.

alice holds blocks in a real LocalStore and serves them through a StreamGuard; bob asks; mallory
holds lies (bytes that do not match their CID, answers for another block).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID

from node.cache.exchange import MAX_GET_FRAME_SIZE, PROTOCOL_ID, BlockExchange, ExchangeStatistics, fetch_block
from node.cache.store import LocalStore
from node.errors import InvalidRequest, ProviderFailed, ProviderTimeout
from node.mesh.errors import PeerUnreachable
from node.mesh.host import HostConfig, make_host, peer_info, run_host
from node.mesh.streams import FramedStream, StreamClosedEarly, StreamGuard, StreamLimits
from protocols.cache.messages import MAX_BLOCK_BYTES, Found, Get, NotFound
from protocols.cid import cid_of
from protocols.codec import decode, encode, pack
from protocols.framing import encode_frame
from protocols.records import Identity
from tests.mesh.conftest import LOOPBACK, peer_host

LIMITS = StreamLimits()
BLOCK = b'{"text": "echo: hi"}'
ABSENT = cid_of(b"a block nobody stored")


@dataclass
class Holder:
    host: Any
    peer_id: str
    guard: StreamGuard
    exchange: BlockExchange


@asynccontextmanager
async def holder(get_block: Callable[[str], bytes | None] | None = None, *,
                 handler: Callable[[FramedStream, str], Awaitable[None]] | None = None,
                 allowed: Callable[[str], bool] | None = None) -> AsyncIterator[Holder]:
    """A listening host serving the exchange behind a StreamGuard (or `handler` in its place)."""
    host = make_host(HostConfig(identity=Identity.generate(), listen=(LOOPBACK,)))
    guard = StreamGuard(LIMITS)
    exchange = BlockExchange(host, LIMITS, get_block or (lambda cid: None))
    async with run_host(host, [LOOPBACK]):
        host.set_stream_handler(PROTOCOL_ID, guard.wrap(PROTOCOL_ID, handler or exchange.handler, allowed=allowed))
        yield Holder(host, str(host.get_id()), guard, exchange)


@asynccontextmanager
async def asker(to: Holder, **options: Any) -> AsyncIterator[BlockExchange]:
    """bob: a host connected to the holder, with his own exchange (nothing to serve)."""
    async with peer_host() as host:
        await host.connect(peer_info(str(to.host.get_addrs()[0])))
        yield BlockExchange(host, LIMITS, lambda cid: None, **options)


@pytest.fixture
def store(tmp_path: Path):
    store = LocalStore(tmp_path / "alice" / "store.db")
    yield store
    store.close()


async def test_a_stored_block_arrives_verified_and_both_sides_count_it(store):
    cid = cid_of(BLOCK)
    store.put(None, BLOCK, cid)
    with trio.fail_after(20):
        async with holder(store.get_block) as alice, asker(alice) as bob:
            assert await bob.fetch(alice.peer_id, cid) == BLOCK  # the (peer, cid) shape ClusterCache calls
    assert alice.exchange.statistics() == ExchangeStatistics(
        served=1, not_found=0, fetched=0, fetch_not_found=0, fetch_failures=0, bytes_in=0, bytes_out=len(BLOCK))
    assert bob.statistics() == ExchangeStatistics(
        served=0, not_found=0, fetched=1, fetch_not_found=0, fetch_failures=0, bytes_in=len(BLOCK), bytes_out=0)
    assert bob.statistics().to_json()["bytes_in"] == len(BLOCK)
    assert alice.guard.statistics().served == 1 and not alice.guard.statistics().refused
    assert "fetched=1" in repr(bob)


async def test_a_block_the_holder_does_not_have_is_none(store):
    with trio.fail_after(20):
        async with holder(store.get_block) as alice, asker(alice) as bob:
            assert await bob.fetch(alice.peer_id, ABSENT, timeout=5) is None
    assert alice.exchange.statistics().not_found == 1
    assert bob.statistics().fetch_not_found == 1 and bob.statistics().fetch_failures == 0


async def test_a_4_mib_block_makes_the_round_trip(store):
    block = os.urandom(MAX_BLOCK_BYTES)
    cid = cid_of(block)
    store.put(None, block, cid)
    with trio.fail_after(30):
        async with holder(store.get_block) as alice, asker(alice) as bob:
            assert await bob.fetch(alice.peer_id, cid, timeout=20) == block
    assert bob.statistics().bytes_in == alice.exchange.statistics().bytes_out == MAX_BLOCK_BYTES


async def test_a_stored_block_over_the_block_limit_is_answered_not_found_never_sent(store):
    block = os.urandom(MAX_BLOCK_BYTES + 1)
    cid = cid_of(block)
    store.put(None, block, cid)
    with trio.fail_after(30):
        async with holder(store.get_block) as alice, asker(alice) as bob:
            assert await bob.fetch(alice.peer_id, cid, timeout=20) is None
    assert alice.exchange.statistics().not_found == 1 and alice.exchange.statistics().bytes_out == 0


async def test_bytes_that_do_not_match_the_cid_are_refused_as_a_retryable_cid_mismatch():
    cid = cid_of(BLOCK)
    with trio.fail_after(20):
        async with holder(lambda asked: b"forged bytes") as mallory, asker(mallory) as bob:
            with pytest.raises(ProviderFailed, match="CIDMismatch") as info:
                await bob.fetch(mallory.peer_id, cid, timeout=5)
    assert info.value.retryable, "the caller asks the next holder"
    assert info.value.provider == f"peer {mallory.peer_id[-8:]}", "names the peer to penalise"
    assert bob.statistics().fetch_failures == 1 and bob.statistics().fetched == 0


@pytest.mark.parametrize("answer", [Found(cid=cid_of(b"other"), data=b"other"), NotFound(cid=cid_of(b"other"))],
                         ids=["found", "not-found"])
async def test_an_answer_for_another_cid_is_refused(answer):
    async def answer_another_block(framed: FramedStream, peer: str) -> None:  # mallory
        assert await framed.read_frame() is not None
        await framed.write(encode_frame(encode(answer)))

    with trio.fail_after(20):
        async with holder(handler=answer_another_block) as mallory, asker(mallory) as bob:
            with pytest.raises(ProviderFailed, match="MalformedMessage") as info:
                await bob.fetch(mallory.peer_id, cid_of(BLOCK), timeout=5)
    assert info.value.retryable


async def test_a_peer_the_guard_does_not_allow_gets_a_retryable_failure_not_a_hang(store):
    store.put(None, BLOCK, cid_of(BLOCK))
    with trio.fail_after(20):
        async with holder(store.get_block, allowed=lambda peer: False) as alice, asker(alice) as bob:
            with pytest.raises(ProviderFailed) as info:  # PeerUnreachable when the reset beats the protocol ack
                await bob.fetch(alice.peer_id, cid_of(BLOCK), timeout=10)
    assert info.value.retryable
    assert dict(alice.guard.statistics().refused) == {"not_allowed": 1}
    assert alice.exchange.statistics().served == 0


def _get_of_exactly(size: int, cid: str) -> bytes:
    """A Get frame whose payload is `size` bytes, padded with a field a newer minor version might add."""
    pad = size - len(pack({"cid": cid, "pad": "", "t": "get", "v": 1})) - 2  # str8 -> str16 header
    payload = pack({"cid": cid, "pad": "x" * pad, "t": "get", "v": 1})
    assert len(payload) == size
    return encode_frame(payload)


@asynccontextmanager
async def _ended_unanswered() -> AsyncIterator[None]:
    """A reset reaches a py-libp2p 0.8.1 reader as EOF (None) or as StreamClosedEarly: both mean no answer."""
    try:
        yield
    except StreamClosedEarly:
        pass


MALFORMED = {
    "not-a-get": encode_frame(encode(NotFound(cid=cid_of(BLOCK)))),
    "not-msgpack": encode_frame(b"\xc1"),
    "over-the-get-limit": _get_of_exactly(MAX_GET_FRAME_SIZE + 1, cid_of(BLOCK)),
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_get_resets_only_its_stream_and_the_holder_keeps_serving(store, payload):
    cid = cid_of(BLOCK)
    store.put(None, BLOCK, cid)
    with trio.fail_after(20):
        async with holder(store.get_block) as alice, asker(alice) as bob:
            waiting = FramedStream(await bob.host.new_stream(ID.from_base58(alice.peer_id), [PROTOCOL_ID]), LIMITS)
            broken = FramedStream(await bob.host.new_stream(ID.from_base58(alice.peer_id), [PROTOCOL_ID]), LIMITS)
            await broken.write(payload)
            async with _ended_unanswered():
                assert await broken.read_frame() is None
            # the stream opened before it is untouched, and a new fetch on the same connection works
            await waiting.write(encode_frame(encode(Get(cid=cid))))
            frame = await waiting.read_frame()
            assert frame is not None and decode(frame, Found) == Found(cid=cid, data=BLOCK)
            assert await bob.fetch(alice.peer_id, cid, timeout=5) == BLOCK
    assert dict(alice.guard.statistics().refused) == {"protocol_error": 1}
    assert alice.exchange.statistics().served == 2


async def test_a_get_at_the_get_frame_limit_is_answered(store):
    cid = cid_of(BLOCK)
    store.put(None, BLOCK, cid)
    with trio.fail_after(20):
        async with holder(store.get_block) as alice, asker(alice) as bob:
            framed = FramedStream(await bob.host.new_stream(ID.from_base58(alice.peer_id), [PROTOCOL_ID]), LIMITS)
            await framed.write(_get_of_exactly(MAX_GET_FRAME_SIZE, cid))
            frame = await framed.read_frame()
            assert frame is not None and decode(frame, Found) == Found(cid=cid, data=BLOCK)
    assert not alice.guard.statistics().refused


@pytest.mark.parametrize("per_call", [True, False], ids=["timeout-argument", "exchange-default"])
async def test_a_holder_that_never_answers_is_a_retryable_timeout(per_call):
    async def never_answer(framed: FramedStream, peer: str) -> None:
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with holder(handler=never_answer) as alice, asker(alice, fetch_timeout=60 if per_call else 0.5) as bob:
            start = trio.current_time()
            with pytest.raises(ProviderTimeout) as info:
                await bob.fetch(alice.peer_id, cid_of(BLOCK), **({"timeout": 0.5} if per_call else {}))
            assert trio.current_time() - start < 3
    assert info.value.retryable and bob.statistics().fetch_failures == 1


async def test_a_peer_without_a_connection_or_address_is_unreachable():
    nobody = Identity.generate().peer_id
    with trio.fail_after(20):
        async with peer_host() as bob:
            with pytest.raises(PeerUnreachable) as info:
                await fetch_block(bob, nobody, cid_of(BLOCK), limits=LIMITS, timeout=5)
    assert info.value.retryable


async def test_a_cid_that_could_not_be_checked_is_refused_before_any_io():
    with trio.fail_after(20):
        async with peer_host() as bob:
            for cid in ("not-a-cid", "b" + "a" * 200):
                with pytest.raises(InvalidRequest):
                    await fetch_block(bob, Identity.generate().peer_id, cid, limits=LIMITS, timeout=5)

