"""The cluster tier's logic (node/cache/cluster.py) against a DHT that keeps records in a dict and peers
that serve blocks from dicts: both implement the interfaces ClusterCache is given (the real ones,
node.mesh.dht and node.cache.exchange, have their own tests; tests/system puts them together).
Time is trio's `autojump_clock`; the wall clock follows it."""

from __future__ import annotations

import pytest
import trio

from node.cache.cluster import ClusterCache
from node.errors import ProviderFailed
from protocols.canonical import response_bytes
from protocols.cid import cid_of
from protocols.records import CacheRecord, Identity, encode_cache_record, sign_cache_record, validate_cache_value

KEY = "bafkreibrnsfzx6sxvmnd5k4vuihzuwmshzwglxdrt4zwea7pwmu52i5kre"
DATA = response_bytes(task="generate", model="echo", text="echo: hi", finish_reason="stop", usage={})
CID = cid_of(DATA)
PUBLISHER, OTHER = Identity.generate(), Identity.generate()
EPOCH = 1_800_000_000.0  # the wall clock at trio time 0


def wall() -> float:
    return EPOCH + trio.current_time()


class DictDHT:
    """ClusterDHT's interface over dicts; `slow` makes get_record never answer (an absent key far away)."""

    def __init__(self) -> None:
        self.records: dict[str, CacheRecord] = {}
        self.providers: dict[str, list[str]] = {}
        self.gets = self.puts = 0
        self.provided: list[tuple[float, str]] = []
        self.slow = False

    def alone(self) -> bool:
        return False  # (a cluster of many, behind the dicts)

    async def get_record(self, request_key: str) -> CacheRecord | None:
        self.gets += 1
        await trio.sleep(0.002)
        if self.slow:
            await trio.sleep_forever()
        return self.records.get(request_key)

    async def put_record(self, record: CacheRecord) -> None:
        self.puts += 1
        validate_cache_value(f"/accelmesh/{record.key}", encode_cache_record(record), int(wall() * 1000))
        self.records[record.key] = record

    async def provide(self, cid: str) -> None:
        self.provided.append((trio.current_time(), cid))

    async def find_providers(self, cid: str) -> list[str]:
        return list(self.providers.get(cid, []))


class Peers:
    """fetch(peer, cid) over per-peer dicts of blocks; a peer in `liars` serves other bytes."""

    def __init__(self, blocks: dict[str, dict[str, bytes]], liars: frozenset[str] = frozenset()) -> None:
        self.blocks, self.liars, self.asked = blocks, liars, []

    async def fetch(self, peer: str, cid: str) -> bytes | None:
        self.asked.append(peer)
        await trio.sleep(0.001)
        if peer in self.liars:
            raise ProviderFailed(f"peer {peer[-8:]}", "CIDMismatch: the bytes do not hash to the CID", retryable=True)
        return self.blocks.get(peer, {}).get(cid)


def cluster(dht: DictDHT, peers: Peers, penalised: list[str] | None = None, **kw) -> ClusterCache:
    return ClusterCache(dht=dht, fetch=peers.fetch, identity=Identity.generate(),
                        penalise=(penalised if penalised is not None else []).append, wall=wall, **kw)


def record(identity: Identity = PUBLISHER, cid: str = CID) -> CacheRecord:
    now = int(wall() * 1000)
    return sign_cache_record(identity, key=KEY, cid=cid, created=now, expires=now + 3_600_000, seq=now)


async def test_a_hit_comes_from_the_publisher_and_is_announced(autojump_clock):
    dht = DictDHT()
    dht.records[KEY] = record()
    peers = Peers({PUBLISHER.peer_id: {CID: DATA}})
    cache = cluster(dht, peers)
    with trio.fail_after(5):
        hit = await cache.lookup(KEY)
    assert hit is not None and (hit.data, hit.cid, hit.served_from) == (DATA, CID, PUBLISHER.peer_id)
    assert peers.asked == [PUBLISHER.peer_id] and cache.statistics().pending == 1, "its CID is queued to announce"


async def test_bytes_that_fail_their_cid_penalise_the_peer_and_the_providers_are_asked(autojump_clock):
    dht = DictDHT()
    dht.records[KEY] = record()
    dht.providers[CID] = [PUBLISHER.peer_id, OTHER.peer_id]
    peers = Peers({OTHER.peer_id: {CID: DATA}}, liars=frozenset({PUBLISHER.peer_id}))
    penalised: list[str] = []
    cache = cluster(dht, peers, penalised)
    with trio.fail_after(5):
        hit = await cache.lookup(KEY)
    assert hit is not None and hit.served_from == OTHER.peer_id
    assert penalised == [PUBLISHER.peer_id] and peers.asked == [PUBLISHER.peer_id, OTHER.peer_id]


async def test_a_record_nobody_can_serve_is_a_miss(autojump_clock):
    dht = DictDHT()
    dht.records[KEY] = record()
    cache = cluster(dht, Peers({}))
    with trio.fail_after(10):
        assert await cache.lookup(KEY) is None
    assert cache.statistics().fetch_failures == 1


async def test_a_lookup_with_no_record_costs_at_most_its_budget(autojump_clock):
    dht = DictDHT()
    dht.slow = True
    cache = cluster(dht, Peers({}), budget=0.1)
    started = trio.current_time()
    with trio.fail_after(5):
        assert await cache.lookup(KEY) is None
    assert trio.current_time() - started == pytest.approx(0.1)
    assert cache.statistics().misses == 1


async def test_fifty_concurrent_lookups_of_one_key_ask_the_dht_once(autojump_clock):
    dht = DictDHT()
    dht.records[KEY] = record()
    peers = Peers({PUBLISHER.peer_id: {CID: DATA}})
    cache = cluster(dht, peers)
    hits = []

    async def one() -> None:
        hits.append(await cache.lookup(KEY))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
    assert len(hits) == 50 and all(h is not None and h.data == DATA for h in hits)
    assert dht.gets == 1 and peers.asked == [PUBLISHER.peer_id] and cache.statistics().lookups == 1


async def test_publishing_puts_a_signed_record_and_announces_within_the_dhts_limit(autojump_clock):
    dht = DictDHT()
    cache = cluster(dht, Peers({}))
    keys = [f"{i:064x}" for i in range(25)]  # sha256-style request keys
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            for i, key in enumerate(keys):
                cache.publish(key, cid_of(f"answer {i}".encode()))
            await trio.sleep(25)
            nursery.cancel_scope.cancel()
    assert dht.puts == 25 and set(dht.records) == set(keys), "every record at once"
    times = [t for t, _ in dht.provided]
    assert len(times) == 25
    for start in range(len(times)):
        in_window = [t for t in times if times[start] <= t < times[start] + 10.0]
        assert len(in_window) <= 10, "at most 10 announcements per 10 s (the DHT's ADD_PROVIDER limit)"
    assert max(times) >= 20.0, "the last five waited for the third window"


async def test_a_restarted_node_signs_records_that_win_over_its_old_ones(autojump_clock):
    identity = Identity.generate()
    dht = DictDHT()
    first = ClusterCache(dht=dht, fetch=Peers({}).fetch, identity=identity, penalise=lambda p: None, wall=wall)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            first.publish(KEY, CID)
            await trio.sleep(1)
            old = dht.records[KEY]
            await trio.sleep(1)
            second = ClusterCache(dht=dht, fetch=Peers({}).fetch, identity=identity, penalise=lambda p: None,
                                  wall=wall)  # the same identity, a new process: no counter carried over
            await nursery.start(second.run)
            second.publish(KEY, cid_of(b"a newer answer"))
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    assert dht.records[KEY].seq > old.seq and dht.records[KEY].cid == cid_of(b"a newer answer")


async def test_records_are_republished_before_they_expire(autojump_clock):
    dht = DictDHT()
    cache = cluster(dht, Peers({}), ttl=100.0)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            cache.publish(KEY, CID)
            await trio.sleep(1)
            assert dht.puts == 1
            await trio.sleep(89.5)  # 90 % of the TTL after the first put
            assert dht.puts == 2 and dht.records[KEY].expires > int(wall() * 1000) + 50_000
            assert [cid for _, cid in dht.provided] == [CID, CID], "announced again with it"
            nursery.cancel_scope.cancel()


async def test_a_full_queue_drops_publications_and_counts_them(autojump_clock):
    cache = cluster(DictDHT(), Peers({}), max_pending=4)
    for i in range(5):
        cache.publish(f"{i:064x}", cid_of(bytes([i])))
    s = cache.statistics()
    assert s.pending == 4 and s.dropped == 3, "2 records + their 2 CIDs fill it; the rest are dropped"
