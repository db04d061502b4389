"""The cluster cache's DHT (node.mesh.dht) on real hosts on loopback: a line of nodes 0-1-2-3-4,
each connected to its neighbours only, routing tables filled with `add_member`."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from itertools import pairwise

import pytest
import trio
from libp2p.host.exceptions import StreamFailure
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import _encode_key
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.peerinfo import PeerInfo
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from node.mesh.dht import ClusterDHT
from node.mesh.host import HostConfig, make_host, peer_info, run_host
from protocols.cid import cid_of
from protocols.records import (
    CacheRecord,
    Identity,
    cache_dht_key,
    encode_cache_record,
    sign_cache_record,
)

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
NOW_MS = 1_800_000_000_000  # every node's wall clock: record validity does not depend on when the test runs
alice, bob = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)  # record publishers


def wall() -> float:
    return NOW_MS / 1000


def request_key(n: int | str) -> str:
    return cid_of(f"request {n}".encode())


def record(identity: Identity = alice, n: int | str = 0, *, created: int = NOW_MS, seq: int = 1,
           ttl_ms: int = 3_600_000) -> CacheRecord:
    return sign_cache_record(identity, key=request_key(n), cid=cid_of(f"answer {n} {created}".encode()),
                             created=created, expires=created + ttl_ms, seq=seq)


def hold(node: ClusterDHT, rec: CacheRecord) -> None:
    """Put a value into one node's store only, past every check (as a peer's store could hold it)."""
    node.kad.value_store.put(cache_dht_key(rec.key).encode(), encode_cache_record(rec))


def addr(host) -> str:
    return str(host.get_addrs()[0])


@asynccontextmanager
async def line(n: int, *, is_member: Callable[[str], bool] = lambda peer: True) -> AsyncIterator[list[ClusterDHT]]:
    """n DHT nodes in a line, each connected to its neighbours only, tables filled via add_member."""
    hosts = [make_host(HostConfig(identity=Identity.generate(), listen=(LOOPBACK,))) for _ in range(n)]
    async with AsyncExitStack() as stack:
        for host in hosts:
            await stack.enter_async_context(run_host(host, [LOOPBACK]))
        nursery = await stack.enter_async_context(trio.open_nursery())
        nodes = [ClusterDHT(host, is_member=is_member, wall=wall) for host in hosts]
        try:
            with trio.fail_after(10):
                for node in nodes:
                    await nursery.start(node.run)
                for left, right in pairwise(hosts):
                    await right.connect(peer_info(addr(left)))
                for left, right in pairwise(nodes):
                    await left.add_member(str(right.host.get_id()))
                    await right.add_member(str(left.host.get_id()))
            yield nodes
        finally:
            nursery.cancel_scope.cancel()


async def test_a_record_put_at_one_end_of_the_line_is_found_at_the_other():
    async with line(5) as nodes:
        assert [n.statistics().routing_peers for n in nodes] == [1, 2, 2, 2, 1]
        rec = record()
        with trio.fail_after(10):
            await nodes[0].put_record(rec)
            assert await nodes[4].get_record(rec.key) == rec
        assert nodes[0].statistics().puts == 1
        stats = nodes[4].statistics()
        assert (stats.gets, stats.hits) == (1, 1)
        assert stats.local_hits == 1 and stats.to_json()["refused_by_reason"] == {}
        assert [n.statistics().records for n in nodes] == [1] * 5, "stored at every member the walk reached"


async def test_a_record_held_only_four_hops_away_is_found_by_following_closer_peers():
    async with line(5) as nodes:
        rec = record()
        hold(nodes[0], rec)
        with trio.fail_after(10):
            assert await nodes[4].get_record(rec.key) == rec
        stats = nodes[4].statistics()
        assert (stats.hits, stats.local_hits) == (1, 0)
        assert 4 <= stats.asks <= 4 + 2 * 3, "it walked 3 -> 2 -> 1 -> 0 (plus at most ALPHA - 1 per step)"
        assert stats.records == 0, "a record found is not kept: the store holds what peers put here"


def unsigned(rec: CacheRecord) -> CacheRecord:
    return dataclasses.replace(rec, signature=b"")


def signed_by_another(rec: CacheRecord) -> CacheRecord:
    return dataclasses.replace(rec, publisher=bob.peer_id)  # alice's signature, bob named as the publisher


def expired(rec: CacheRecord) -> CacheRecord:
    return sign_cache_record(alice, key=rec.key, cid=rec.cid, created=NOW_MS - 7_200_000,
                             expires=NOW_MS - 3_600_000, seq=rec.seq)  # expired an hour ago, beyond the 60 s skew


@pytest.mark.parametrize("spoil", [unsigned, signed_by_another, expired])
async def test_an_invalid_record_in_a_store_is_not_returned_by_get_record(spoil):
    async with line(3) as nodes:
        here, there = record(n="here"), record(n="there")
        bad_here, bad_there = spoil(here), spoil(there)
        hold(nodes[0], bad_here)  # in the asking node's own store
        hold(nodes[2], bad_there)  # in a store two hops away
        with trio.fail_after(10):
            assert await nodes[0].get_record(here.key) is None
            assert await nodes[0].get_record(there.key) is None
        stats = nodes[0].statistics()
        assert stats.refused_by_reason == {"invalid": 2}
        assert stats.records == 0, "the invalid record held here was dropped"
        assert stats.hits == 0


async def test_a_member_cannot_put_an_invalid_record_the_validator_refuses_it():
    async with line(2) as nodes:
        bad = unsigned(record())
        key = cache_dht_key(bad.key).encode()
        with trio.fail_after(10):
            stored = await nodes[1].kad.value_store._store_at_peer(nodes[0].host.get_id(), key,
                                                                   encode_cache_record(bad))
        assert stored is False
        assert nodes[0].kad.value_store.get(key) is None
        assert nodes[0].statistics().refused_by_reason == {"invalid": 1}


@pytest.mark.parametrize("order", ["older_first", "newer_first"])
async def test_the_newest_valid_record_wins_whatever_the_order_of_puts(order):
    older = record(alice, n=1, created=NOW_MS - 60_000)
    newer = record(bob, n=1, created=NOW_MS)
    assert older.key == newer.key and older.cid != newer.cid
    async with line(5) as nodes:
        first, second = (older, newer) if order == "older_first" else (newer, older)
        with trio.fail_after(10):
            await nodes[0].put_record(first)
            await nodes[4].put_record(second)
            for node in nodes:
                assert await node.get_record(older.key) == newer
        assert nodes[4].statistics().puts == (1 if order == "older_first" else 0), "a stale put is not made"


async def test_within_one_publisher_the_higher_seq_wins():
    low = record(alice, n=2, seq=1, created=NOW_MS)
    high = record(alice, n=2, seq=2, created=NOW_MS - 1_000)  # older, but the publisher's latest
    async with line(3) as nodes:
        with trio.fail_after(10):
            await nodes[0].put_record(low)
            await nodes[2].put_record(high)
            assert await nodes[1].get_record(low.key) == high


async def test_a_stale_record_held_here_does_not_hide_a_newer_one_elsewhere():
    stale = record(alice, n=3, seq=1, created=NOW_MS - 3_600_000, ttl_ms=7_200_000)  # an hour old, still valid
    newer = record(alice, n=3, seq=2, created=NOW_MS - 60_000)  # republished while node 0 was away
    fresh = record(bob, n=4, seq=1, created=NOW_MS - 60_000)
    async with line(2) as nodes:
        hold(nodes[0], stale)
        hold(nodes[1], newer)
        hold(nodes[0], fresh)
        with trio.fail_after(10):
            assert await nodes[0].get_record(stale.key) == newer, "the newer one, found elsewhere"
            assert await nodes[0].get_record(stale.key) == newer and nodes[0].statistics().local_hits == 1, (
                "and kept here: the next lookup is local")
            asks = nodes[0].statistics().asks
            assert await nodes[0].get_record(fresh.key) == fresh and nodes[0].statistics().asks == asks, (
                "a recent record held here is used without asking anyone")


async def test_a_non_members_put_is_refused_its_stream_reset_and_nothing_stored():
    mallory_identity = Identity.generate()

    def is_member(peer: str) -> bool:
        return peer != mallory_identity.peer_id

    async with line(2, is_member=is_member) as (alice_dht, _bob_dht):
        mallory = make_host(HostConfig(identity=mallory_identity, listen=(LOOPBACK,)))
        async with run_host(mallory, [LOOPBACK]):
            mallory_kad = KadDHT(mallory, DHTMode.SERVER)
            rec = record(n="mallory")
            key = cache_dht_key(rec.key).encode()
            with trio.fail_after(10):
                await mallory.connect(peer_info(addr(alice_dht.host)))
                # a PUT_VALUE on a raw stream: reset before anyone reads it
                put = Message()
                put.type = Message.MessageType.PUT_VALUE
                put.key = key
                put.record.key, put.record.value = key, encode_cache_record(rec)
                with pytest.raises((StreamFailure, StreamError)):  # the reset may overtake the negotiation's answer
                    stream = await mallory.new_stream(alice_dht.host.get_id(), [KAD_PROTOCOL_ID])
                    await stream.write(encode_varint_prefixed(put.SerializeToString()))
                    await read_varint_prefixed_bytes_limited(stream, 1 << 16)
                # the library's own PUT and ADD_PROVIDER
                assert await mallory_kad.value_store._store_at_peer(alice_dht.host.get_id(), key,
                                                                   encode_cache_record(rec)) is False
                await mallory_kad.provider_store._send_add_provider(alice_dht.host.get_id(), b"\x12\x20" + bytes(32))
                await alice_dht.add_member(mallory_identity.peer_id)  # ignored: not a member
                assert await alice_dht.get_record(rec.key) is None
                while alice_dht.statistics().refused < 3:  # ADD_PROVIDER is sent without waiting for an answer
                    await trio.sleep(0.01)
            assert alice_dht.kad.value_store.get(key) is None
            assert alice_dht.kad.provider_store.get_providers(b"\x12\x20" + bytes(32)) == []
            stats = alice_dht.statistics()
            assert stats.refused_by_reason == {"non_member": 3}
            assert stats.routing_peers == 1, "bob only"
            assert not alice_dht.kad.routing_table.peer_in_table(mallory.get_id())


async def test_provide_and_find_providers_across_three_nodes():
    async with line(3) as nodes:
        ids = [str(n.host.get_id()) for n in nodes]
        cid = cid_of(b"an answer")
        with trio.fail_after(10):
            await nodes[0].provide(cid)
            assert await nodes[2].find_providers(cid) == [ids[0]]
            await nodes[2].provide(cid)
            assert sorted(await nodes[1].find_providers(cid)) == sorted([ids[0], ids[2]])
            assert await nodes[2].find_providers(cid) == [ids[0]], "this node left out, deduplicated"
            assert await nodes[0].find_providers(cid) == [ids[2]]
        assert nodes[0].statistics().provides == 1


async def test_find_providers_walks_to_an_announcement_held_two_hops_away():
    async with line(3) as nodes:
        cid = cid_of(b"another answer")
        me = nodes[0].host
        nodes[0].kad.provider_store.add_provider(_encode_key(cid), PeerInfo(me.get_id(), me.get_addrs()))
        with trio.fail_after(10):
            assert await nodes[2].find_providers(cid) == [str(me.get_id())]
            assert await nodes[1].find_providers(cid_of(b"nobody has this")) == []


async def test_an_absent_key_returns_none_promptly():
    async with line(5) as nodes:
        elapsed = []
        with trio.fail_after(10):
            for attempt in ("first (dials nodes 2, 1, 0)", "second"):
                start = time.perf_counter()
                assert await nodes[4].get_record(request_key(f"absent {attempt}")) is None
                elapsed.append(time.perf_counter() - start)
                print(f"\nabsent key from the end of a line of 5, {attempt}: None in {elapsed[-1] * 1000:.1f} ms")
        assert nodes[4].statistics().asks == 8, "every other node asked once per lookup"
        assert max(elapsed) < 2.0, "a sanity bound, not a speed target: far below the DHT's 10 s query timeout"


async def test_a_node_is_alone_until_a_member_is_connected_or_in_its_table():
    async with line(1) as (single,):
        assert single.alone()
    async with line(2, is_member=lambda peer: False) as nodes:  # connected, but not members
        assert all(node.alone() for node in nodes)
    async with line(2) as nodes:
        assert not any(node.alone() for node in nodes)


async def test_lookups_reuse_one_stream_per_member():
    async with line(3) as nodes:
        records = [record(n=f"reuse {i}") for i in range(20)]
        for rec in records:
            hold(nodes[0], rec)
        with trio.fail_after(10):
            for rec in records:
                assert await nodes[2].get_record(rec.key) == rec
        stats = nodes[2].statistics()
        assert stats.asks == 40 and stats.streams_opened == 2, "nodes 1 and 0, asked 20 times each"


async def test_a_member_gets_eight_dht_streams_at_once_and_the_ninth_is_reset():
    async with line(2) as (alice_dht, bob_dht):
        alice = alice_dht.host.get_id()
        with trio.fail_after(10):
            ping = Message()
            ping.type = Message.MessageType.PING
            streams = []
            for _ in range(8):  # each is being served: KadDHT answers on it
                streams.append(await bob_dht.host.new_stream(alice, [KAD_PROTOCOL_ID]))
                await streams[-1].write(encode_varint_prefixed(ping.SerializeToString()))
                await read_varint_prefixed_bytes_limited(streams[-1], 1 << 16)
            with pytest.raises((StreamFailure, StreamError)):  # the reset may overtake the negotiation's answer
                ninth = await bob_dht.host.new_stream(alice, [KAD_PROTOCOL_ID])
                await ninth.write(encode_varint_prefixed(ping.SerializeToString()))
                await read_varint_prefixed_bytes_limited(ninth, 1 << 16)
            assert alice_dht.statistics().refused_by_reason == {"over_limit": 1}
            for stream in streams:
                await stream.close()
            while alice_dht.statistics().serving:  # the slots come back when the streams end
                await trio.sleep(0.01)
            ninth = await bob_dht.host.new_stream(alice, [KAD_PROTOCOL_ID])
            await ninth.write(encode_varint_prefixed(ping.SerializeToString()))
            await read_varint_prefixed_bytes_limited(ninth, 1 << 16)


async def test_cancelled_lookups_leave_no_stream_open_at_the_peers():
    delays = [i * 0.0005 for i in range(40)]  # 0 to 20 ms: before, during and after each request
    async with line(3) as nodes:
        rec = record()
        hold(nodes[0], rec)
        with trio.fail_after(10):
            for delay in delays:
                with trio.move_on_after(delay):
                    await nodes[2].get_record(rec.key)
        # the cancelled requests' streams are gone, one lookup stream is left; well before
        # INBOUND_STREAM_LIFETIME, after which a peer resets forgotten streams anyway
        with trio.fail_after(2):
            for node in nodes[:2]:
                while node.statistics().serving > 1:
                    await trio.sleep(0.01)
            assert await nodes[2].get_record(rec.key) == rec
        assert nodes[2].statistics().streams_opened > 2, "cancelled requests reset their streams"


async def test_get_record_two_hops_away_against_stock_get_value():
    """A printout, not an assertion: get_record p50/p99 two hops away over 30 keys, and KadDHT.get_value."""
    keys = 30
    async with line(5) as nodes:
        records = [record(n=f"timing {i}") for i in range(keys + 3)]
        for rec in records:
            hold(nodes[0], rec)  # held by node 0 only; node 2's table holds nodes 1 and 3
        ours, stock = [], []
        with trio.fail_after(60):
            for rec in records[keys:]:  # warm up: node 2 dials node 0 once
                assert await nodes[2].get_record(rec.key) == rec
            for rec in records[:keys]:
                start = time.perf_counter()
                found = await nodes[2].get_record(rec.key)
                ours.append(time.perf_counter() - start)
                assert found == rec
            asks, streams = nodes[2].statistics().asks, nodes[2].statistics().streams_opened
            # After ours: the library's lookup adds the peers it asks to node 2's table. Its FIND_NODE
            # walk is refused for keys this long (> 50 bytes), so it asks node 2's known peers directly.
            for rec in records[:keys]:
                start = time.perf_counter()
                value = await nodes[2].kad.get_value(cache_dht_key(rec.key))
                stock.append(time.perf_counter() - start)
                assert value == encode_cache_record(rec)

    def summary(samples: list[float]) -> str:
        ms = sorted(s * 1000 for s in samples)
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        return f"p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, min {ms[0]:.1f}, max {ms[-1]:.1f}"

    print(f"\ntwo hops, {keys} keys: get_record {summary(ours)} ({asks / (keys + 3):.1f} asks per lookup, "
          f"{streams} streams opened in all)")
    print(f"two hops, {keys} keys: KadDHT.get_value {summary(stock)}")
